#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

// The queue as the admin API sees it (API.md "Queue Management"), and the events delivery
// writes into the `events` outbox (API.md "WebHooks"). Shared by every queue adapter, so both
// databases answer the same shapes.

/// The status of a message in the queue view, aggregated over its recipients still in the queue
/// (those not delivered yet): `retry` when one of them was tried and waits, else `pending` when
/// one was never tried, else `failed` (every one failed for good).
public enum QueueMessageStatus: String, Sendable, CaseIterable, Codable {
    case pending
    case retry
    case failed
}

/// One message of the queue view (`GET /api/queue`).
public struct QueueEntry: Sendable, Equatable {
    public var id: String
    /// The reverse path, empty for `<>`.
    public var from: String
    /// The recipients not delivered yet, in the order they were given.
    public var to: [String]
    public var subject: String?
    public var sizeBytes: Int
    /// The most attempts made for any of `to`, and the most allowed.
    public var attempts: Int
    public var maxAttempts: Int
    /// When the next of `to` is due; nil when every one failed.
    public var nextRetry: Date?
    public var status: QueueMessageStatus
    public var createdAt: Date

    public init(
        id: String, from: String, to: [String], subject: String?, sizeBytes: Int, attempts: Int, maxAttempts: Int,
        nextRetry: Date?, status: QueueMessageStatus, createdAt: Date
    ) {
        self.id = id
        self.from = from
        self.to = to
        self.subject = subject
        self.sizeBytes = sizeBytes
        self.attempts = attempts
        self.maxAttempts = maxAttempts
        self.nextRetry = nextRetry
        self.status = status
        self.createdAt = createdAt
    }
}

/// One page of the queue view: `messages` oldest first, `total` matching the filter.
public struct QueuePage: Sendable, Equatable {
    public var messages: [QueueEntry]
    public var total: Int
    public var offset: Int
    public var limit: Int

    public init(messages: [QueueEntry], total: Int, offset: Int, limit: Int) {
        self.messages = messages
        self.total = total
        self.offset = offset
        self.limit = limit
    }

    /// API.md's JSON, keys sorted; times as `2025-10-23T12:00:00Z`, a missing one as null.
    public var json: String { EventJSON.encode(object: QueuePageJSON(self)) }
}

/// What `MessageQueue.recordOutcomes` did.
public struct RecordedOutcomes: Sendable, Equatable {
    /// Blob keys of the messages that left the queue (every recipient delivered): delete them
    /// after the commit.
    public var finishedBlobKeys: [String]
    /// The jobs whose result was written: still held by their lease token. A job missing here
    /// had lost its lease, and another attempt owns the row.
    public var recorded: Set<Int64>

    public init(finishedBlobKeys: [String], recorded: Set<Int64>) {
        self.finishedBlobKeys = finishedBlobKeys
        self.recorded = recorded
    }
}

extension MessageQueue {
    /// `recordOutcomes`, returning only the blob keys of finished messages.
    @discardableResult
    public func record(_ outcomes: [(job: DeliveryJob, outcome: DeliveryOutcome)], now: Date) async throws -> [String] {
        try await recordOutcomes(outcomes, now: now).finishedBlobKeys
    }
}

// MARK: - Events

/// A row of the `events` outbox, written in the transaction of the change it reports.
public struct OutboxEvent: Sendable, Equatable {
    /// `message.sent`: recipients were delivered. `message.failed`: recipients failed for good.
    public static let messageSent = WebhookEvent.messageSent.rawValue
    public static let messageFailed = WebhookEvent.messageFailed.rawValue

    /// `evt_` and 20 random characters.
    public var id: String
    public var type: String
    /// The webhook body, exactly as it will be posted (and signed).
    public var payload: String
    public var createdAt: Date

    public init(id: String = "evt_" + MessageID.make().dropFirst(4), type: String, payload: String, createdAt: Date) {
        self.id = id
        self.type = type
        self.payload = payload
        self.createdAt = createdAt
    }

    /// What a queue adapter knows of a message when it records results for it.
    public struct MessageSummary: Sendable, Equatable {
        public var from: String
        public var subject: String?
        public var sizeBytes: Int

        public init(from: String, subject: String?, sizeBytes: Int) {
            self.from = from
            self.subject = subject
            self.sizeBytes = sizeBytes
        }
    }

