import Foundation
import NIOPosix
import PostgresNIO
import Testing

@testable import MailTier
@testable import MailTierPostgres
@testable import MailTierSQLite

/// The two databases the users and queue adapters run on. The user-store, account and queue
/// tests take one as their argument, so every case runs on both.
enum DatabaseBackend: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case sqlite
    case postgres

    var testDescription: String { rawValue }
}

/// A fresh, migrated database for one test: a SQLite file in a temporary directory, or a
/// PostgreSQL schema of its own (`MAILTIER_TEST_POSTGRES_URL`), and its adapters.
struct TestDatabase: Sendable {
    let backend: DatabaseBackend
    let sqlite: SQLiteDatabase?
    let postgres: MailTierPostgres.PostgresDatabase?

    var users: any UserStore {
        if let postgres { return PostgresUserStore(database: postgres) }
        return SQLiteUserStore(database: sqlite!)
    }

    var queue: any MessageQueue {
        if let postgres { return PostgresMessageQueue(database: postgres) }
        return SQLiteMessageQueue(database: sqlite!)
    }

    func users(recording: Set<WebhookEvent>) -> any UserStore {
        if let postgres { return PostgresUserStore(database: postgres, recording: recording) }
        return SQLiteUserStore(database: sqlite!, recording: recording)
    }

    func queue(recording: Set<WebhookEvent>) -> any MessageQueue {
        if let postgres { return PostgresMessageQueue(database: postgres, recording: recording) }
        return SQLiteMessageQueue(database: sqlite!, recording: recording)
    }

    var events: any EventOutbox {
        if let postgres { return PostgresEventOutbox(database: postgres) }
        return SQLiteEventOutbox(database: sqlite!)
    }

    /// Runs one statement of SQL that both databases accept (for checks and for breaking things).
    func execute(_ sql: String) async throws {
        if let postgres {
            try await postgres.query(PostgresQuery(unsafeSQL: sql))
        } else {
            try await sqlite!.write { try $0.execute(sql) }
        }
    }

    /// The first column of the first row of `sql`, an integer (or boolean, as 0/1); nil for no row or NULL.
    func int(_ sql: String) async throws -> Int64? {
        if let postgres {
            guard let cell = try await postgres.query(PostgresQuery(unsafeSQL: sql)).first?.makeRandomAccess()[0] else { return nil }
            if cell.dataType == .bool { return try cell.decode(Bool?.self).map { $0 ? 1 : 0 } }
            return try cell.decode(Int64?.self)
        }
        return try await sqlite!.read { try $0.query(sql).first?.values.first }.flatMap {
            if case .integer(let value) = $0 { return value }
            return nil
        }
    }

    /// The first column of the first row of `sql`, a text; nil for no row or NULL.
    func text(_ sql: String) async throws -> String? {
        if let postgres {
            return try await postgres.query(PostgresQuery(unsafeSQL: sql)).first?.makeRandomAccess()[0].decode(String?.self)
        }
        return try await sqlite!.read { try $0.query(sql).first?.values.first }.flatMap {
            if case .text(let value) = $0 { return value }
            return nil
        }
    }
}

/// A fresh temporary directory, removed after `body`.
func withTemporaryDirectory<T>(_ prefix: String = "mailtier", _ body: (String) async throws -> T) async throws -> T {
    var template = Array((NSTemporaryDirectory() + "/\(prefix)-XXXXXX").utf8CString)
    guard let made = mkdtemp(&template) else { throw POSIXError(.EIO) }
    let directory = String(cString: made)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    return try await body(directory)
}

/// Runs `body` with a fresh database of `backend` (PostgreSQL: its client running, migrated, on a
/// schema dropped afterwards). Without `MAILTIER_TEST_POSTGRES_URL` a PostgreSQL case does nothing
/// — or fails, when `MAILTIER_REQUIRE_SERVICES=1`.
func withTestDatabase(_ backend: DatabaseBackend, _ body: (TestDatabase) async throws -> Void) async throws {
    switch backend {
    case .sqlite:
        try await withTemporaryDirectory("mailtier-db") { directory in
            let database = try SQLiteDatabase(path: directory + "/smtp.db", threadPool: NIOThreadPool.singleton)
            try await body(TestDatabase(backend: .sqlite, sqlite: database, postgres: nil))
        }
    case .postgres:
        guard let url = ExternalBackends.variable("MAILTIER_TEST_POSTGRES_URL") else { return }
        try await withPostgresSchema(url: url) { database in
            try await body(TestDatabase(backend: .postgres, sqlite: nil, postgres: database))
        }
    }
}

extension MailTierPostgres.PostgresDatabase.Limits {
    /// For tests that are not about the bounds: dozens of tests open their pools at once on two
    /// cores, and the first connections can take seconds.
    static let patient = Self(connectionWait: .seconds(30))
}

/// A PostgreSQL client on a schema of its own, running and migrated for `body`; the schema is
/// dropped afterwards.
func withPostgresSchema(
    url: String, limits: MailTierPostgres.PostgresDatabase.Limits = .patient,
    _ body: (MailTierPostgres.PostgresDatabase) async throws -> Void
) async throws {
    let schema = "test_\(UInt64.random(in: 0...UInt64.max))"
    let database = try MailTierPostgres.PostgresDatabase(url: url, schema: schema, limits: limits)
    try await withThrowingDiscardingTaskGroup { group in
        group.addTask { await database.run() }
        defer { group.cancelAll() }
        var failure: (any Error)?
        do {
            try await database.migrate()
            try await body(database)
        } catch {
            failure = error
        }
        try await database.query("DROP SCHEMA IF EXISTS \(unescaped: schema) CASCADE")
        if let failure { throw failure }
    }
}
