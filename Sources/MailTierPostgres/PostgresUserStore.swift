#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import MailTier
import PostgresNIO

/// `UserStore` over the `users` table of `PostgresDatabase.migrations` (version 2). It behaves
/// as `SQLiteUserStore` does: usernames are exact, email addresses unique and matched ignoring
/// ASCII case (`lower(email COLLATE "C")`, SQLite's NOCASE), times are whole seconds, and a
/// duplicate username or email address throws `UserStoreError.duplicateUsername` /
/// `.duplicateEmail`. Ids come from a sequence: increasing, but a refused insert uses one up.
/// With `.userCreated` in `recording`, `create` writes a `user.created` event into `events` in
/// the insert's transaction.
public struct PostgresUserStore: UserStore {
    public let database: PostgresDatabase
    public let recording: Set<WebhookEvent>

    public init(database: PostgresDatabase, recording: Set<WebhookEvent> = WebhookEvent.all) {
        self.database = database
        self.recording = recording
    }

    /// In the order `decode` reads them.
    static let columns = "id, username, email, password_hash, quota_mb, is_admin, enabled, created_at, last_login"

    public func create(username: String, email: String, passwordHash: String, quotaMB: Int, isAdmin: Bool) async throws -> User {
        let createdAt = Date().unixSeconds
        let recording = self.recording
        return try await mapped {
            try await database.transaction { transaction in
                let rows = try await transaction.query(
                    """
                    INSERT INTO users (username, email, password_hash, quota_mb, is_admin, enabled, created_at)
                    VALUES (\(username), \(email), \(passwordHash), \(quotaMB), \(isAdmin), true, \(createdAt))
                    RETURNING \(unescaped: Self.columns)
                    """)
                guard let row = rows.first else { throw PostgresDatabaseError(.refused, "INSERT INTO users returned no row") }
                let user = try Self.decode(row)
                try await PostgresEventOutbox.insert(OutboxEvent.filter([.userCreated(user)], recording: recording), transaction)
                return user
            }
        }
    }

    public func user(named username: String) async throws -> User? {
        try await database.query("SELECT \(unescaped: Self.columns) FROM users WHERE username = \(username)").first.map(Self.decode)
    }

    public func user(email: String) async throws -> User? {
        try await database.query(
            #"SELECT \#(unescaped: Self.columns) FROM users WHERE lower(email COLLATE "C") = lower(\#(email) COLLATE "C")"#
        ).first.map(Self.decode)
    }

    public func list(offset: Int, limit: Int) async throws -> (users: [User], total: Int) {
        // One statement, so the page and its total are one snapshot; the LEFT JOIN keeps one
        // row (of NULLs) for the total when the page is empty.
        let rows = try await database.query(
            """
            SELECT page.*, (SELECT COUNT(*) FROM users) AS total
            FROM (SELECT 1) AS one LEFT JOIN LATERAL (
                SELECT \(unescaped: Self.columns) FROM users ORDER BY id LIMIT \(max(0, limit)) OFFSET \(max(0, offset))
            ) AS page ON true
            ORDER BY page.id
            """)
        var users: [User] = []
        var total = 0
        for row in rows {
            let cells = row.makeRandomAccess()
            total = Int(try cells["total"].decode(Int64.self))
            if try cells["id"].decode(Int64?.self) != nil { users.append(try Self.decode(row)) }
        }
        return (users, total)
    }

    public func update(_ user: User) async throws {
        let rows = try await mapped {
            try await database.query(
                """
                UPDATE users SET username = \(user.username), email = \(user.email), password_hash = \(user.passwordHash),
                    quota_mb = \(user.quotaMB), is_admin = \(user.isAdmin), enabled = \(user.enabled),
                    last_login = \(user.lastLogin?.unixSeconds)
                WHERE id = \(user.id)
                RETURNING id
                """)
        }
        if rows.isEmpty { throw UserStoreError.notFound }
    }

    public func delete(username: String) async throws -> Bool {
        try await !database.query("DELETE FROM users WHERE username = \(username) RETURNING id").isEmpty
    }

    public func recordLogin(username: String, at date: Date) async throws {
        let rows = try await database.query(
            "UPDATE users SET last_login = \(date.unixSeconds) WHERE username = \(username) RETURNING id")
        if rows.isEmpty { throw UserStoreError.notFound }
    }

    public func count() async throws -> Int {
        Int(try await database.query("SELECT COUNT(*) FROM users").first?.decode(Int64.self) ?? 0)
    }

    // MARK: - Mapping

    static func decode(_ row: PostgresRow) throws -> User {
        let (id, username, email, passwordHash, quotaMB, isAdmin, enabled, createdAt, lastLogin) = try row.decode(
            (Int64, String, String, String, Int, Bool, Bool, Int64, Int64?).self)
        return User(
            id: id, username: username, email: email, passwordHash: passwordHash, quotaMB: quotaMB, isAdmin: isAdmin,
            enabled: enabled, createdAt: Date(unixSeconds: createdAt), lastLogin: lastLogin.map(Date.init(unixSeconds:)))
    }

    /// Unique violations of `users_username_key` / `users_email_key` become `UserStoreError`s.
    private func mapped<T>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let error as PostgresDatabaseError where error.isUniqueViolation {
            switch error.constraint {
            case "users_username_key": throw UserStoreError.duplicateUsername
            case "users_email_key": throw UserStoreError.duplicateEmail
            default: throw error
            }
        }
    }
}
