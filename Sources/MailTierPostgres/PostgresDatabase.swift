#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import MailTier
import NIOCore
import PostgresNIO
import ServiceLifecycle
import Synchronization

/// A PostgreSQL database: a `PostgresClient` (a connection pool) made from a
/// `postgres://user:password@host:port/database` URL, and the schema's migrations.
///
/// The client does nothing until `run()` runs in a long-lived task (a `ServiceGroup`, or a
/// task group that cancels it at the end); cancelling `run()` closes the pool. Queries made
/// before `run()` starts wait for it.
///
/// Until `migrate()` has succeeded once in this process, `query` and `transaction` fail at once
/// with `PostgresDatabaseError.Kind.notMigrated`: nothing reads or writes a schema this build
/// has not checked (a server that starts while PostgreSQL is down answers 451 until then).
///
/// **Bounds** (`Limits`). PostgresNIO's pool queues a request while it cannot connect, for up to
/// a minute (then its circuit breaker fails requests at once until a connection succeeds). A
/// mail server must answer sooner, so every operation here waits at most
/// `Limits.connectionWait` (3 s) for a connection — also the TCP connect timeout — and then
/// fails with `.unavailable`: an SMTP client gets `451 4.3.0` within about 3 s when PostgreSQL
/// is down or unreachable. An operation whose connection stops answering is abandoned after
/// `Limits.operation` (60 s) and its connection closed (`.timedOut`). The pool keeps trying to
/// reconnect on its own (backoff from 100 ms growing by 1.25x up to 60 s), so the node recovers
/// without a restart once PostgreSQL is back: within seconds after a short outage, within about
/// a minute after a long one.
///
/// With `schema`, every connection starts with `search_path` set to it (and `migrate()` creates
/// it): the tests give each case its own schema.
public final class PostgresDatabase: Service, Sendable {
    /// How long operations may wait.
    public struct Limits: Sendable {
        /// Longest wait for a pooled connection (and for one TCP connect).
        public var connectionWait: Duration
        /// Longest time one operation (query or transaction) may take once it has a connection;
        /// nil for none. Migrations have none: they may wait for another process's.
        public var operation: Duration?

        public init(connectionWait: Duration = .seconds(3), operation: Duration? = .seconds(60)) {
            self.connectionWait = connectionWait
            self.operation = operation
        }
    }

    /// How long a session may sit idle inside a transaction before PostgreSQL ends it.
    public static let idleInTransactionTimeoutSeconds = 15

    public let client: PostgresClient
    /// The schema every connection uses, or nil for the server's default search path.
    public let schema: String?
    /// Passed to the queries.
    public let logger: Logger
    public let limits: Limits
    private let migrated = Mutex(false)

    /// Parses `url` with `configuration(url:)`. Throws `PostgresURLError` for a bad URL and for a
    /// schema that is not a plain lower-case identifier.
    public convenience init(
        url: String, schema: String? = nil, limits: Limits = Limits(), logger: Logger = Logger(label: "mailtier.postgres")
    ) throws {
        try self.init(configuration: Self.configuration(url: url), schema: schema, limits: limits, logger: logger)
    }

    public init(
        configuration: PostgresClient.Configuration, schema: String? = nil, limits: Limits = Limits(),
        logger: Logger = Logger(label: "mailtier.postgres")
    ) throws {
        var configuration = configuration
        if let schema {
            guard Self.isPlainIdentifier(schema) else {
                throw PostgresURLError("schema name must be 1-63 of [a-z0-9_], not starting with a digit")
            }
            configuration.options.additionalStartupParameters.append(("search_path", schema))
        }
        // DESIGN.md: a commit is on disk before the 250, whatever the server's default.
        configuration.options.additionalStartupParameters.append(("synchronous_commit", "on"))
        // No transaction here waits between its statements: a process stopped inside one (a
        // delivery worker paused with SIGSTOP, a hung host) would hold its row locks and block
        // every other worker. PostgreSQL ends such a session after this long, rolling it back.
        configuration.options.additionalStartupParameters.append(
            ("idle_in_transaction_session_timeout", "\(Self.idleInTransactionTimeoutSeconds)s"))
        configuration.options.connectTimeout = limits.connectionWait
        self.schema = schema
        self.logger = logger
        self.limits = limits
        self.client = PostgresClient(configuration: configuration, backgroundLogger: logger)
    }