    /// The events for results just recorded: per message, one `message.sent` naming the
    /// recipients delivered and one `message.failed` naming those failed for good (with each
    /// one's error); retries make none. `recorded` must hold only results that were written.
    /// The payload is API.md's webhook shape:
    /// `{"data":{"from":…,"message_id":…,"size_bytes":…,"subject":…,"to":[…]},"event":…,"timestamp":…}`,
    /// and `message.failed` adds `"errors":{"<recipient>":"<error>"}` to `data`.
    public static func deliveryEvents(
        recorded: [(job: DeliveryJob, outcome: DeliveryOutcome)], messages: [String: MessageSummary], now: Date
    ) -> [OutboxEvent] {
        var events: [OutboxEvent] = []
        var order: [String] = []
        var sent: [String: [String]] = [:]
        var failed: [String: [(String, String)]] = [:]
        for (job, outcome) in recorded {
            if sent[job.messageID] == nil && failed[job.messageID] == nil { order.append(job.messageID) }
            switch outcome {
            case .delivered: sent[job.messageID, default: []].append(job.recipient)
            case .failed(let error): failed[job.messageID, default: []].append((job.recipient, error))
            case .retry: continue
            }
        }
        for messageID in order {
            let summary = messages[messageID] ?? MessageSummary(from: "", subject: nil, sizeBytes: 0)
            if let to = sent[messageID] {
                let data = EventData(messageID: messageID, summary: summary, to: to, errors: nil)
                events.append(OutboxEvent(type: messageSent, payload: EventJSON.payload(messageSent, data, now), createdAt: now))
            }
            if let failures = failed[messageID] {
                let data = EventData(
                    messageID: messageID, summary: summary, to: failures.map(\.0),
                    errors: Dictionary(failures, uniquingKeysWith: { first, _ in first }))
                events.append(OutboxEvent(type: messageFailed, payload: EventJSON.payload(messageFailed, data, now), createdAt: now))
            }
        }
        return events
    }
}

/// The `data` of a message event (`message.received`, `message.sent`, `message.failed`).
struct EventData: Encodable {
    var messageID: String
    var summary: OutboxEvent.MessageSummary
    var to: [String]
    var errors: [String: String]?

    enum CodingKeys: String, CodingKey {
        case messageID = "message_id", from, to, subject, sizeBytes = "size_bytes", errors
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(messageID, forKey: .messageID)
        try container.encode(summary.from, forKey: .from)
        try container.encode(to, forKey: .to)
        try container.encode(summary.subject, forKey: .subject)
        try container.encode(summary.sizeBytes, forKey: .sizeBytes)
        try container.encodeIfPresent(errors, forKey: .errors)
    }
}

private struct QueuePageJSON: Encodable {
    var page: QueuePage
    init(_ page: QueuePage) { self.page = page }

    struct Entry: Encodable {
        var entry: QueueEntry
        enum CodingKeys: String, CodingKey {
            case id, from, to, subject, sizeBytes = "size_bytes", attempts, maxAttempts = "max_attempts"
            case nextRetry = "next_retry", status, createdAt = "created_at"
        }
        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: CodingKeys.self)
            try container.encode(entry.id, forKey: .id)
            try container.encode(entry.from, forKey: .from)
            try container.encode(entry.to, forKey: .to)
            try container.encode(entry.subject, forKey: .subject)
            try container.encode(entry.sizeBytes, forKey: .sizeBytes)
            try container.encode(entry.attempts, forKey: .attempts)
            try container.encode(entry.maxAttempts, forKey: .maxAttempts)
            try container.encode(entry.nextRetry.map(MailDate.iso8601), forKey: .nextRetry)
            try container.encode(entry.status, forKey: .status)
            try container.encode(MailDate.iso8601(entry.createdAt), forKey: .createdAt)
        }
    }

    enum CodingKeys: String, CodingKey { case messages, total, offset, limit }
    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(page.messages.map(Entry.init), forKey: .messages)
        try container.encode(page.total, forKey: .total)
        try container.encode(page.offset, forKey: .offset)
        try container.encode(page.limit, forKey: .limit)
    }
}

enum EventJSON {
    struct Envelope<Data: Encodable>: Encodable {
        var event: String
        var timestamp: String
        var data: Data
    }

    static func payload<Data: Encodable>(_ type: String, _ data: Data, _ now: Date) -> String {
        encode(object: Envelope(event: type, timestamp: MailDate.iso8601(now), data: data))
    }

    static func encode<Value: Encodable>(object: Value) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        // Strings, integers, arrays and objects only: encoding cannot fail.
        guard let bytes = try? encoder.encode(object) else { return "{}" }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// The queue view's SQL, the same for SQLite and PostgreSQL: one row per message with a
/// recipient not delivered yet, its counts taken over those recipients, and the aggregated
/// `status` of `QueueMessageStatus`. Select from it as a subquery.
public enum QueueView {
    public static let aggregateSQL = """
        SELECT m.id, m.mail_from, m.subject, m.size_bytes, m.created_at,
               MAX(r.attempts) AS attempts, MAX(r.max_attempts) AS max_attempts,
               MIN(CASE WHEN r.status IN ('pending', 'retry') THEN r.next_retry END) AS next_retry,
               CASE WHEN SUM(CASE WHEN r.status = 'retry' THEN 1 ELSE 0 END) > 0 THEN 'retry'
                    WHEN SUM(CASE WHEN r.status = 'pending' THEN 1 ELSE 0 END) > 0 THEN 'pending'
                    ELSE 'failed' END AS status
        FROM queue_messages m JOIN queue_recipients r ON r.message_id = m.id AND r.status <> 'delivered'
        GROUP BY m.id, m.mail_from, m.subject, m.size_bytes, m.created_at
        """
}

extension MessageQueue {
    /// `DELETE /api/queue/{id}`: removes the message and its recipients, then its blob. False
    /// when there is no such message. The blob goes after the commit; if that fails, it is an
    /// orphan that `DeliveryService.collectOrphanBlobs` removes later.
    public func delete(messageID: String, spool: any BlobStore) async throws -> Bool {
        guard let blobKey = try await delete(messageID: messageID) else { return false }
        try? await spool.delete(key: blobKey)
        return true
    }
}
