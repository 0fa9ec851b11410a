#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import MailTier
import PostgresNIO

/// The queue in PostgreSQL (cluster mode): `queue_messages` and `queue_recipients` of
/// `PostgresDatabase.migrations` (version 2), with the semantics of `SQLiteMessageQueue`, for
/// many ingress and delivery processes at once:
///
/// - `enqueue` is one statement (a data-modifying CTE inserting the message and all its
///   recipients), hence one transaction, committed before the caller answers 250;
/// - `claimDue` locks due rows with `FOR UPDATE SKIP LOCKED`, so concurrent workers never claim
///   the same job and never wait for each other, and gives each a fresh lease token;
/// - every result is written `WHERE id = $1 AND lease_token = $2` (fencing); a worker whose
///   lease expired and was claimed again changes nothing;
/// - `record` locks the message rows it touches first (in id order), so two workers recording
///   the last two recipients of one message cannot both miss that it is finished.
///
/// The webhook events of `recording` are written into `events` by the same statements.
public struct PostgresMessageQueue: MessageQueue {
    public let database: PostgresDatabase
    public let recording: Set<WebhookEvent>

    public init(database: PostgresDatabase, recording: Set<WebhookEvent> = WebhookEvent.all) {
        self.database = database
        self.recording = recording
    }

    public func enqueue(_ message: QueuedMessage, recipients: [QueuedRecipient], maxAttempts: Int) async throws {
        _ = try await insert(message, recipients: recipients, maxAttempts: maxAttempts, ifAbsent: false)
    }

    public func enqueueIfAbsent(_ message: QueuedMessage, recipients: [QueuedRecipient], maxAttempts: Int) async throws -> Bool {
        try await insert(message, recipients: recipients, maxAttempts: maxAttempts, ifAbsent: true)
    }

    /// One statement; with `ifAbsent`, an existing id makes the message insert do nothing
    /// (`ON CONFLICT (id) DO NOTHING`), so no recipient row is inserted either: returns false.
    /// A `message.received` event (when recorded) is inserted by the same statement, only with
    /// the message.
    ///
    /// Inside BEGIN … COMMIT, although it is one statement: on its own, its success is reported
    /// (CommandComplete) before the implicit transaction commits at Sync, and a server that dies
    /// in between flushes that report on its way out — a 250 for a message that was never
    /// committed. COMMIT's own reply comes only once the commit is durable.
    private func insert(_ message: QueuedMessage, recipients: [QueuedRecipient], maxAttempts: Int, ifAbsent: Bool) async throws -> Bool {
        let clean = PostgresSearchText.withoutNUL
        let events = OutboxEvent.filter([.messageReceived(message, recipients: recipients)], recording: recording)
        let inserted = try await database.transaction { transaction in try await transaction.query(
            """
            WITH message AS (
                INSERT INTO queue_messages (id, blob_key, sha256, size_bytes, mail_from, subject, smtputf8, body_type,
                    deliver_by, by_mode, client_ip, helo, auth_user, created_at)
                VALUES (\(message.id), \(message.blobKey), \(message.sha256), \(Int64(message.sizeBytes)),
                    \(clean(message.mailFrom)), \(message.subject.map(clean)), \(message.smtputf8), \(message.bodyType),
                    \(message.deliverBy?.unixSeconds), \(message.deliverByMode), \(clean(message.clientAddress)),
                    \(clean(message.heloName)), \(message.authenticatedUser.map(clean)), \(message.createdAt.unixSeconds))
                \(unescaped: ifAbsent ? "ON CONFLICT (id) DO NOTHING" : "")
                RETURNING id, created_at, deliver_by
            ), event AS (
                INSERT INTO events (id, type, payload, created_at, next_attempt)
                SELECT e.id, e.type, e.payload, message.created_at, message.created_at
                FROM message, unnest(\(events.map(\.id))::text[], \(events.map(\.type))::text[], \(events.map(\.payload))::text[])
                    AS e(id, type, payload)
            )
            INSERT INTO queue_recipients (message_id, recipient, domain, is_local, status, attempts, max_attempts,
                next_retry, deliver_by)
            SELECT message.id, r.recipient, r.domain, r.is_local, 'pending', 0, \(maxAttempts), message.created_at,
                message.deliver_by
            FROM message, unnest(\(recipients.map(\.address))::text[], \(recipients.map(\.domain))::text[],
                \(recipients.map(\.isLocal))::boolean[]) AS r(recipient, domain, is_local)
            RETURNING message_id
            """) }
        return !inserted.isEmpty
    }

