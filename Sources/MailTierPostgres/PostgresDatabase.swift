#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import NIOCore
import PostgresNIO
import ServiceLifecycle

/// A PostgreSQL database: a `PostgresClient` (a connection pool) made from a
/// `postgres://user:password@host:port/database` URL, and the schema's migrations.
///
/// The client does nothing until `run()` runs in a long-lived task (a `ServiceGroup`, or a
/// task group that cancels it at the end); cancelling `run()` closes the pool. Queries made
/// before `run()` starts wait for it.
///
/// With `schema`, every connection starts with `search_path` set to it (and `migrate()` creates
/// it): the tests give each case its own schema.
public final class PostgresDatabase: Service, Sendable {
    public let client: PostgresClient
    /// The schema every connection uses, or nil for the server's default search path.
    public let schema: String?
    /// Passed to the queries.
    public let logger: Logger

    /// Parses `url` with `configuration(url:)`. Throws `PostgresURLError` for a bad URL and for a
    /// schema that is not a plain lower-case identifier.
    public convenience init(url: String, schema: String? = nil, logger: Logger = Logger(label: "mailtier.postgres")) throws {
        try self.init(configuration: Self.configuration(url: url), schema: schema, logger: logger)
    }

    public init(configuration: PostgresClient.Configuration, schema: String? = nil, logger: Logger = Logger(label: "mailtier.postgres")) throws {
        var configuration = configuration
        if let schema {
            guard Self.isPlainIdentifier(schema) else {
                throw PostgresURLError("schema name must be 1-63 of [a-z0-9_], not starting with a digit")
            }
            configuration.options.additionalStartupParameters.append(("search_path", schema))
        }
        self.schema = schema
        self.logger = logger
        self.client = PostgresClient(configuration: configuration, backgroundLogger: logger)
    }

    /// Runs the client's connection pool until the task is cancelled (or, in a `ServiceGroup`,
    /// until graceful shutdown).
    public func run() async {
        await client.run()
    }

    // MARK: - Queries

    /// Runs one statement on a pooled connection and returns every row.
    @discardableResult
    public func query(_ query: PostgresQuery) async throws -> [PostgresRow] {
        try await client.query(query, logger: logger).collect()
    }

    /// Runs `body` between BEGIN and COMMIT on one connection; ROLLBACK when it throws, and its
    /// error is rethrown as it was.
    public func transaction<Result: Sendable>(_ body: (PostgresTransaction) async throws -> Result) async throws -> Result {
        try await client.withConnection { connection in
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

    // MARK: - Migrations

    /// `migrations[i]` brings the schema from version `i` to `i + 1`. Append; never edit one that shipped.
    /// The tables are those of the SQLite schema (`SQLiteSchema`), in PostgreSQL's types.
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
        ]
    ]

    /// The version this build writes.
    public static var currentVersion: Int { migrations.count }

    /// The `pg_advisory_xact_lock` key that serialises migrators (ASCII `MailTier`).
    static let migrationLockKey: Int64 = 0x4D61_696C_5469_6572

    /// Applies every missing migration, in one transaction that first takes a transaction-level
    /// advisory lock: two processes starting together migrate once (the second waits, then finds
    /// nothing to do), and the lock cannot outlive a failed migration. Applied versions are rows
    /// of `schema_migrations`. Throws when the schema was written by a newer version.
    public func migrate() async throws {
        try await transaction { transaction in
            try await transaction.query("SELECT pg_advisory_xact_lock(\(Self.migrationLockKey))")
            if let schema {
                // `schema` is a checked plain identifier (init).
                try await transaction.query("CREATE SCHEMA IF NOT EXISTS \(unescaped: schema)")
            }
            try await transaction.query(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            var applied = Set<Int>()
            for row in try await transaction.query("SELECT version FROM schema_migrations") {
                applied.insert(try row.decode(Int.self))
            }
            if let newest = applied.max(), newest > Self.currentVersion {
                throw PostgresMigrationError(
                    "database schema version \(newest) is newer than this program's (\(Self.currentVersion))")
            }
            for (index, statements) in Self.migrations.enumerated() where !applied.contains(index + 1) {
                for statement in statements {
                    try await transaction.query(PostgresQuery(unsafeSQL: statement))
                }
                try await transaction.query("INSERT INTO schema_migrations (version) VALUES (\(index + 1))")
            }
        }
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
