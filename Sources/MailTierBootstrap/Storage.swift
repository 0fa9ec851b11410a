// MailTierBootstrap — which adapters a configuration selects, shared by `smtp-server` and
// `user-cli` so that both see the same accounts, queue and mailboxes. Imports every adapter;
// nothing imports it but the executables.
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
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

/// What a configuration selects: the database (users, queue, `messages`), the spool, the
/// mailbox store, and the clients they use.
public struct Storage: Sendable {
    /// A configuration that cannot be put to work; names the variable like `ConfigurationError`.
    public struct Failure: Error, CustomStringConvertible {
        public var variable: String
        public var message: String
        /// 2 for a bad value (as configuration errors), 1 for a resource that failed.
        public var exitCode: Int32
        public var description: String { "\(variable): \(message)" }

        public init(variable: String, message: String, exitCode: Int32 = 2) {
            self.variable = variable
            self.message = message
            self.exitCode = exitCode
        }
    }

    public let database: Database
    public let spool: any BlobStore
    public let mailboxes: any MailboxStore
    public let s3: S3Client?
    /// The webhook events the adapters write (`Configuration.recordedEvents`).
    public let recording: Set<WebhookEvent>
    private let logger: Logger

    /// The spool directory, when there is one (embedded mode: behind `SQLiteBlobStore` for
    /// messages over `SMTP_SPOOL_SMALL_MESSAGE_KB`).
    public var spoolDirectory: SpoolBlobStore? {
        (spool as? SpoolBlobStore) ?? ((spool as? SQLiteBlobStore)?.overflow as? SpoolBlobStore)
    }

    public var users: any UserStore { database.users(recording: recording) }
    public var queue: any MessageQueue { database.queue(recording: recording) }
    public var events: any EventOutbox { database.events }

    /// Opens the configured database (`Database.open`), then builds the rest.
    public init(configuration: Configuration, threadPool: NIOThreadPool, logger: Logger) throws(Failure) {
        try self.init(
            configuration: configuration, database: Database.open(configuration, threadPool: threadPool, logger: logger),
            threadPool: threadPool, logger: logger)
    }

    /// `creatingSpool: false` for a program that does not accept mail (user-cli): it makes no
    /// spool directory.
    public init(
        configuration: Configuration, database: Database, threadPool: NIOThreadPool, logger: Logger, creatingSpool: Bool = true
    ) throws(Failure) {
        self.database = database
        self.logger = logger
        self.recording = configuration.recordedEvents
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
            let files: SpoolBlobStore
            do {
                files = try SpoolBlobStore(directory: configuration.spoolPath, threadPool: threadPool, creating: creatingSpool)
            } catch {
                throw Failure(variable: "SMTP_SPOOL_PATH", message: "cannot use \(configuration.spoolPath): \(error)")
            }
            // Embedded mode: small messages are spooled in the SQLite database (one WAL append
            // shared by concurrent sessions instead of a file each). With 0 every new message is
            // a file, and the rows spooled before still read from the database.
            if case .sqlite(let sqlite) = database {
                spool = SQLiteBlobStore(database: sqlite, maximumSize: configuration.spoolSmallMessageKB * 1024, overflow: files)
            } else {
                spool = files
            }
        }

        // The `messages` table is the database store, and indexes the stores that keep content elsewhere.
        switch configuration.storageType {
        case .maildir:
            mailboxes = MaildirStore(root: configuration.storagePath, hostname: Self.machineName ?? configuration.hostname, threadPool: threadPool)
        case .mbox:
            mailboxes = MboxStore(root: configuration.storagePath, threadPool: threadPool)
        case .database:
            mailboxes = database.messages
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
                index: database.messages,
                content: TimeSeriesContentStore(root: configuration.storagePath, encryptionKey: key, threadPool: threadPool))
        case .s3:
            guard let s3 else { throw Failure(variable: "SMTP_S3_BUCKET", message: "required when SMTP_STORAGE_TYPE is s3") }
            mailboxes = IndexedMailboxStore(index: database.messages, content: S3MessageContentStore(client: s3))
        }
    }

    /// This machine's name, for maildir file names (unique per machine, as maildir wants).
    static var machineName: String? {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, 255) == 0 else { return nil }
        let name = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return name.isEmpty ? nil : name
    }

    /// Runs `body` with the database running (`Database.withRunning`), then shuts the S3 client down.
    public func withRunning<T: Sendable>(migration: Migration, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
        try await database.withRunning(migration: migration, logger: logger) { try await closingClients(body) }
    }

    /// Runs `body`, then shuts the S3 client down (for a caller that runs the database itself).
    public func closingClients<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        let result: Result<T, any Error>
        do {
            result = .success(try await body())
        } catch {
            result = .failure(error)
        }
        try? await s3?.shutdown()
        return try result.get()
    }
}