    public func claim(
        _ selection: ClaimSelection, now: Date, limit: Int, lease: Duration, makeDeliveryKey: @Sendable () -> String
    ) async throws -> [DeliveryJob] {
        let (localOnly, domains): (Bool, [String]?) =
            switch selection {
            case .due(let localOnly): (localOnly, nil)
            case .waiting(let domains): (false, domains)
            }
        let nowSeconds = now.unixSeconds
        let leaseUntil = nowSeconds + lease.components.seconds
        let byDomain = domains != nil
        return try await database.transaction { transaction in
            let rows = try await transaction.query(
                """
                SELECT r.id, r.message_id, r.recipient, r.is_local, r.attempts, r.max_attempts, r.delivery_key,
                       m.blob_key, m.mail_from, m.created_at, r.domain, m.size_bytes, m.smtputf8, m.body_type,
                       r.deliver_by, m.by_mode
                FROM queue_recipients r JOIN queue_messages m ON m.id = r.message_id
                WHERE r.status IN ('pending', 'retry')
                  AND (r.lease_until IS NULL OR r.lease_until < \(nowSeconds))
                  AND ((NOT \(byDomain) AND r.next_retry <= \(nowSeconds) AND (r.is_local OR NOT \(localOnly)))
                       OR (\(byDomain) AND NOT r.is_local AND r.domain = ANY(\(domains ?? [])::text[])))
                ORDER BY r.next_retry, r.id
                LIMIT \(limit)
                FOR UPDATE OF r SKIP LOCKED
                """)
            var jobs: [DeliveryJob] = []
            for row in rows {
                let (id, messageID, recipient, isLocal, attempts, maxAttempts, deliveryKey, blobKey, mailFrom, createdAt) =
                    try row.decode((Int64, String, String, Bool, Int, Int, String?, String, String, Int64).self)
                let cells = row.makeRandomAccess()
                let domain = try cells[10].decode(String.self)
                let sizeBytes = try cells[11].decode(Int64.self)
                let smtputf8 = try cells[12].decode(Bool.self)
                let bodyType = try cells[13].decode(String?.self)
                let deliverBy = try cells[14].decode(Int64?.self)
                let deliverByMode = try cells[15].decode(String?.self)
                jobs.append(
                    DeliveryJob(
                        id: id, messageID: messageID, blobKey: blobKey, mailFrom: mailFrom, recipient: recipient, isLocal: isLocal,
                        attempts: attempts, maxAttempts: maxAttempts, leaseToken: MessageID.make(),
                        deliveryKey: deliveryKey ?? makeDeliveryKey(), receivedAt: Date(unixSeconds: createdAt),
                        domain: domain, sizeBytes: Int(sizeBytes), smtputf8: smtputf8, bodyType: bodyType,
                        deliverBy: deliverBy.map(Date.init(unixSeconds:)), deliverByMode: deliverByMode,
                        deliveryKeyIsNew: deliveryKey == nil))
            }
            guard !jobs.isEmpty else { return [] }
            try await transaction.query(
                """
                UPDATE queue_recipients AS r SET lease_token = l.token, lease_until = \(leaseUntil), delivery_key = l.key
                FROM unnest(\(jobs.map(\.id))::bigint[], \(jobs.map(\.leaseToken))::text[], \(jobs.map(\.deliveryKey))::text[])
                    AS l(id, token, key)
                WHERE r.id = l.id
                """)
            return jobs
        }
    }

    public func recordOutcomes(_ outcomes: [(job: DeliveryJob, outcome: DeliveryOutcome)], now: Date) async throws -> RecordedOutcomes {
        let clean = PostgresSearchText.withoutNUL
        let messageIDs = Array(Set(outcomes.map(\.job.messageID))).sorted()
        guard !messageIDs.isEmpty else { return RecordedOutcomes(finishedBlobKeys: [], recorded: []) }
        return try await database.transaction { transaction in
            let locked = try await transaction.query(
                "SELECT id, mail_from, subject, size_bytes FROM queue_messages WHERE id = ANY(\(messageIDs)::text[]) ORDER BY id FOR UPDATE")
            var summaries: [String: OutboxEvent.MessageSummary] = [:]
            for row in locked {
                let (id, from, subject, size) = try row.decode((String, String, String?, Int64).self)
                summaries[id] = OutboxEvent.MessageSummary(from: from, subject: subject, sizeBytes: Int(size))
            }
            var touched: [String] = []
            var recorded: [(job: DeliveryJob, outcome: DeliveryOutcome)] = []
            for (job, outcome) in outcomes {
                let update = outcome.recipientUpdate
                let rows = try await transaction.query(
                    """
                    UPDATE queue_recipients SET status = \(update.status.rawValue), last_error = \(update.lastError.map(clean)),
                        next_retry = COALESCE(\(update.nextRetry?.unixSeconds), next_retry),
                        lease_token = NULL, lease_until = NULL, attempts = attempts + 1
                    WHERE id = \(job.id) AND lease_token = \(job.leaseToken)
                    RETURNING id
                    """)
                guard !rows.isEmpty else { continue }
                recorded.append((job, outcome))
                if !touched.contains(job.messageID) { touched.append(job.messageID) }
            }
            guard !touched.isEmpty else { return RecordedOutcomes(finishedBlobKeys: [], recorded: []) }
            try await PostgresEventOutbox.insert(
                OutboxEvent.filter(OutboxEvent.deliveryEvents(recorded: recorded, messages: summaries, now: now), recording: recording),
                transaction)
            let finished = try await transaction.query(
                """
                DELETE FROM queue_messages AS m WHERE m.id = ANY(\(touched)::text[])
                  AND NOT EXISTS (SELECT 1 FROM queue_recipients r WHERE r.message_id = m.id AND r.status <> 'delivered')
                RETURNING m.blob_key
                """)
            return RecordedOutcomes(
                finishedBlobKeys: try finished.map { try $0.decode(String.self) }, recorded: Set(recorded.map(\.job.id)))
        }
    }

