#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import MailTier
import NIOCore

/// Embedded mode's spool for small messages: blobs up to `maximumSize` bytes are rows of
/// `spool_blobs` in the SQLite database; larger ones (every one when `maximumSize` is 0) go to
/// `overflow` (the spool directory). `get`, `delete` and `list` look in both, so changing the
/// size strands nothing. (A key is in one place only: keys are fresh queue ids.)
///
/// Why: a file per message costs an inode allocated and freed, a file and a directory fsync,
/// and the directory's lock, for every message; under load those were most of the ingress's
/// kernel time (see bench/profile.py). A row costs a share of one WAL fsync, as concurrent
/// writes are committed together (`SQLiteDatabase.writeSync`). `put` returns after COMMIT
/// with `synchronous=FULL`: the blob is as durable as a spool file.
public struct SQLiteBlobStore: BlobStore {
    public let database: SQLiteDatabase
    public let maximumSize: Int
    public let overflow: any BlobStore

    public init(database: SQLiteDatabase, maximumSize: Int, overflow: any BlobStore) {
        self.database = database
        self.maximumSize = maximumSize
        self.overflow = overflow
    }

    public func put(key: String, data: ByteBuffer) async throws {
        guard maximumSize > 0, data.readableBytes <= maximumSize else {
            try await overflow.put(key: key, data: data)
            return
        }
        let bytes = Array(data.readableBytesView)
        let now = Int64(Date().timeIntervalSince1970)
        try await database.write { db in
            try db.execute(
                "INSERT OR REPLACE INTO spool_blobs (key, data, created_at) VALUES (?, ?, ?)",
                [.text(key), .blob(bytes), .integer(now)])
        }
    }

    /// A blob not in the database is looked up in `overflow` (whose not-found error it throws).
    public func get(key: String) async throws -> ByteBuffer {
        let bytes = try await database.read { db in
            try db.query("SELECT data FROM spool_blobs WHERE key = ?", [.text(key)]).first.map { $0.blob("data") ?? [] }
        }
        if let bytes { return ByteBuffer(bytes: bytes) }
        return try await overflow.get(key: key)
    }

    public func delete(key: String) async throws {
        let deleted = try await database.write { db in
            try db.execute("DELETE FROM spool_blobs WHERE key = ?", [.text(key)])
            return db.changes
        }
        if deleted == 0 { try await overflow.delete(key: key) }
    }

    public func list() async throws -> [(key: String, modified: Date)] {
        let rows = try await database.read { db in
            try db.query("SELECT key, created_at FROM spool_blobs").map {
                (key: $0.string("key") ?? "", modified: Date(timeIntervalSince1970: Double($0.int("created_at") ?? 0)))
            }
        }
        return (rows + (try await overflow.list())).sorted { $0.key < $1.key }
    }
}
