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

/// The IMAP-style message flags, with their maildir letters (API.md: S R F T D).
public enum MessageFlag: String, Sendable, Hashable, CaseIterable, Comparable {
    case draft = "D"
    case flagged = "F"
    case replied = "R"
    case seen = "S"
    case trashed = "T"

    public static func < (lhs: MessageFlag, rhs: MessageFlag) -> Bool { lhs.rawValue < rhs.rawValue }

    /// The maildir info letters in ASCII order, e.g. `FS`.
    public static func letters(_ flags: Set<MessageFlag>) -> String { flags.sorted().map(\.rawValue).joined() }

    /// Parses maildir info letters; unknown letters are ignored.
    public static func parse(_ letters: some StringProtocol) -> Set<MessageFlag> {
        Set(letters.compactMap { MessageFlag(rawValue: String($0)) })
    }
}

/// One message to store in one local mailbox.
public struct MailboxDelivery: Sendable, Equatable {
    /// The account's email address, lower case: the mailbox.
    public var mailbox: String
    /// `INBOX` for new mail.
    public var folder: String
    /// The queue id (`msg_…`). With `mailbox` and `folder` it identifies the delivery: a retried
    /// delivery of the same message stores nothing new.
    public var messageID: String
    /// Made by `MailboxStore.makeDeliveryKey()` when the job was first claimed, and kept with the
    /// job across retries (maildir names its file with it).
    public var deliveryKey: String
    /// The reverse path, empty for `<>` (mbox `From ` lines).
    public var sender: String
    /// When the message was accepted (date directories, mbox `From ` lines).
    public var receivedAt: Date
    /// False only when no earlier attempt can have stored this delivery (its key was made for
    /// this attempt): a store may then skip looking for an earlier copy. True when unknown.
    public var mayBeStoredAlready: Bool

    public init(
        mailbox: String, folder: String = "INBOX", messageID: String, deliveryKey: String, sender: String, receivedAt: Date,
        mayBeStoredAlready: Bool = true
    ) {
        self.mailbox = mailbox
        self.folder = folder
        self.messageID = messageID
        self.deliveryKey = deliveryKey
        self.sender = sender
        self.receivedAt = receivedAt
        self.mayBeStoredAlready = mayBeStoredAlready
    }
}

/// A message as a mailbox lists it.
public struct StoredMessage: Sendable, Equatable {
    /// Stable within the mailbox: what `fetch`, `delete` and `setFlags` take.
    public var id: String
    public var folder: String
    public var size: Int
    /// When it was delivered (received).
    public var date: Date
    public var flags: Set<MessageFlag>
    public var subject: String?
    public var from: String?

    public init(id: String, folder: String, size: Int, date: Date, flags: Set<MessageFlag>, subject: String?, from: String?) {
        self.id = id
        self.folder = folder
        self.size = size
        self.date = date
        self.flags = flags
        self.subject = subject
        self.from = from
    }
}

/// Local mailboxes (maildir, mbox, database, timeseries, s3). Mailboxes are account email
/// addresses; folders are `INBOX` and whatever else a store supports.
public protocol MailboxStore: Sendable {
    /// A fresh key for one delivery job, generated once when a job is first claimed and
    /// kept with the job, so that a retried delivery reuses it.
    func makeDeliveryKey() -> String
    /// Stores `content`. A second call for the same delivery (same mailbox, folder and message id,
    /// or the same delivery key) stores nothing and returns false; otherwise returns true.
    /// Returns only when the message is durable.
    func deliver(_ content: ByteBuffer, _ delivery: MailboxDelivery) async throws -> Bool
    /// Oldest first, with the total count of the folder.
    func list(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (messages: [StoredMessage], total: Int)
    /// The message exactly as delivered; nil when there is no such message.
    func fetch(mailbox: String, folder: String, id: String) async throws -> ByteBuffer?
    /// False when there was no such message.
    func delete(mailbox: String, folder: String, id: String) async throws -> Bool
    /// Replaces the flags. False when there is no such message.
    func setFlags(_ flags: Set<MessageFlag>, mailbox: String, folder: String, id: String) async throws -> Bool
    /// Bytes used by the mailbox (all folders), for `used_mb` and quotas.
    func usageBytes(of mailbox: String) async throws -> Int64
    /// Removes the mailbox and every message in it (a deleted account).
    func deleteMailbox(_ mailbox: String) async throws
}

/// A mailbox store with full-text search over subject and body.
public protocol SearchableMailboxStore: MailboxStore {
    /// Messages of the mailbox matching `query` (words, all of which must occur), best first.
    func search(mailbox: String, query: String, limit: Int) async throws -> [StoredMessage]
}

/// Why a mailbox operation failed.
public struct MailboxError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// The mailbox address cannot name a mailbox (path characters, empty).
        case invalidMailbox
        /// The store keeps only INBOX, or the folder name is not allowed.
        case unsupportedFolder
        /// Stored content failed its integrity check (wrong key, tampered file).
        case corrupt
        /// The backend failed; retrying may help.
        case unavailable
    }

    public var kind: Kind
    public var message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }
}