    public func renewLeases(_ jobs: [DeliveryJob], until: Date) async throws -> Set<Int64> {
        guard !jobs.isEmpty else { return [] }
        let rows = try await database.query(
            """
            UPDATE queue_recipients AS r SET lease_until = \(until.unixSeconds)
            FROM unnest(\(jobs.map(\.id))::bigint[], \(jobs.map(\.leaseToken))::text[]) AS l(id, token)
            WHERE r.id = l.id AND r.lease_token = l.token
            RETURNING r.id
            """)
        return Set(try rows.map { try $0.decode(Int64.self) })
    }

    public func releaseLeases(_ jobs: [DeliveryJob]) async throws {
        guard !jobs.isEmpty else { return }
        try await database.query(
            """
            UPDATE queue_recipients AS r SET lease_token = NULL, lease_until = NULL
            FROM unnest(\(jobs.map(\.id))::bigint[], \(jobs.map(\.leaseToken))::text[]) AS l(id, token)
            WHERE r.id = l.id AND r.lease_token = l.token
            """)
    }

    public func list(status: QueueMessageStatus?, offset: Int, limit: Int) async throws -> QueuePage {
        let wanted = status?.rawValue
        let total = try await database.query(
            """
            SELECT COUNT(*) FROM (\(unescaped: QueueView.aggregateSQL)) AS q
            WHERE (\(wanted)::text IS NULL OR q.status = \(wanted)::text)
            """
        ).first?.decode(Int64.self) ?? 0
        let rows = try await database.query(
            """
            SELECT q.id, q.mail_from, q.subject, q.size_bytes, q.created_at, q.attempts, q.max_attempts, q.next_retry, q.status,
                   ARRAY(SELECT r.recipient FROM queue_recipients r WHERE r.message_id = q.id AND r.status <> 'delivered' ORDER BY r.id)
            FROM (\(unescaped: QueueView.aggregateSQL)) AS q
            WHERE (\(wanted)::text IS NULL OR q.status = \(wanted)::text)
            ORDER BY q.created_at, q.id LIMIT \(Int64(max(limit, 0))) OFFSET \(Int64(max(offset, 0)))
            """)
        var messages: [QueueEntry] = []
        for row in rows {
            let (id, from, subject, size, created, attempts, maxAttempts, nextRetry, status, to) = try row.decode(
                (String, String, String?, Int64, Int64, Int, Int, Int64?, String, [String]).self)
            messages.append(
                QueueEntry(
                    id: id, from: from, to: to, subject: subject, sizeBytes: Int(size), attempts: attempts, maxAttempts: maxAttempts,
                    nextRetry: nextRetry.map(Date.init(unixSeconds:)), status: QueueMessageStatus(rawValue: status) ?? .failed,
                    createdAt: Date(unixSeconds: created)))
        }
        return QueuePage(messages: messages, total: Int(total), offset: offset, limit: limit)
    }

    public func retryNow(messageID: String, now: Date) async throws -> Bool {
        try await !database.query(
            """
            UPDATE queue_recipients SET next_retry = \(now.unixSeconds)
            WHERE message_id = \(messageID) AND status IN ('pending', 'retry') RETURNING id
            """
        ).isEmpty
    }

    public func delete(messageID: String) async throws -> String? {
        // The recipients go with it (ON DELETE CASCADE).
        try await database.query("DELETE FROM queue_messages WHERE id = \(messageID) RETURNING blob_key").first?.decode(String.self)
    }

    public func releaseAllLeases() async throws {
        try await database.query(
            "UPDATE queue_recipients SET lease_token = NULL, lease_until = NULL WHERE lease_token IS NOT NULL")
    }

    public func makeDue(domain: String, now: Date) async throws -> Int {
        try await database.query(
            """
            UPDATE queue_recipients SET next_retry = \(now.unixSeconds)
            WHERE domain = \(domain) AND status IN ('pending', 'retry') RETURNING id
            """
        ).count
    }

    public func waitingCount(domain: String) async throws -> Int {
        let rows = try await database.query(
            "SELECT COUNT(*) FROM queue_recipients WHERE domain = \(domain) AND status IN ('pending', 'retry')")
        return Int(try rows.first?.decode(Int64.self) ?? 0)
    }

    public func referencedBlobKeys() async throws -> Set<String> {
        Set(try await database.query("SELECT blob_key FROM queue_messages").map { try $0.decode(String.self) })
    }
}
