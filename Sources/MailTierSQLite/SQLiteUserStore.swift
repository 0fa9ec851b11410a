#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import MailTier

/// `UserStore` over the `users` table. With `.userCreated` in `recording`, `create` writes a
/// `user.created` event into `events` in the insert's transaction.
public struct SQLiteUserStore: UserStore {
    public let database: SQLiteDatabase
    public let recording: Set<WebhookEvent>

    public init(database: SQLiteDatabase, recording: Set<WebhookEvent> = WebhookEvent.all) {
        self.database = database
        self.recording = recording
    }

    static let columns = "id, username, email, password_hash, quota_mb, is_admin, enabled, created_at, last_login"

    public func create(username: String, email: String, passwordHash: String, quotaMB: Int, isAdmin: Bool) async throws
        -> User
    {
        let createdAt = Self.now()
        let recording = self.recording
        return try await database.write { connection in
            let user = try Self.insert(
                connection, username: username, email: email, passwordHash: passwordHash, quotaMB: quotaMB,
                isAdmin: isAdmin, createdAt: createdAt)
            try SQLiteEventOutbox.insert(OutboxEvent.filter([.userCreated(user)], recording: recording), connection)
            return user
        }
    }

    public func user(named username: String) async throws -> User? {
        try await database.read { connection in try Self.user(connection, named: username) }
    }

    public func user(email: String) async throws -> User? {
        try await database.read { connection in try Self.user(connection, email: email) }
    }

    public func list(offset: Int, limit: Int) async throws -> (users: [User], total: Int) {
        let result = try await database.read { connection in
            try Self.list(connection, offset: offset, limit: limit)
        }
        return (result.users, result.total)
    }

    public func update(_ user: User) async throws {
        try await database.write { connection in try Self.update(connection, user) }
    }

    public func delete(username: String) async throws -> Bool {
        try await database.write { connection in try Self.delete(connection, username: username) }
    }

    public func recordLogin(username: String, at date: Date) async throws {
        try await database.write { connection in try Self.recordLogin(connection, username: username, at: date) }
    }

    public func count() async throws -> Int {
        try await database.read { connection in try Self.count(connection) }
    }

    // MARK: - The statements, on a connection (usable inside a larger transaction)

    public static func insert(
        _ connection: SQLiteConnection, username: String, email: String, passwordHash: String, quotaMB: Int,
        isAdmin: Bool, createdAt: Date
    ) throws -> User {
        let created = Int64(createdAt.timeIntervalSince1970.rounded(.down))
        do {
            try connection.execute(
                """
                INSERT INTO users (username, email, password_hash, quota_mb, is_admin, enabled, created_at)
                VALUES (?, ?, ?, ?, ?, 1, ?)
                """,
                [.text(username), .text(email), .text(passwordHash), .integer(Int64(quotaMB)), .bool(isAdmin),
                 .integer(created)])
        } catch let error as SQLiteError {
            throw Self.mapConstraint(error)
        }
        return User(
            id: connection.lastInsertRowID, username: username, email: email, passwordHash: passwordHash,
            quotaMB: quotaMB, isAdmin: isAdmin, enabled: true,
            createdAt: Date(timeIntervalSince1970: TimeInterval(created)), lastLogin: nil)
    }

    public static func user(_ connection: SQLiteConnection, named username: String) throws -> User? {
        try connection.query("SELECT \(columns) FROM users WHERE username = ?", [.text(username)]).first
            .map(Self.decode)
    }

    public static func user(_ connection: SQLiteConnection, email: String) throws -> User? {
        // The column is COLLATE NOCASE, so `=` ignores ASCII case.
        try connection.query("SELECT \(columns) FROM users WHERE email = ?", [.text(email)]).first.map(Self.decode)
    }

    public static func list(_ connection: SQLiteConnection, offset: Int, limit: Int) throws -> (
        users: [User], total: Int
    ) {
        let rows = try connection.query(
            "SELECT \(columns) FROM users ORDER BY id LIMIT ? OFFSET ?",
            [.integer(Int64(max(0, limit))), .integer(Int64(max(0, offset)))])
        return (rows.map(Self.decode), try count(connection))
    }

    public static func update(_ connection: SQLiteConnection, _ user: User) throws {
        do {
            try connection.execute(
                """
                UPDATE users SET username = ?, email = ?, password_hash = ?, quota_mb = ?, is_admin = ?,
                    enabled = ?, last_login = ?
                WHERE id = ?
                """,
                [.text(user.username), .text(user.email), .text(user.passwordHash), .integer(Int64(user.quotaMB)),
                 .bool(user.isAdmin), .bool(user.enabled), .optionalInteger(user.lastLogin.map(Self.seconds)),
                 .integer(user.id)])
        } catch let error as SQLiteError {
            throw Self.mapConstraint(error)
        }
        if connection.changes == 0 { throw UserStoreError.notFound }
    }

    public static func delete(_ connection: SQLiteConnection, username: String) throws -> Bool {
        try connection.execute("DELETE FROM users WHERE username = ?", [.text(username)])
        return connection.changes > 0
    }

    /// Throws `UserStoreError.notFound` when there is no such user.
    public static func recordLogin(_ connection: SQLiteConnection, username: String, at date: Date) throws {
        try connection.execute(
            "UPDATE users SET last_login = ? WHERE username = ?", [.integer(seconds(date)), .text(username)])
        if connection.changes == 0 { throw UserStoreError.notFound }
    }

    public static func count(_ connection: SQLiteConnection) throws -> Int {
        Int(try connection.query("SELECT COUNT(*) AS n FROM users").first?.int("n") ?? 0)
    }

    // MARK: - Mapping

    static func decode(_ row: SQLiteRow) -> User {
        User(
            id: row.int("id") ?? 0,
            username: row.string("username") ?? "",
            email: row.string("email") ?? "",
            passwordHash: row.string("password_hash") ?? "",
            quotaMB: Int(row.int("quota_mb") ?? 0),
            isAdmin: (row.int("is_admin") ?? 0) != 0,
            enabled: (row.int("enabled") ?? 0) != 0,
            createdAt: Date(timeIntervalSince1970: TimeInterval(row.int("created_at") ?? 0)),
            lastLogin: row.int("last_login").map { Date(timeIntervalSince1970: TimeInterval($0)) })
    }

    /// UNIQUE violations on `users.username` / `users.email` become `UserStoreError`s.
    static func mapConstraint(_ error: SQLiteError) -> any Error {
        guard error.isUniqueViolation else { return error }
        if error.message.contains("users.username") { return UserStoreError.duplicateUsername }
        if error.message.contains("users.email") { return UserStoreError.duplicateEmail }
        return error
    }

    static func seconds(_ date: Date) -> Int64 {
        Int64(date.timeIntervalSince1970.rounded(.down))
    }

    static func now() -> Date { Date() }
}
