#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOCore

// The ports of the domain: what the role services need from the outside world.
// Adapters (SQLite, PostgreSQL, files, S3, Redis, ...) implement them; nothing
// in this module knows which adapter it talks to.

/// An account: a local mailbox owner and, with `isAdmin`, an administrator.
public struct User: Sendable, Equatable {
    public var id: Int64
    public var username: String
    public var email: String
    /// Argon2id PHC string: `$argon2id$v=19$m=65536,t=3,p=4$<salt>$<hash>`.
    public var passwordHash: String
    public var quotaMB: Int
    public var isAdmin: Bool
    public var enabled: Bool
    public var createdAt: Date
    public var lastLogin: Date?

    public init(
        id: Int64, username: String, email: String, passwordHash: String, quotaMB: Int,
        isAdmin: Bool, enabled: Bool, createdAt: Date, lastLogin: Date?
    ) {
        self.id = id
        self.username = username
        self.email = email
        self.passwordHash = passwordHash
        self.quotaMB = quotaMB
        self.isAdmin = isAdmin
        self.enabled = enabled
        self.createdAt = createdAt
        self.lastLogin = lastLogin
    }
}

public enum UserStoreError: Error, Equatable, Sendable {
    case duplicateUsername
    case duplicateEmail
    case notFound
}

/// Where accounts live (the `users` table of DESIGN.md).
public protocol UserStore: Sendable {
    /// Inserts a user; `createdAt` is now. Throws `UserStoreError.duplicateUsername` / `.duplicateEmail`.
    func create(username: String, email: String, passwordHash: String, quotaMB: Int, isAdmin: Bool) async throws -> User
    func user(named username: String) async throws -> User?
    /// Case-insensitive match on the email address.
    func user(email: String) async throws -> User?
    /// Ordered by id.
    func list(offset: Int, limit: Int) async throws -> (users: [User], total: Int)
    /// Writes every field but `id` and `createdAt`. Throws `UserStoreError.notFound`, `.duplicateEmail`.
    func update(_ user: User) async throws
    /// Returns false when there was no such user.
    func delete(username: String) async throws -> Bool
    func recordLogin(username: String, at date: Date) async throws
    func count() async throws -> Int
}

/// Password hashing (Argon2id in production).
public protocol PasswordHasher: Sendable {
    func hash(_ password: String) async throws -> String
    /// False for a wrong password and for a malformed hash; never throws for those.
    func verify(_ password: String, against encodedHash: String) async throws -> Bool
}

/// Durable storage for accepted message bodies (the spool: a directory or S3).
public protocol BlobStore: Sendable {
    /// Returns only when the blob is durable (fsync'd and renamed, or acknowledged by S3).
    func put(key: String, data: ByteBuffer) async throws
    func get(key: String) async throws -> ByteBuffer
    /// Deleting a missing blob is not an error.
    func delete(key: String) async throws
    /// Every blob with its last modification time, for garbage collection of orphans.
    func list() async throws -> [(key: String, modified: Date)]
}

/// Local mailboxes (maildir, mbox, database, timeseries, s3).
public protocol MailboxStore: Sendable {
    /// A fresh key for one delivery job, generated once when a job is first claimed and
    /// kept with the job, so that a retried delivery reuses it (idempotency).
    func makeDeliveryKey() -> String
    /// Stores `message` in the INBOX of `mailbox` (an email address). A second call with the
    /// same `deliveryKey` and mailbox stores nothing and returns false; otherwise returns true.
    /// Returns only when the message is durable.
    func deliver(_ message: ByteBuffer, to mailbox: String, deliveryKey: String) async throws -> Bool
    /// Bytes used by the mailbox, for `used_mb` and quotas.
    func usageBytes(of mailbox: String) async throws -> Int64
}
