// MailTierBootstrap — which adapters a configuration selects, shared by `smtp-server` and
// `user-cli` so that both see the same mailboxes. Imports every adapter; nothing imports it
// but the executables.
#if canImport(Glibc)
import Glibc
#endif
import Logging
import MailTier
import MailTierFiles
import MailTierPostgres
import MailTierS3
import MailTierSQLite
import NIOPosix

/// The storage a configuration selects: the spool, the mailbox store, and the clients they use.
public struct Storage: Sendable {
    /// A configuration that cannot be put to work; names the variable like `ConfigurationError`.
    public struct Failure: Error, CustomStringConvertible {
        public var variable: String
        public var message: String
        public var description: String { "\(variable): \(message)" }
    }

    public let spool: any BlobStore
    public let mailboxes: any MailboxStore
    /// Runs for as long as the storage is used (`run()`), migrated first (`prepare()`).
    public let postgres: PostgresDatabase?
    public let s3: S3Client?

    public init(configuration: Configuration, database: SQLiteDatabase, threadPool: NIOThreadPool, logger: Logger) throws(Failure) {
        do {
            postgres = try configuration.databaseURL.map { try PostgresDatabase(url: $0, logger: logger) }
        } catch {
            throw Failure(variable: "SMTP_DATABASE_URL", message: "\(error)")
        }

        if let bucket = configuration.s3Bucket, let accessKey = configuration.s3AccessKey, let secretKey = configuration.s3SecretKey {
            s3 = S3Client(
                configuration: S3Configuration(
                    endpoint: configuration.s3Endpoint, region: configuration.s3Region, accessKey: accessKey,
                    secretKey: secretKey, bucket: bucket),
                logger: logger)
        } else {
            s3 = nil
        }

        if let s3 {
            spool = S3BlobStore(client: s3)
        } else {
            do {
                spool = try SpoolBlobStore(directory: configuration.spoolPath, threadPool: threadPool)
            } catch {
                throw Failure(variable: "SMTP_SPOOL_PATH", message: "cannot use \(configuration.spoolPath): \(error)")
            }
        }

        // The `messages` table indexes the stores that keep content elsewhere.
        let index: any MailboxIndex = postgres.map { PostgresMailboxStore(database: $0) } ?? SQLiteMailboxStore(database: database)
        switch configuration.storageType {
        case .maildir:
            mailboxes = MaildirStore(root: configuration.storagePath, hostname: Self.machineName ?? configuration.hostname, threadPool: threadPool)
        case .mbox:
            mailboxes = MboxStore(root: configuration.storagePath, threadPool: threadPool)
        case .database:
            mailboxes = postgres.map { PostgresMailboxStore(database: $0) } ?? SQLiteMailboxStore(database: database)
        case .timeseries:
            var key: SealingKey?
            if let text = configuration.encryptionKey {
                do {
                    key = try SealedFile.key(fromBase64: text)
                } catch {
                    throw Failure(variable: "SMTP_ENCRYPTION_KEY", message: "\(error)")
                }
            }
            mailboxes = IndexedMailboxStore(
                index: index, content: TimeSeriesContentStore(root: configuration.storagePath, encryptionKey: key, threadPool: threadPool))
        case .s3:
            guard let s3 else { throw Failure(variable: "SMTP_S3_BUCKET", message: "required when SMTP_STORAGE_TYPE is s3") }
            mailboxes = IndexedMailboxStore(index: index, content: S3MessageContentStore(client: s3))
        }
    }

    /// This machine's name, for maildir file names (unique per machine, as maildir wants).
    static var machineName: String? {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, 255) == 0 else { return nil }
        let name = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return name.isEmpty ? nil : name
    }

    /// Runs `body` with the storage's clients running (PostgreSQL migrated first), then stops them.
    public func withRunning<T: Sendable>(_ body: @Sendable () async throws -> T) async throws -> T {
        defer {
            if let s3 { Task { try? await s3.shutdown() } }
        }
        guard let postgres else { return try await body() }
        return try await withThrowingTaskGroup(of: T?.self) { tasks in
            tasks.addTask {
                await postgres.run()
                return nil
            }
            // Let the pool's run loop start before the first lease (PostgresNIO warns otherwise).
            try await Task.sleep(for: .milliseconds(20))
            do {
                try await postgres.migrate()
            } catch {
                tasks.cancelAll()
                throw Failure(variable: "SMTP_DATABASE_URL", message: "cannot migrate the database: \(error)")
            }
            let result = try await body()
            tasks.cancelAll()
            return result
        }
    }
}