    /// Runs the client's connection pool until the task is cancelled (or, in a `ServiceGroup`,
    /// until graceful shutdown).
    public func run() async {
        await client.run()
    }

    /// True once `migrate()` has succeeded in this process.
    public var isMigrated: Bool { migrated.withLock { $0 } }

    // MARK: - Queries

    /// Runs one statement on a pooled connection and returns every row.
    ///
    /// A statement that may write (anything but a `SELECT`) runs between BEGIN and COMMIT: alone,
    /// the extended protocol reports it complete (CommandComplete) before the implicit
    /// transaction commits at Sync, and a server that dies in between flushes that report on its
    /// way out — a success for a change that was never committed (a 250 for a lost message, a
    /// delivery recorded for a mailbox row that is gone). COMMIT's own reply comes only once the
    /// commit is durable.
    @discardableResult
    public func query(_ query: PostgresQuery) async throws -> [PostgresRow] {
        guard Self.isReadOnly(query.sql) else {
            return try await transaction { transaction in try await transaction.query(query) }
        }
        return try await withConnection(checked: true, limit: limits.operation) { connection, logger in
            try await connection.query(query, logger: logger).collect()
        }
    }

    /// A plain `SELECT` (no `FOR UPDATE`, which only makes sense in a transaction anyway).
    static func isReadOnly(_ sql: String) -> Bool {
        let start = sql.drop { $0.isWhitespace }.prefix(7).uppercased()
        return start.hasPrefix("SELECT") && (start.count == 6 || start.last.map { $0.isWhitespace || $0 == "(" } == true)
    }

    /// Runs `body` between BEGIN and COMMIT on one connection; ROLLBACK when it throws, and its
    /// error is rethrown as it was.
    public func transaction<Result: Sendable>(_ body: @Sendable (PostgresTransaction) async throws -> Result) async throws -> Result {
        try await transaction(checked: true, limit: limits.operation, body)
    }

    private func transaction<Result: Sendable>(
        checked: Bool, limit: Duration?, _ body: @Sendable (PostgresTransaction) async throws -> Result
    ) async throws -> Result {
        try await withConnection(checked: checked, limit: limit) { connection, logger in
            let transaction = PostgresTransaction(connection: connection, logger: logger)
            try await transaction.query("BEGIN")
            do {
                let result = try await body(transaction)
                try await transaction.query("COMMIT")
                return result
            } catch {
                _ = try? await transaction.query("ROLLBACK")
                throw error
            }
        }
    }

