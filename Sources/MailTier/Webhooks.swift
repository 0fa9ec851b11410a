#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

// Webhooks (API.md "WebHooks"): the seven event types, the events the producers write into the
// `events` outbox, the outbox port a sender drains, and the sender's retry schedule. The HTTP
// side (posting, signing) lives in MailTierWebhooks.

/// The event types of API.md, by their wire names.
public enum WebhookEvent: String, Sendable, CaseIterable, Hashable, Comparable {
    /// A message was accepted and queued (written in the enqueue transaction).
    case messageReceived = "message.received"
    /// Recipients were delivered (written when the result is recorded).
    case messageSent = "message.sent"
    /// Recipients failed for good (written when the result is recorded).
    case messageFailed = "message.failed"
    /// No scanner writes these yet: accepted in `SMTP_WEBHOOK_EVENTS` for when one does.
    case spamDetected = "spam.detected"
    case virusDetected = "virus.detected"
    /// An account was created (written in the user insert's transaction).
    case userCreated = "user.created"
    /// SMTP AUTH was refused for a wrong username or password.
    case authFailed = "auth.failed"

    public static func < (lhs: WebhookEvent, rhs: WebhookEvent) -> Bool {
        allCases.firstIndex(of: lhs)! < allCases.firstIndex(of: rhs)!
    }

    /// Every type, the default of `SMTP_WEBHOOK_EVENTS`.
    public static let all = Set(allCases)
}

// MARK: - The events the producers write

extension OutboxEvent {
    /// `message.received` for a message just queued: `data` is API.md's example exactly —
    /// `message_id`, `from` (the reverse path, empty for `<>`), `to` (the queued recipients),
    /// `subject` (null when the message has none) and `size_bytes` (as stored, with the
    /// Received: field). Its time is the message's `createdAt`.
    public static func messageReceived(_ message: QueuedMessage, recipients: [QueuedRecipient]) -> OutboxEvent {
        let type = WebhookEvent.messageReceived.rawValue
        let data = EventData(
            messageID: message.id,
            summary: MessageSummary(from: message.mailFrom, subject: message.subject, sizeBytes: message.sizeBytes),
            to: recipients.map(\.address), errors: nil)
        return OutboxEvent(type: type, payload: EventJSON.payload(type, data, message.createdAt), createdAt: message.createdAt)
    }

    /// `user.created`: `data` is the account as API.md's user JSON has it at creation —
    /// `id`, `username`, `email`, `quota_mb`, `is_admin`, `enabled`, `created_at` (never the hash).
    public static func userCreated(_ user: User) -> OutboxEvent {
        let type = WebhookEvent.userCreated.rawValue
        return OutboxEvent(type: type, payload: EventJSON.payload(type, UserData(user: user), user.createdAt), createdAt: user.createdAt)
    }

    /// `auth.failed`: `data` is `{"username": <the name tried>, "client_ip": <the client's address>}`
    /// — what an operator needs to spot a guessing attack; never the password.
    public static func authFailed(username: String, clientAddress: String, at date: Date) -> OutboxEvent {
        let type = WebhookEvent.authFailed.rawValue
        let data = ["client_ip": clientAddress, "username": username]
        return OutboxEvent(type: type, payload: EventJSON.payload(type, data, date), createdAt: date)
    }

    /// The events a producer should write when `recording` are the configured types.
    public static func filter(_ events: [OutboxEvent], recording: Set<WebhookEvent>) -> [OutboxEvent] {
        events.filter { event in WebhookEvent(rawValue: event.type).map(recording.contains) ?? false }
    }
}

private struct UserData: Encodable {
    var user: User

    enum CodingKeys: String, CodingKey {
        case id, username, email, quotaMB = "quota_mb", isAdmin = "is_admin", enabled, createdAt = "created_at"
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(user.id, forKey: .id)
        try container.encode(user.username, forKey: .username)
        try container.encode(user.email, forKey: .email)
        try container.encode(user.quotaMB, forKey: .quotaMB)
        try container.encode(user.isAdmin, forKey: .isAdmin)
        try container.encode(user.enabled, forKey: .enabled)
        try container.encode(MailDate.iso8601(user.createdAt), forKey: .createdAt)
    }
}

// MARK: - The outbox port

/// An event a sender has claimed: it holds the lease until the lease's end (or until it records
/// the attempt); nobody else is given the event before then.
public struct ClaimedEvent: Sendable, Equatable {
    public var id: String
    public var type: String
    /// The body to post, byte for byte as stored.
    public var payload: String
    public var createdAt: Date
    /// This attempt's number, 1-based. A claim counts the attempt (`attempts = attempts + 1`), so
    /// `(id, attempt)` fences the result: `markDelivered`/`markFailed` change the row only while
    /// no later claim has taken it.
    public var attempt: Int

    public init(id: String, type: String, payload: String, createdAt: Date, attempt: Int) {
        self.id = id
        self.type = type
        self.payload = payload
        self.createdAt = createdAt
        self.attempt = attempt
    }
}

/// How many events are in each state.
public struct EventOutboxCounts: Sendable, Equatable {
    /// Not delivered, still to be tried (or being tried).
    public var waiting: Int
    /// Given up after the last attempt: kept with `last_error` until pruned.
    public var failed: Int
    public var delivered: Int

