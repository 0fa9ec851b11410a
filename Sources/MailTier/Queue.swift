#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

/// One accepted message, as the queue records it (`queue_messages`).
public struct QueuedMessage: Sendable, Equatable {
    public var id: String
    public var blobKey: String
    /// Hex SHA-256 of the blob.
    public var sha256: String
    public var sizeBytes: Int
    /// The reverse path, empty for `<>`.
    public var mailFrom: String
    public var subject: String?
    public var smtputf8: Bool
    public var bodyType: String?
    public var deliverBy: Date?
    public var deliverByMode: String?
    public var clientAddress: String
    public var heloName: String
    public var authenticatedUser: String?
    public var createdAt: Date

    public init(
        id: String, blobKey: String, sha256: String, sizeBytes: Int, mailFrom: String, subject: String?, smtputf8: Bool,
        bodyType: String?, deliverBy: Date?, deliverByMode: String?, clientAddress: String, heloName: String,
        authenticatedUser: String?, createdAt: Date
    ) {
        self.id = id
        self.blobKey = blobKey
        self.sha256 = sha256
        self.sizeBytes = sizeBytes
        self.mailFrom = mailFrom
        self.subject = subject
        self.smtputf8 = smtputf8
        self.bodyType = bodyType
        self.deliverBy = deliverBy
        self.deliverByMode = deliverByMode
        self.clientAddress = clientAddress
        self.heloName = heloName
        self.authenticatedUser = authenticatedUser
        self.createdAt = createdAt
    }
}

/// A recipient of a new message: where it goes, decided at RCPT time.
public struct QueuedRecipient: Sendable, Equatable {
    /// The address to deliver to (for a local recipient, the account's mailbox address).
    public var address: String
    public var domain: String
    public var isLocal: Bool

    public init(address: String, domain: String, isLocal: Bool) {
        self.address = address
        self.domain = domain
        self.isLocal = isLocal
    }
}

/// One recipient's delivery, claimed by a worker under a lease.
public struct DeliveryJob: Sendable, Equatable {
    public var id: Int64
    public var messageID: String
    public var blobKey: String
    public var mailFrom: String
    public var recipient: String
    public var isLocal: Bool
    /// Attempts made before this one.
    public var attempts: Int
    public var maxAttempts: Int
    /// Fences every result: a result is recorded only while this token still holds the lease.
    public var leaseToken: String
    /// Stable across retries of this job: makes local delivery idempotent.
    public var deliveryKey: String
    /// The claim that handed out this job made `deliveryKey` (the job had none): no earlier
    /// attempt can have stored anything under it, so a mailbox need not look for a copy.
    public var deliveryKeyIsNew: Bool
    /// When the message was accepted.
    public var receivedAt: Date
    /// The recipient's domain, lower case (the destination of a remote delivery).
    public var domain: String
    /// The blob's size in bytes (SIZE= at a remote peer).
    public var sizeBytes: Int
    /// The envelope needs SMTPUTF8 (RFC 6531): a peer without it cannot take the message.
    public var smtputf8: Bool
    /// `7BIT`, `8BITMIME` or `BINARYMIME` as the client declared it (nil: not declared).
    public var bodyType: String?
    /// DELIVERBY (RFC 2852): the deadline, and `R` (return the message when missed) or `N`.
    public var deliverBy: Date?
    public var deliverByMode: String?

    public init(
        id: Int64, messageID: String, blobKey: String, mailFrom: String, recipient: String, isLocal: Bool, attempts: Int,
        maxAttempts: Int, leaseToken: String, deliveryKey: String, receivedAt: Date, domain: String? = nil,
        sizeBytes: Int = 0, smtputf8: Bool = false, bodyType: String? = nil, deliverBy: Date? = nil,
        deliverByMode: String? = nil, deliveryKeyIsNew: Bool = false
    ) {
        self.id = id
        self.messageID = messageID
        self.blobKey = blobKey
        self.mailFrom = mailFrom
        self.recipient = recipient
        self.isLocal = isLocal
        self.attempts = attempts
        self.maxAttempts = maxAttempts
        self.leaseToken = leaseToken
        self.deliveryKey = deliveryKey
        self.deliveryKeyIsNew = deliveryKeyIsNew
        self.receivedAt = receivedAt
        self.domain = domain ?? recipient.split(separator: "@").last.map { $0.lowercased() } ?? ""
        self.sizeBytes = sizeBytes
        self.smtputf8 = smtputf8
        self.bodyType = bodyType
        self.deliverBy = deliverBy
        self.deliverByMode = deliverByMode
    }
}

/// What became of one delivery attempt.
public enum DeliveryOutcome: Sendable, Equatable {
    case delivered
    case retry(error: String, at: Date)
    case failed(error: String)
}