    /// Leases a connection for `body` within the bounds (see the type's documentation): the
    /// lease and `body` race a timer; when the timer wins, the lease request is abandoned, or the
    /// connection closed under `body`, and a `PostgresDatabaseError` is thrown. PostgresNIO's
    /// errors become `PostgresDatabaseError`s; `body`'s own errors pass through.
    ///
    /// The lease runs in a task of its own, which is not waited for once abandoned: the pool does
    /// not always end a waiting lease request promptly when it is cancelled (seen while it was
    /// reconnecting), and the answer must not wait for it. `body` sits in a slot that either the
    /// lease takes (and then runs it) or the timer empties (and then it never runs): exactly one
    /// of them, under the slot's lock. A lease granted after that finds the slot empty and hands
    /// its connection back at once.
    private func withConnection<Result: Sendable>(
        checked: Bool, limit: Duration?, _ body: @Sendable (PostgresConnection, Logger) async throws -> Result
    ) async throws -> Result {
        if checked, !isMigrated {
            throw PostgresDatabaseError(.notMigrated, "the database schema has not been migrated yet")
        }
        let wait = limits.connectionWait
        let (client, logger) = (self.client, self.logger)
        return try await withoutActuallyEscaping(body) { body in
            let slot = WorkSlot(body)
            let outcome = FirstOffer<Swift.Result<Result, any Error>>()
            let bodyReturned = Mutex(false)
            let lease = Task {
                do {
                    // `body`'s outcome is offered inside; what reaches the catch without one is
                    // the pool's own failure (or an abandoned lease).
                    _ = try await client.withConnection { connection in
                        var work = slot.take()
                        guard work != nil else {
                            throw CancellationError()  // abandoned: the connection goes back to the pool
                        }
                        // The outcome is known as soon as `body` returns, before the pool has the
                        // connection back: handing it back is the pool's business, not waited for.
                        // (`work` is dropped first: after that nothing here holds `body`.)
                        let result: Swift.Result<Result, any Error>
                        do {
                            result = .success(
                                try await withTaskCancellationHandler {
                                    try await work!(connection, logger)
                                } onCancel: {
                                    connection.close()  // fails a statement that hangs; the pool drops the connection
                                })
                        } catch {
                            result = .failure(error)
                        }
                        work = nil
                        bodyReturned.withLock { $0 = true }
                        outcome.offer(result)
                        return try result.get()
                    }
                } catch {
                    outcome.offer(.failure(error))
                }
            }
            let timer = Task {
                guard (try? await Task.sleep(for: wait)) != nil else { return }
                if slot.take() != nil {
                    outcome.offer(.failure(PostgresDatabaseError(.unavailable, "no connection to PostgreSQL within \(Self.seconds(wait))")))
                    return
                }
                guard let limit, (try? await Task.sleep(for: limit - wait)) != nil else { return }
                outcome.offer(.failure(PostgresDatabaseError(.timedOut, "PostgreSQL did not answer within \(Self.seconds(limit))")))
            }
            let result = await withTaskCancellationHandler {
                await outcome.value()
            } onCancel: {
                outcome.offer(.failure(CancellationError()))
            }
            timer.cancel()
            let started = slot.take() == nil
            if started {
                // `body` ran or runs: stop it (closing its connection) and, unless it has returned
                // already, wait, as it holds `body`.
                lease.cancel()
                if !bodyReturned.withLock({ $0 }) { _ = await lease.result }
            } else {
                lease.cancel()  // not waited for: it can no longer reach `body`
            }
            switch result {
            case .success(let value):
                return value
            case .failure(let error as PSQLError):
                throw PostgresDatabaseError(error, beforeConnection: !started)
            case .failure(let error as PostgresDatabaseError):
                throw error
            case .failure(let error) where !started && !(error is CancellationError):
                // The pool's own errors (its circuit breaker is open, it was shut down).
                throw PostgresDatabaseError(.unavailable, "no connection to PostgreSQL (\(error))")
            case .failure(let error):
                throw error
            }
        }
    }

    /// Holds a value until the first `take()`.
    private final class WorkSlot<Work: Sendable>: Sendable {
        private let work: Mutex<Work?>
        init(_ work: Work) { self.work = Mutex(work) }
        /// The value the first time, nil after.
        func take() -> Work? { work.withLock { work in defer { work = nil }; return work } }
    }

    static func seconds(_ duration: Duration) -> String {
        let (seconds, attoseconds) = duration.components
        return attoseconds == 0 ? "\(seconds) s" : "\(Double(seconds) + Double(attoseconds) / 1e18) s"
    }

    // MARK: - Migrations