    public init(waiting: Int, failed: Int, delivered: Int) {
        self.waiting = waiting
        self.failed = failed
        self.delivered = delivered
    }
}

/// The `events` table as a sender sees it (DESIGN.md: the webhook outbox).
///
/// States of a row: *waiting* (`delivered_at` NULL, `next_attempt` set: due at that time, and a
/// claimed row's `next_attempt` is its lease's end), *delivered* (`delivered_at` set) and *failed*
/// (`delivered_at` and `next_attempt` NULL, `last_error` says why).
public protocol EventOutbox: Sendable {
    /// Inserts an event that reports no other stored change (`auth.failed`), in a transaction of
    /// its own. Events that report a change are inserted by that change's adapter, in its transaction.
    func append(_ event: OutboxEvent) async throws
    /// Up to `limit` waiting events due at `now`, the longest due first, each leased until
    /// `now + lease` (its `next_attempt` moves there) and its attempt counted: no other claim, in
    /// this process or another, returns one of them before then. A sender that dies holding a
    /// lease leaves the event due again when the lease ends.
    func claim(now: Date, limit: Int, lease: Duration) async throws -> [ClaimedEvent]
    /// Marks the event delivered. False when the lease was lost (another sender claimed the event
    /// since, or it was delivered already) and nothing was written.
    func markDelivered(_ event: ClaimedEvent, at date: Date) async throws -> Bool
    /// Keeps `error` as `last_error` and makes the event due at `retryAt` — or, when `retryAt` is
    /// nil, failed for good. False when the lease was lost.
    func markFailed(_ event: ClaimedEvent, error: String, retryAt: Date?) async throws -> Bool
    /// Deletes delivered events delivered before `deliveredBefore` and failed events created
    /// before `failedBefore`; returns how many.
    func prune(deliveredBefore: Date, failedBefore: Date) async throws -> Int
    func counts() async throws -> EventOutboxCounts
    /// Failed events, oldest first, at most `limit`.
    func failed(limit: Int) async throws -> [FailedEvent]
    /// Makes every failed event waiting again, due at `now`, with its attempts counted from 0;
    /// returns how many.
    func retryFailed(now: Date) async throws -> Int
}

/// An event that failed for good, as `smtp-server webhooks` lists it.
public struct FailedEvent: Sendable, Equatable {
    public var id: String
    public var type: String
    public var createdAt: Date
    public var attempts: Int
    public var lastError: String?

    public init(id: String, type: String, createdAt: Date, attempts: Int, lastError: String?) {
        self.id = id
        self.type = type
        self.createdAt = createdAt
        self.attempts = attempts
        self.lastError = lastError
    }

    /// `evt_… message.received 2025-10-23T12:00:00Z attempts=10 HTTP 503`.
    public var line: String {
        "\(id) \(type) \(MailDate.iso8601(createdAt)) attempts=\(attempts) \(lastError ?? "")"
    }
}

// MARK: - Retries

/// When a webhook post that failed is tried again: `first` after the first failure, doubling up
/// to `maximum`, each delay moved by up to ±`jitter` of itself (so that many events failing
/// together do not retry together); after `maxAttempts` attempts the event fails for good.
public struct WebhookRetryPolicy: Sendable, Equatable {
    public var first: Duration
    public var maximum: Duration
    public var maxAttempts: Int
    /// A fraction, 0 to 1.
    public var jitter: Double

    /// 10 s, 20 s, 40 s … up to 1 h; the 10th attempt is the last (about 2.4 h after the first).
    public init(first: Duration = .seconds(10), maximum: Duration = .seconds(3600), maxAttempts: Int = 10, jitter: Double = 0.2) {
        self.first = first
        self.maximum = maximum
        self.maxAttempts = maxAttempts
        self.jitter = jitter
    }

    /// When to try again after attempt number `attempt` (1-based) failed at `now`; nil when it
    /// was the last. `random` is in -1...1 (0: no jitter).
    public func retryAt(afterAttempt attempt: Int, now: Date, random: Double) -> Date? {
        guard attempt < maxAttempts else { return nil }
        let firstSeconds = Double(first.components.seconds) + Double(first.components.attoseconds) / 1e18
        let maximumSeconds = Double(maximum.components.seconds) + Double(maximum.components.attoseconds) / 1e18
        let base = min(maximumSeconds, firstSeconds * Double(1 << min(max(0, attempt - 1), 40)))
        let delay = base * (1 + jitter * min(1, max(-1, random)))
        return now.addingTimeInterval(max(1, delay))
    }
}

/// SQL of the outbox that is the same for SQLite and PostgreSQL.
public enum EventOutboxSQL {
    /// The condition of a failed event.
    public static let isFailed = "delivered_at IS NULL AND next_attempt IS NULL"

    /// One row: `waiting`, `failed`, `delivered` counts.
    public static let counts = """
        SELECT COALESCE(SUM(CASE WHEN delivered_at IS NULL AND next_attempt IS NOT NULL THEN 1 ELSE 0 END), 0) AS waiting,
               COALESCE(SUM(CASE WHEN delivered_at IS NULL AND next_attempt IS NULL THEN 1 ELSE 0 END), 0) AS failed,
               COALESCE(SUM(CASE WHEN delivered_at IS NOT NULL THEN 1 ELSE 0 END), 0) AS delivered
        FROM events
        """
}
