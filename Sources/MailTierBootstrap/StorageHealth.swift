#if canImport(Glibc)
import Glibc
#endif
import MailTier
import MailTierFiles
import MailTierPostgres
import MailTierS3
import MailTierSQLite
import PostgresNIO

// The cheap questions `GET /health` asks the configured storage. Each returns when the part
// answers and throws a one-line, secret-free error when it does not; the caller bounds the time.

/// Why a health check failed.
public struct StorageHealthError: Error, Sendable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

extension Storage {
    /// `SELECT 1` on the database. PostgreSQL: a reachable server whose schema this process has
    /// not migrated yet also fails (SMTP transactions get 451 until then).
    public func pingDatabase() async throws {
        switch database {
        case .sqlite(let sqlite):
            _ = try await sqlite.read { try $0.query("SELECT 1") }
        case .postgres(let postgres):
            do {
                // Straight to the pool: `PostgresDatabase.query` refuses before the migration.
                _ = try await postgres.client.withConnection { connection in
                    try await connection.query("SELECT 1", logger: postgres.logger).collect()
                }
            } catch let error as PSQLError {
                // PSQLError's description hides everything; the server's message or the network
                // error says what is wrong, and holds no secret.
                if let message = error.serverInfo?[.message] { throw StorageHealthError("PostgreSQL: \(message)") }
                throw StorageHealthError("cannot reach PostgreSQL: \(error.underlying.map { "\($0)" } ?? "\(error.code)")")
            }
            guard postgres.isMigrated else {
                throw StorageHealthError("PostgreSQL answers, but the schema is not migrated yet")
            }
        }
    }

    /// S3: one `ListObjectsV2` with `max-keys=1` on the bucket. A spool directory: it exists, is a
    /// directory, and this process may write to it.
    public func pingSpool() async throws {
        if let s3 {
            _ = try await s3.listObjects(prefix: "", maxKeys: 1)
        } else if let directory = spoolDirectory?.directory {
            var info = stat()
            guard stat(directory, &info) == 0 else {
                throw StorageHealthError("spool directory \(directory): \(String(cString: strerror(errno)))")
            }
            guard info.st_mode & S_IFMT == S_IFDIR else { throw StorageHealthError("spool \(directory) is not a directory") }
            guard access(directory, W_OK) == 0 else {
                throw StorageHealthError("spool directory \(directory) is not writable: \(String(cString: strerror(errno)))")
            }
        }
    }
}