    /// `migrations[i]` brings the schema from version `i` to `i + 1`. Append; never edit one that shipped.
    /// The tables are those of the SQLite schema (`SQLiteSchema`), with the same columns, in
    /// PostgreSQL's types; the version numbers of the two schemas are their own.
    public static let migrations: [[String]] = [
        // Version 1: the database mailbox store (see `PostgresMailboxStore`).
        [
            """
            CREATE TABLE messages (
                id BIGSERIAL PRIMARY KEY,
                message_id TEXT NOT NULL,
                "user" TEXT NOT NULL,
                folder TEXT NOT NULL,
                from_addr TEXT,
                to_addrs TEXT,
                subject TEXT,
                date TIMESTAMPTZ NOT NULL,
                size BIGINT NOT NULL,
                flags TEXT NOT NULL DEFAULT '',
                body BYTEA,
                headers TEXT,
                location TEXT,
                search TSVECTOR NOT NULL DEFAULT ''::tsvector,
                UNIQUE ("user", folder, message_id)
            )
            """,
            #"CREATE INDEX idx_messages_user ON messages ("user")"#,
            #"CREATE INDEX idx_messages_folder ON messages ("user", folder, date)"#,
            "CREATE INDEX idx_messages_date ON messages (date)",
            "CREATE INDEX idx_messages_location ON messages (location) WHERE location IS NOT NULL",
            "CREATE INDEX idx_messages_search ON messages USING GIN (search)",
        ],
        // Version 2: users, the queue and the webhook outbox — SQLite's versions 1 and 3.
        // Times are BIGINT Unix seconds, as in SQLite, so that both adapters store and return
        // the same values (rounded down to the second) with the same SQL shape; booleans are
        // BOOLEAN. Email addresses are unique ignoring ASCII case, as SQLite's COLLATE NOCASE:
        // `lower()` under the "C" collation folds A-Z only, whatever the database's locale.
        [
            """
            CREATE TABLE users (
                id BIGSERIAL PRIMARY KEY,
                username TEXT NOT NULL CONSTRAINT users_username_key UNIQUE,
                email TEXT NOT NULL,
                password_hash TEXT NOT NULL,
                quota_mb INTEGER NOT NULL DEFAULT 1000,
                is_admin BOOLEAN NOT NULL DEFAULT false,
                enabled BOOLEAN NOT NULL DEFAULT true,
                created_at BIGINT NOT NULL,
                last_login BIGINT
            )
            """,
            #"CREATE UNIQUE INDEX users_email_key ON users (lower(email COLLATE "C"))"#,
            """
            CREATE TABLE queue_messages (
                id TEXT PRIMARY KEY,
                blob_key TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                size_bytes BIGINT NOT NULL,
                mail_from TEXT NOT NULL,
                subject TEXT,
                smtputf8 BOOLEAN NOT NULL DEFAULT false,
                body_type TEXT,
                ret TEXT,
                envid TEXT,
                deliver_by BIGINT,
                by_mode TEXT,
                client_ip TEXT,
                helo TEXT,
                auth_user TEXT,
                created_at BIGINT NOT NULL
            )
            """,
            """
            CREATE TABLE queue_recipients (
                id BIGSERIAL PRIMARY KEY,
                message_id TEXT NOT NULL REFERENCES queue_messages (id) ON DELETE CASCADE,
                recipient TEXT NOT NULL,
                domain TEXT NOT NULL,
                is_local BOOLEAN NOT NULL,
                status TEXT NOT NULL DEFAULT 'pending',
                attempts INTEGER NOT NULL DEFAULT 0,
                max_attempts INTEGER NOT NULL DEFAULT 5,
                next_retry BIGINT NOT NULL,
                deliver_by BIGINT,
                last_error TEXT,
                lease_token TEXT,
                lease_until BIGINT,
                delivery_key TEXT,
                UNIQUE (message_id, recipient)
            )
            """,
            "CREATE INDEX idx_queue_recipients_due ON queue_recipients (status, next_retry)",
            "CREATE INDEX idx_queue_recipients_domain ON queue_recipients (domain)",
            // `payload` is TEXT, not JSONB: the webhook is signed over the exact bytes stored.
            """
            CREATE TABLE events (
                id TEXT PRIMARY KEY,
                type TEXT NOT NULL,
                payload TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt BIGINT,
                delivered_at BIGINT,
                last_error TEXT
            )
            """,
            "CREATE INDEX idx_events_undelivered ON events (next_attempt) WHERE delivered_at IS NULL",
        ],
    ]

    /// The version this build writes.
    public static var currentVersion: Int { migrations.count }

    /// The `pg_advisory_xact_lock` key that serialises migrators (ASCII `MailTier`).
    static let migrationLockKey: Int64 = 0x4D61_696C_5469_6572