// MARK: - The database

extension Storage {
    /// When the schema is brought to this build's version.
    public enum Migration: Sendable {
        /// Not here: the caller calls `Database.migrate()` (`smtp-server migrate`).
        case byCaller
        /// Before `body`; a database that cannot be reached or migrated fails the call (user-cli).
        case first
        /// `body` starts at once (the SMTP listener opens); the migration runs beside it and is
        /// retried, with a log line each time, until it succeeds; then `whenReady` runs (and is
        /// retried the same way while the database is unavailable). Until then every database
        /// operation fails, so SMTP clients get 451 and nothing is queued. An error that is not the
        /// database's (a schema newer than this build, a failure of `whenReady` itself) ends
        /// `withRunning` with that error. With SQLite, `whenReady` simply runs before `body`.
        case inBackground(whenReady: @Sendable () async throws -> Void)
    }

    /// Where users, the queue and the `messages` table live: one SQLite file (embedded mode), or
    /// PostgreSQL (cluster mode, `SMTP_DATABASE_URL`), never both.
    public enum Database: Sendable {
        case sqlite(SQLiteDatabase)
        case postgres(PostgresDatabase)

        /// PostgreSQL when `SMTP_DATABASE_URL` is set — nothing connects before `withRunning`, and
        /// no SQLite file is opened or created (stateless pods); otherwise the SQLite file at
        /// `SMTP_DB_PATH`, created if missing and migrated now.
        public static func open(_ configuration: Configuration, threadPool: NIOThreadPool, logger: Logger) throws(Failure) -> Database {
            if let url = configuration.databaseURL {
                do {
                    return .postgres(try PostgresDatabase(url: url, logger: logger))
                } catch {
                    throw Failure(variable: "SMTP_DATABASE_URL", message: "\(error)")
                }
            }
            do {
                return .sqlite(try SQLiteDatabase(path: configuration.dbPath, threadPool: threadPool))
            } catch {
                throw Failure(variable: "SMTP_DB_PATH", message: "cannot open \(configuration.dbPath): \(error)", exitCode: 1)
            }
        }

        /// The accounts; `create` writes `user.created` when `recording` holds it.
        public func users(recording: Set<WebhookEvent>) -> any UserStore {
            switch self {
            case .sqlite(let database): SQLiteUserStore(database: database, recording: recording)
            case .postgres(let database): PostgresUserStore(database: database, recording: recording)
            }
        }

        /// The queue; it writes the `message.*` events `recording` holds.
        public func queue(recording: Set<WebhookEvent>) -> any MessageQueue {
            switch self {
            case .sqlite(let database): SQLiteMessageQueue(database: database, recording: recording)
            case .postgres(let database): PostgresMessageQueue(database: database, recording: recording)
            }
        }

        /// The webhook outbox.
        public var events: any EventOutbox {
            switch self {
            case .sqlite(let database): SQLiteEventOutbox(database: database)
            case .postgres(let database): PostgresEventOutbox(database: database)
            }
        }

        /// The `messages` table: the database mailbox store, and the index of timeseries and s3.
        var messages: any SearchableMailboxStore & MailboxIndex {
            switch self {
            case .sqlite(let database): SQLiteMailboxStore(database: database)
            case .postgres(let database): PostgresMailboxStore(database: database)
            }
        }

        /// "PostgreSQL" or "SQLite <path>" (never the URL: it holds the password).
        public var name: String {
            switch self {
            case .sqlite(let database): "SQLite \(database.path)"
            case .postgres: "PostgreSQL"
            }
        }

        public var schemaVersion: Int {
            switch self {
            case .sqlite: SQLiteSchema.currentVersion
            case .postgres: PostgresDatabase.currentVersion
            }
        }

        /// Applies the pending migrations and returns the versions applied (empty: the schema was
        /// current). SQLite migrates when it is opened: this returns what that open applied.
        /// PostgreSQL: inside `withRunning`; fails within `PostgresDatabase.Limits.connectionWait`
        /// when PostgreSQL cannot be reached.
        public func migrate() async throws -> [Int] {
            switch self {
            case .sqlite(let database): database.migrationsApplied
            case .postgres(let database): try await database.migrate()
            }
        }

        /// One line for `smtp-server migrate`.
        public func report(applied: [Int]) -> String {
            if applied.isEmpty { return "\(name): schema is current (version \(schemaVersion))" }
            let list = applied.map(String.init).joined(separator: ", ")
            return "\(name): applied migration\(applied.count == 1 ? "" : "s") \(list) (schema version \(schemaVersion))"
        }