/// The queue of accepted messages and their recipients (`queue_messages`, `queue_recipients`).
public protocol MessageQueue: Sendable {
    /// Inserts the message, its recipients and their jobs in one durable transaction.
    func enqueue(_ message: QueuedMessage, recipients: [QueuedRecipient], maxAttempts: Int) async throws
    /// Like `enqueue`, but when a message with this id is already queued, changes nothing and
    /// returns false (atomically: of two racing calls, one inserts). Bounces use ids derived from
    /// what they report, so a notice repeated after a crash does not queue a second bounce.
    func enqueueIfAbsent(_ message: QueuedMessage, recipients: [QueuedRecipient], maxAttempts: Int) async throws -> Bool
    /// Claims up to `limit` jobs that `selection` picks and nobody holds a live lease on, with a
    /// fresh lease token until `now + lease`. A job without a delivery key gets one from
    /// `makeDeliveryKey`.
    func claim(_ selection: ClaimSelection, now: Date, limit: Int, lease: Duration, makeDeliveryKey: @Sendable () -> String)
        async throws -> [DeliveryJob]
    /// Records outcomes in one transaction, each fenced by its lease token (a job whose lease was lost
    /// is left alone). Messages whose every recipient is now delivered are removed; their blob keys
    /// are returned, to be deleted after the commit. In the same transaction, the `message.sent` and
    /// `message.failed` events of the results written go into `events` (`OutboxEvent.deliveryEvents`).
    func recordOutcomes(_ outcomes: [(job: DeliveryJob, outcome: DeliveryOutcome)], now: Date) async throws -> RecordedOutcomes
    /// Extends the leases of `jobs` still held by their tokens to `until`; returns the ids of those
    /// renewed (a job missing lost its lease: its result will not be recorded).
    func renewLeases(_ jobs: [DeliveryJob], until: Date) async throws -> Set<Int64>
    /// Gives up the leases of `jobs` still held by their tokens (unfinished at shutdown): they are
    /// due again at once, for another worker, and their attempt is not counted.
    func releaseLeases(_ jobs: [DeliveryJob]) async throws
    /// Drops every lease (embedded mode at start: no other worker can hold one).
    func releaseAllLeases() async throws
    /// ETRN: makes every waiting recipient at `domain` due now. Returns how many.
    func makeDue(domain: String, now: Date) async throws -> Int
    /// Number of recipients at `domain` still waiting for delivery.
    func waitingCount(domain: String) async throws -> Int
    /// Every blob key a message row refers to (for garbage collection of orphan blobs).
    func referencedBlobKeys() async throws -> Set<String>
    /// The queue view: messages with a recipient not delivered yet, oldest first, filtered by
    /// their aggregated status (`QueueMessageStatus`), `limit` from `offset`, with the total.
    func list(status: QueueMessageStatus?, offset: Int, limit: Int) async throws -> QueuePage
    /// Makes every waiting (pending or retry) recipient of the message due at `now`. False when
    /// there is no such message or none of its recipients waits (failed ones stay failed: their
    /// bounce was sent).
    func retryNow(messageID: String, now: Date) async throws -> Bool
    /// Removes the message and all its recipients. Returns its blob key, for the caller to delete
    /// after the commit; nil when there is no such message. A worker delivering it meanwhile
    /// records nothing (its rows are gone).
    func delete(messageID: String) async throws -> String?
}

// MARK: - What the queue adapters share

/// Which waiting jobs a claim takes.
public enum ClaimSelection: Sendable, Equatable {
    /// Pending or retry with `next_retry <= now`; local recipients only when `localOnly`.
    case due(localOnly: Bool)
    /// ATRN: every pending or retry remote recipient at these domains, due or not.
    case waiting(domains: [String])
}

extension MessageQueue {
    /// Claims up to `limit` due jobs (pending or retry, `next_retry <= now`, no live lease).
    public func claimDue(now: Date, limit: Int, lease: Duration, localOnly: Bool, makeDeliveryKey: @Sendable () -> String)
        async throws -> [DeliveryJob]
    {
        try await claim(.due(localOnly: localOnly), now: now, limit: limit, lease: lease, makeDeliveryKey: makeDeliveryKey)
    }

    /// ATRN: claims up to `limit` waiting remote jobs at `domains`, due or not.
    public func claimWaiting(domains: [String], now: Date, limit: Int, lease: Duration, makeDeliveryKey: @Sendable () -> String)
        async throws -> [DeliveryJob]
    {
        try await claim(.waiting(domains: domains), now: now, limit: limit, lease: lease, makeDeliveryKey: makeDeliveryKey)
    }
}

/// The `status` of a `queue_recipients` row.
public enum RecipientStatus: String, Sendable, CaseIterable {
    /// Not attempted yet.
    case pending
    /// Attempted, due again at `next_retry`.
    case retry
    /// Given up (attempts exhausted, or a permanent error).
    case failed
    case delivered
}

extension DeliveryOutcome {
    /// What the outcome writes to its recipient row, in every queue adapter: the new status,
    /// `last_error` (nil clears it), and `next_retry` (nil leaves it as it was). Recording also
    /// counts the attempt and drops the lease.
    public var recipientUpdate: (status: RecipientStatus, lastError: String?, nextRetry: Date?) {
        switch self {
        case .delivered: return (.delivered, nil, nil)
        case .retry(let error, let at): return (.retry, error, at)
        case .failed(let error): return (.failed, error, nil)
        }
    }
}

extension Date {
    /// Whole Unix seconds, rounded down: how both database schemas store times in the users
    /// and queue tables.
    public var unixSeconds: Int64 { Int64(timeIntervalSince1970.rounded(.down)) }

    public init(unixSeconds: Int64) {
        self.init(timeIntervalSince1970: TimeInterval(unixSeconds))
    }
}