    /// Applies every missing migration and returns the versions it applied (empty when the
    /// schema was current), in one transaction that first takes a transaction-level advisory
    /// lock: two processes starting together migrate once (the second waits, then finds nothing
    /// to do), and the lock cannot outlive a failed migration. Applied versions are rows of
    /// `schema_migrations`. Throws `PostgresMigrationError` when the schema was written by a
    /// newer version, `PostgresDatabaseError` when PostgreSQL cannot be reached (within
    /// `Limits.connectionWait`) or refuses. Once it has succeeded, `query` and `transaction` work.
    @discardableResult
    public func migrate() async throws -> [Int] {
        let schema = self.schema
        let applied = try await transaction(checked: false, limit: nil) { transaction in
            try await transaction.query("SELECT pg_advisory_xact_lock(\(Self.migrationLockKey))")
            if let schema {
                // `schema` is a checked plain identifier (init).
                try await transaction.query("CREATE SCHEMA IF NOT EXISTS \(unescaped: schema)")
            }
            try await transaction.query(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            var present = Set<Int>()
            for row in try await transaction.query("SELECT version FROM schema_migrations") {
                present.insert(try row.decode(Int.self))
            }
            if let newest = present.max(), newest > Self.currentVersion {
                throw PostgresMigrationError(
                    "database schema version \(newest) is newer than this program's (\(Self.currentVersion))")
            }
            var applied: [Int] = []
            for (index, statements) in Self.migrations.enumerated() where !present.contains(index + 1) {
                for statement in statements {
                    try await transaction.query(PostgresQuery(unsafeSQL: statement))
                }
                try await transaction.query("INSERT INTO schema_migrations (version) VALUES (\(index + 1))")
                applied.append(index + 1)
            }
            return applied
        }
        migrated.withLock { $0 = true }
        return applied
    }

    /// The applied versions, ascending.
    public func appliedMigrations() async throws -> [Int] {
        try await query("SELECT version FROM schema_migrations ORDER BY version").map { try $0.decode(Int.self) }
    }

    // MARK: - URL

    /// The client configuration for `postgres://user[:password]@host[:port]/database[?sslmode=…]`
    /// (`postgresql://` too; user, password and database are percent-decoded; port 5432 by default).
    ///
    /// TLS: `sslmode=disable` — none; `prefer` — TLS when the server offers it; `require`,
    /// `verify-ca`, `verify-full` — TLS required, with the certificate and host name verified
    /// against the system's roots (stricter than libpq's `require`). Without `sslmode`: none for a
    /// loopback host (`127.0.0.0/8`, `::1`, `localhost`), `prefer` otherwise. Any other query
    /// parameter is an error. Error messages never contain the URL (it holds the password).
    public static func configuration(url text: String) throws -> PostgresClient.Configuration {
        guard let components = URLComponents(string: text) else { throw PostgresURLError("database URL is not a URL") }
        guard let scheme = components.scheme?.lowercased(), scheme == "postgres" || scheme == "postgresql" else {
            throw PostgresURLError("database URL must start with postgres:// or postgresql://")
        }
        guard var host = components.host, !host.isEmpty else { throw PostgresURLError("database URL has no host") }
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        guard let username = components.user, !username.isEmpty else { throw PostgresURLError("database URL has no user name") }
        let port = components.port ?? 5432
        guard (1...65_535).contains(port) else { throw PostgresURLError("database URL port is out of range") }
        var database = components.path
        if database.hasPrefix("/") { database.removeFirst() }
        if database.contains("/") { throw PostgresURLError("database URL path must be a single database name") }

        var sslmode: String?
        for item in components.queryItems ?? [] {
            guard item.name == "sslmode" else { throw PostgresURLError("database URL parameter '\(item.name)' is not supported") }
            sslmode = item.value ?? ""
        }
        let tls: PostgresClient.Configuration.TLS
        switch sslmode {
        case nil:
            tls = isLoopback(host) ? .disable : .prefer(.makeClientConfiguration())
        case "disable":
            tls = .disable
        case "allow", "prefer":
            tls = .prefer(.makeClientConfiguration())
        case "require", "verify-ca", "verify-full":
            tls = .require(.makeClientConfiguration())
        case let other?:
            throw PostgresURLError("database URL sslmode '\(other)' is not one of disable, prefer, require, verify-ca, verify-full")
        }
        return PostgresClient.Configuration(
            host: host, port: port, username: username, password: components.password,
            database: database.isEmpty ? nil : database, tls: tls)
    }

    static func isLoopback(_ host: String) -> Bool {
        let lower = host.lowercased()
        return lower == "localhost" || lower == "::1" || lower.hasPrefix("127.")
    }

    static func isPlainIdentifier(_ name: String) -> Bool {
        let bytes = Array(name.utf8)
        guard (1...63).contains(bytes.count), !(UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[0]) else { return false }
        return bytes.allSatisfy {
            (UInt8(ascii: "a")...UInt8(ascii: "z")).contains($0) || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0)
                || $0 == UInt8(ascii: "_")
        }
    }
}