        /// Runs `body` with the PostgreSQL client running (a SQLite file needs nothing), migrating
        /// as `migration` says, and stops the client afterwards.
        public func withRunning<T: Sendable>(
            migration: Migration, logger: Logger = Logger(label: "mailtier"), _ body: @escaping @Sendable () async throws -> T
        ) async throws -> T {
            guard case .postgres(let postgres) = self else {
                if case .inBackground(let whenReady) = migration { try await whenReady() }
                return try await body()
            }
            return try await withThrowingTaskGroup(of: T?.self) { tasks in
                tasks.addTask {
                    await postgres.run()
                    return nil
                }
                defer { tasks.cancelAll() }
                // Let the pool's run loop start before the first lease (PostgresNIO warns otherwise).
                try await Task.sleep(for: .milliseconds(20))
                switch migration {
                case .byCaller:
                    break
                case .first:
                    do {
                        try await postgres.migrate()
                    } catch {
                        throw Failure(variable: "SMTP_DATABASE_URL", message: "cannot migrate the database: \(error)", exitCode: 1)
                    }
                case .inBackground(let whenReady):
                    tasks.addTask {
                        try await Self.migrateUntilReady(postgres, whenReady: whenReady, logger: logger)
                        return nil
                    }
                }
                tasks.addTask { try await body() }
                while let next = try await tasks.next() {
                    if let result = next { return result }
                }
                throw CancellationError()  // not reached: `body`'s task returns or throws
            }
        }

        /// `Migration.inBackground`: retries every PostgreSQL unavailability, 1 s after the first
        /// failure, doubling up to 30 s.
        static func migrateUntilReady(
            _ postgres: PostgresDatabase, whenReady: @Sendable () async throws -> Void, logger: Logger
        ) async throws {
            var delay = Duration.seconds(1)
            while true {
                do {
                    if !postgres.isMigrated {
                        let applied = try await postgres.migrate()
                        logger.info(
                            "PostgreSQL schema ready",
                            metadata: ["version": "\(PostgresDatabase.currentVersion)", "applied": "\(applied)"])
                    }
                    try await whenReady()
                    return
                } catch let error as PostgresDatabaseError {
                    logger.error(
                        "PostgreSQL is not available: SMTP transactions get 451 4.3.0 until it is; retrying",
                        metadata: ["error": "\(error)", "retry_in": "\(delay)"])
                }
                try await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(30))
            }
        }
    }

    /// `smtp-server webhooks [retry-failed]`: the webhook outbox's counts and failed events (at
    /// most 100, oldest first), after making the failed ones due again when `retryFailed`. Returns
    /// the text to print: `webhook events: 3 waiting, 1 failed, 120 delivered`, then one
    /// `failed: <id> <type> <created> attempts=<n> <last error>` line per failed event.
    public static func webhooks(
        retryFailed: Bool, configuration: Configuration, threadPool: NIOThreadPool, logger: Logger
    ) async throws(Failure) -> String {
        let database = try Database.open(configuration, threadPool: threadPool, logger: logger)
        do {
            return try await database.withRunning(migration: .first, logger: logger) {
                let outbox = database.events
                var lines: [String] = []
                if retryFailed {
                    lines.append("made \(try await outbox.retryFailed(now: Date())) failed webhook event(s) due again")
                }
                let counts = try await outbox.counts()
                lines.append("webhook events: \(counts.waiting) waiting, \(counts.failed) failed, \(counts.delivered) delivered")
                lines += try await outbox.failed(limit: 100).map { "failed: \($0.line)" }
                return lines.joined(separator: "\n") + "\n"
            }
        } catch let failure as Failure {
            throw failure
        } catch {
            let variable = configuration.databaseURL == nil ? "SMTP_DB_PATH" : "SMTP_DATABASE_URL"
            throw Failure(variable: variable, message: "cannot read the webhook outbox of \(database.name): \(error)", exitCode: 1)
        }
    }

    /// `smtp-server migrate`: applies the pending migrations of the configured database and
    /// returns the line to print. A failure names the variable, never the URL.
    public static func migrate(configuration: Configuration, threadPool: NIOThreadPool, logger: Logger) async throws(Failure) -> String {
        let database = try Database.open(configuration, threadPool: threadPool, logger: logger)
        do {
            let applied = try await database.withRunning(migration: .byCaller, logger: logger) { try await database.migrate() }
            return database.report(applied: applied)
        } catch {
            let variable = configuration.databaseURL == nil ? "SMTP_DB_PATH" : "SMTP_DATABASE_URL"
            throw Failure(variable: variable, message: "cannot migrate \(database.name): \(error)", exitCode: 1)
        }
    }
}
