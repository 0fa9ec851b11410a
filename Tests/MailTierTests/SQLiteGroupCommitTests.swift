import Foundation
import MailTier
import MailTierFiles
import NIOCore
import NIOPosix
import Testing

@testable import MailTierSQLite

/// `SQLiteDatabase.write` commits concurrent writes together (group commit), each in a
/// savepoint of its own; and `SQLiteBlobStore`, embedded mode's spool for small messages.
@Suite struct SQLiteGroupCommitTests {
    @Test func concurrentWritesShareCommitsAndAFailureUndoesOnlyItsOwn() async throws {
        try await withTemporaryDirectory("mailtier-group-commit") { directory in
            let pool = NIOThreadPool(numberOfThreads: 8)
            pool.start()
            let database = try SQLiteDatabase(path: directory + "/smtp.db", threadPool: pool)
            try await database.write { try $0.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, note TEXT NOT NULL)") }
            let before = database.writeTransactionsCommitted

            struct Refused: Error, Equatable { let n: Int }
            let count = 400
            let outcomes = await withTaskGroup(of: (Int, Bool).self) { group in
                for n in 0..<count {
                    group.addTask {
                        do {
                            try await database.write { db in
                                try db.execute("INSERT INTO t (n, note) VALUES (?, 'kept')", [.integer(Int64(n))])
                                if n % 3 == 0 { throw Refused(n: n) }  // after its insert: must be undone
                                if n % 7 == 1 {  // a failing statement: its own error, nothing else lost
                                    try db.execute("INSERT INTO t (n, note) VALUES (?, NULL)", [.integer(Int64(n + 10_000))])
                                }
                            }
                            return (n, true)
                        } catch {
                            return (n, false)
                        }
                    }
                }
                var result: [Int: Bool] = [:]
                for await (n, ok) in group { result[n] = ok }
                return result
            }
            let expected = Set((0..<count).filter { $0 % 3 != 0 && $0 % 7 != 1 })
            #expect(Set(outcomes.filter(\.value).map(\.key)) == expected)
            let stored = try await database.read { db in
                try db.query("SELECT n FROM t ORDER BY n").compactMap { $0.int("n").map(Int.init) }
            }
            #expect(Set(stored) == expected, "exactly the writes that returned are stored")
            let commits = database.writeTransactionsCommitted - before
            #expect(commits >= 1 && commits < count, "\(commits) commits for \(count) concurrent writes")

            // The connection is usable afterwards, and a lone write still commits.
            try await database.write { try $0.execute("INSERT INTO t (n, note) VALUES (-1, 'last')") }
            let reopened = try SQLiteDatabase(path: directory + "/smtp.db", threadPool: pool)
            #expect(try reopened.readSync { try $0.query("SELECT COUNT(*) AS c FROM t").first?.int("c") } == Int64(expected.count + 1))
            try await pool.shutdownGracefully()
        }
    }

    @Test func smallBlobsAreRowsAndLargeOnesFiles() async throws {
        try await withTemporaryDirectory("mailtier-sqlite-spool") { directory in
            let database = try SQLiteDatabase(path: directory + "/smtp.db", threadPool: .singleton)
            let files = try SpoolBlobStore(directory: directory + "/spool", threadPool: .singleton)
            let spool = SQLiteBlobStore(database: database, maximumSize: 1024, overflow: files)
            let small = ByteBuffer(bytes: Array(repeating: UInt8(ascii: "s"), count: 1024) + [0, 0xFF, 13, 10])
            let exactly = ByteBuffer(repeating: UInt8(ascii: "e"), count: 1024)
            let large = ByteBuffer(repeating: UInt8(ascii: "l"), count: 1025)

            try await spool.put(key: "msg_small", data: ByteBuffer(bytes: small.readableBytesView.prefix(1020)))
            try await spool.put(key: "msg_exact", data: exactly)
            try await spool.put(key: "msg_large", data: large)
            #expect(try FileManager.default.contentsOfDirectory(atPath: directory + "/spool").sorted() == ["msg_large", "tmp"])
            #expect(try await spool.get(key: "msg_small") == ByteBuffer(bytes: small.readableBytesView.prefix(1020)))
            #expect(try await spool.get(key: "msg_exact") == exactly)
            #expect(try await spool.get(key: "msg_large") == large)
            #expect(try await spool.list().map(\.key) == ["msg_exact", "msg_large", "msg_small"])
            #expect(try await spool.list().allSatisfy { abs($0.modified.timeIntervalSinceNow) < 60 })

            // Durable: a new connection (as after a restart) reads the same bytes.
            let reopened = SQLiteBlobStore(
                database: try SQLiteDatabase(path: directory + "/smtp.db", threadPool: .singleton), maximumSize: 1024,
                overflow: files)
            #expect(try await reopened.get(key: "msg_exact") == exactly)
            // SMTP_SPOOL_SMALL_MESSAGE_KB=0 after a restart: new messages are files, the rows
            // spooled before are still read.
            let filesOnly = SQLiteBlobStore(database: database, maximumSize: 0, overflow: files)
            #expect(try await filesOnly.get(key: "msg_small") == ByteBuffer(bytes: small.readableBytesView.prefix(1020)))
            try await filesOnly.put(key: "msg_tiny", data: ByteBuffer(string: "x"))
            #expect(FileManager.default.fileExists(atPath: directory + "/spool/msg_tiny"))
            #expect(try await filesOnly.list().map(\.key) == ["msg_exact", "msg_large", "msg_small", "msg_tiny"])
            try await filesOnly.delete(key: "msg_tiny")

            try await spool.delete(key: "msg_small")
            try await spool.delete(key: "msg_large")
            try await spool.delete(key: "msg_missing")  // not an error
            #expect(try await spool.list().map(\.key) == ["msg_exact"])
            #expect(try FileManager.default.contentsOfDirectory(atPath: directory + "/spool") == ["tmp"])
            await #expect {
                _ = try await spool.get(key: "msg_small")
            } throws: { error in
                (error as? FileStoreError)?.isNotFound == true
            }
        }
    }
}