/// One connection inside `PostgresDatabase.transaction`. Not Sendable: it must not leave the closure.
public struct PostgresTransaction {
    let connection: PostgresConnection
    let logger: Logger

    /// Runs one statement and returns every row.
    @discardableResult
    public func query(_ query: PostgresQuery) async throws -> [PostgresRow] {
        try await connection.query(query, logger: logger).collect()
    }
}

@available(*, unavailable)
extension PostgresTransaction: Sendable {}

/// A database URL (or schema name) that cannot be used; the message never contains the URL.
public struct PostgresURLError: Error, Sendable, Equatable, CustomStringConvertible {
    public var description: String

    public init(_ description: String) {
        self.description = description
    }
}

/// The schema cannot be brought to this program's version.
public struct PostgresMigrationError: Error, Sendable, Equatable, CustomStringConvertible {
    public var description: String

    public init(_ description: String) {
        self.description = description
    }
}

/// A PostgreSQL operation that failed. Every case is transient for the callers (451, retry).
/// `description` is one line for an operator: what failed, with PostgreSQL's message or the
/// network error — never the URL, a password or a statement's values.
public struct PostgresDatabaseError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// No connection within `Limits.connectionWait`: PostgreSQL is down or unreachable, or
        /// every pooled connection stayed busy.
        case unavailable
        /// The operation took longer than `Limits.operation`; its connection was closed.
        case timedOut
        /// `migrate()` has not succeeded yet in this process.
        case notMigrated
        /// PostgreSQL refused the statement (`sqlState`, `constraint`).
        case refused
        /// The connection failed or closed during the operation.
        case connectionLost
    }

    public var kind: Kind
    /// The SQLSTATE of a refusal, e.g. `23505` for a unique violation.
    public var sqlState: String?
    /// The constraint (or unique index) a refusal names.
    public var constraint: String?
    public var description: String

    public init(_ kind: Kind, _ description: String, sqlState: String? = nil, constraint: String? = nil) {
        self.kind = kind
        self.description = description
        self.sqlState = sqlState
        self.constraint = constraint
    }

    /// From PostgresNIO's error, keeping the server's SQLSTATE, constraint and message (not its
    /// detail, which quotes values) or the underlying network error.
    init(_ error: PSQLError, beforeConnection: Bool) {
        if let info = error.serverInfo, error.code == .server {
            let state = info[.sqlState]
            let message = info[.message] ?? "error"
            self.init(
                .refused, "PostgreSQL: \(message)\(state.map { " (SQLSTATE \($0))" } ?? "")", sqlState: state,
                constraint: info[.constraintName])
            if beforeConnection { kind = .unavailable }
            return
        }
        let cause = error.underlying.map { "\($0)" } ?? "\(error.code)"
        if beforeConnection {
            self.init(.unavailable, "cannot connect to PostgreSQL: \(cause)")
        } else {
            self.init(.connectionLost, "PostgreSQL connection failed: \(cause)")
        }
    }

    /// SQLSTATE 23505.
    public var isUniqueViolation: Bool { sqlState == "23505" }
}
