#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import MailTier

/// The queue in SQLite (embedded mode). Claims run in `BEGIN IMMEDIATE` transactions, so two
/// workers never claim the same job; results are fenced by the lease token. The webhook events
/// of `recording` (`message.received`, `message.sent`, `message.failed`) are written into
/// `events` in the transaction of the change they report.
public struct SQLiteMessageQueue: MessageQueue {
    public let database: SQLiteDatabase
    public let recording: Set<WebhookEvent>

    public init(database: SQLiteDatabase, recording: Set<WebhookEvent> = WebhookEvent.all) {
        self.database = database
        self.recording = recording
    }

    public func enqueue(_ message: QueuedMessage, recipients: [QueuedRecipient], maxAttempts: Int) async throws {
        _ = try await insert(message, recipients: recipients, maxAttempts: maxAttempts, ifAbsent: false)
    }

    public func enqueueIfAbsent(_ message: QueuedMessage, recipients: [QueuedRecipient], maxAttempts: Int) async throws -> Bool {
        try await insert(message, recipients: recipients, maxAttempts: maxAttempts, ifAbsent: true)
    }

    /// One `BEGIN IMMEDIATE` transaction: with `ifAbsent`, an existing id is looked for first and
    /// nothing is written when it is there (returns false).
    private func insert(_ message: QueuedMessage, recipients: [QueuedRecipient], maxAttempts: Int, ifAbsent: Bool) async throws -> Bool {
        try await database.write { db in
            if ifAbsent, !(try db.query("SELECT 1 AS present FROM queue_messages WHERE id = ?", [.text(message.id)]).isEmpty) {
                return false
            }
            try db.execute(
                """
                INSERT INTO queue_messages (id, blob_key, sha256, size_bytes, mail_from, subject, smtputf8, body_type,
                    deliver_by, by_mode, client_ip, helo, auth_user, created_at)
                VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                """,
                [
                    .text(message.id), .text(message.blobKey), .text(message.sha256), .integer(Int64(message.sizeBytes)),
                    .text(message.mailFrom), .optionalText(message.subject), .bool(message.smtputf8),
                    .optionalText(message.bodyType), .optionalInteger(message.deliverBy?.unixSeconds),
                    .optionalText(message.deliverByMode), .text(message.clientAddress), .text(message.heloName),
                    .optionalText(message.authenticatedUser), .integer(message.createdAt.unixSeconds),
                ])
            for recipient in recipients {
                try db.execute(
                    """
                    INSERT INTO queue_recipients (message_id, recipient, domain, is_local, status, attempts, max_attempts,
                        next_retry, deliver_by)
                    VALUES (?, ?, ?, ?, 'pending', 0, ?, ?, ?)
                    """,
                    [
                        .text(message.id), .text(recipient.address), .text(recipient.domain), .bool(recipient.isLocal),
                        .integer(Int64(maxAttempts)), .integer(message.createdAt.unixSeconds),
                        .optionalInteger(message.deliverBy?.unixSeconds),
                    ])
            }
            try SQLiteEventOutbox.insert(
                OutboxEvent.filter([.messageReceived(message, recipients: recipients)], recording: recording), db)
            return true
        }
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
        // ATRN's domains as a JSON array for json_each (the regular poll needs none).
        let domainList = domains.flatMap { try? JSONEncoder().encode($0) }.map { String(decoding: $0, as: UTF8.self) } ?? "[]"
        return try await database.write { db in
            let rows = try db.query(
                """
                SELECT r.id, r.message_id, r.recipient, r.domain, r.is_local, r.attempts, r.max_attempts, r.delivery_key,
                       r.deliver_by, m.blob_key, m.mail_from, m.created_at, m.size_bytes, m.smtputf8, m.body_type, m.by_mode
                FROM queue_recipients r JOIN queue_messages m ON m.id = r.message_id
                WHERE r.status IN ('pending', 'retry')
                  AND (r.lease_until IS NULL OR r.lease_until < ?)
                  AND ((? = 0 AND r.next_retry <= ? \(localOnly ? "AND r.is_local = 1" : ""))
                       OR (? = 1 AND r.is_local = 0 AND r.domain IN (SELECT value FROM json_each(?))))
                ORDER BY r.next_retry, r.id
                LIMIT ?
                """,
                [.integer(nowSeconds), .bool(domains != nil), .integer(nowSeconds), .bool(domains != nil), .text(domainList),
                 .integer(Int64(limit))])
            var jobs: [DeliveryJob] = []
            for row in rows {
                let id = row.int("id")!
                let token = MessageID.make()
                let storedKey = row.string("delivery_key")
                let key = storedKey ?? makeDeliveryKey()
                try db.execute(
                    "UPDATE queue_recipients SET lease_token = ?, lease_until = ?, delivery_key = ? WHERE id = ?",
                    [.text(token), .integer(leaseUntil), .text(key), .integer(id)])
                jobs.append(
                    DeliveryJob(
                        id: id, messageID: row.string("message_id")!, blobKey: row.string("blob_key")!,
                        mailFrom: row.string("mail_from") ?? "", recipient: row.string("recipient")!,
                        isLocal: row.int("is_local") == 1, attempts: Int(row.int("attempts") ?? 0),
                        maxAttempts: Int(row.int("max_attempts") ?? 5), leaseToken: token, deliveryKey: key,
                        receivedAt: Date(timeIntervalSince1970: Double(row.int("created_at") ?? 0)),
                        domain: row.string("domain"), sizeBytes: Int(row.int("size_bytes") ?? 0),
                        smtputf8: row.int("smtputf8") == 1, bodyType: row.string("body_type"),
                        deliverBy: row.int("deliver_by").map(Date.init(unixSeconds:)), deliverByMode: row.string("by_mode"),
                        deliveryKeyIsNew: storedKey == nil))
            }
            return jobs
        }
    }

    public func recordOutcomes(_ outcomes: [(job: DeliveryJob, outcome: DeliveryOutcome)], now: Date) async throws -> RecordedOutcomes {
        try await database.write { db in
            var touched: [String] = []
            var recorded: [(job: DeliveryJob, outcome: DeliveryOutcome)] = []
            for (job, outcome) in outcomes {
                let update = outcome.recipientUpdate
                try db.execute(
                    """
                    UPDATE queue_recipients SET status = ?, last_error = ?, next_retry = COALESCE(?, next_retry),
                        lease_token = NULL, lease_until = NULL, attempts = attempts + 1
                    WHERE id = ? AND lease_token = ?
                    """,
                    [.text(update.status.rawValue), .optionalText(update.lastError),
                     .optionalInteger(update.nextRetry?.unixSeconds), .integer(job.id), .text(job.leaseToken)])
                guard db.changes == 1 else { continue }
                recorded.append((job, outcome))
                if !touched.contains(job.messageID) { touched.append(job.messageID) }
            }
            var summaries: [String: OutboxEvent.MessageSummary] = [:]
            for messageID in touched {
                if let row = try db.query("SELECT mail_from, subject, size_bytes FROM queue_messages WHERE id = ?", [.text(messageID)]).first {
                    summaries[messageID] = OutboxEvent.MessageSummary(
                        from: row.string("mail_from") ?? "", subject: row.string("subject"), sizeBytes: Int(row.int("size_bytes") ?? 0))
                }
            }
            try SQLiteEventOutbox.insert(
                OutboxEvent.filter(OutboxEvent.deliveryEvents(recorded: recorded, messages: summaries, now: now), recording: recording), db)
            var finished: [String] = []
            for messageID in touched {
                let open = try db.query(
                    "SELECT COUNT(*) AS n FROM queue_recipients WHERE message_id = ? AND status != 'delivered'",
                    [.text(messageID)])
                guard open.first?.int("n") == 0 else { continue }
                if let blobKey = try db.query("SELECT blob_key FROM queue_messages WHERE id = ?", [.text(messageID)]).first?.string("blob_key") {
                    finished.append(blobKey)
                }
                try db.execute("DELETE FROM queue_messages WHERE id = ?", [.text(messageID)])
            }
            return RecordedOutcomes(finishedBlobKeys: finished, recorded: Set(recorded.map(\.job.id)))
        }
    }

    public func renewLeases(_ jobs: [DeliveryJob], until: Date) async throws -> Set<Int64> {
        try await database.write { db in
            var renewed: Set<Int64> = []
            for job in jobs {
                try db.execute(
                    "UPDATE queue_recipients SET lease_until = ? WHERE id = ? AND lease_token = ?",
                    [.integer(until.unixSeconds), .integer(job.id), .text(job.leaseToken)])
                if db.changes == 1 { renewed.insert(job.id) }
            }
            return renewed
        }
    }

    public func releaseLeases(_ jobs: [DeliveryJob]) async throws {
        try await database.write { db in
            for job in jobs {
                try db.execute(
                    "UPDATE queue_recipients SET lease_token = NULL, lease_until = NULL WHERE id = ? AND lease_token = ?",
                    [.integer(job.id), .text(job.leaseToken)])
            }
        }
    }

    public func list(status: QueueMessageStatus?, offset: Int, limit: Int) async throws -> QueuePage {
        try await database.read { db in
            let filter: [SQLiteValue] = [.optionalText(status?.rawValue), .optionalText(status?.rawValue)]
            let view = "(\(QueueView.aggregateSQL)) AS q WHERE (? IS NULL OR q.status = ?)"
            let total = try db.query("SELECT COUNT(*) AS n FROM \(view)", filter).first?.int("n") ?? 0
            let rows = try db.query(
                "SELECT * FROM \(view) ORDER BY q.created_at, q.id LIMIT ? OFFSET ?",
                filter + [.integer(Int64(max(limit, 0))), .integer(Int64(max(offset, 0)))])
            var messages: [QueueEntry] = []
            for row in rows {
                let id = row.string("id")!
                let to = try db.query(
                    "SELECT recipient FROM queue_recipients WHERE message_id = ? AND status <> 'delivered' ORDER BY id", [.text(id)]
                ).compactMap { $0.string("recipient") }
                messages.append(
                    QueueEntry(
                        id: id, from: row.string("mail_from") ?? "", to: to, subject: row.string("subject"),
                        sizeBytes: Int(row.int("size_bytes") ?? 0), attempts: Int(row.int("attempts") ?? 0),
                        maxAttempts: Int(row.int("max_attempts") ?? 0), nextRetry: row.int("next_retry").map(Date.init(unixSeconds:)),
                        status: QueueMessageStatus(rawValue: row.string("status") ?? "") ?? .failed,
                        createdAt: Date(unixSeconds: row.int("created_at") ?? 0)))
            }
            return QueuePage(messages: messages, total: Int(total), offset: offset, limit: limit)
        }
    }

    public func retryNow(messageID: String, now: Date) async throws -> Bool {
        try await database.write { db in
            try db.execute(
                "UPDATE queue_recipients SET next_retry = ? WHERE message_id = ? AND status IN ('pending', 'retry')",
                [.integer(now.unixSeconds), .text(messageID)])
            return db.changes > 0
        }
    }

    public func delete(messageID: String) async throws -> String? {
        try await database.write { db in
            guard let blobKey = try db.query("SELECT blob_key FROM queue_messages WHERE id = ?", [.text(messageID)]).first?.string("blob_key")
            else { return nil }
            // The recipients go with it (ON DELETE CASCADE).
            try db.execute("DELETE FROM queue_messages WHERE id = ?", [.text(messageID)])
            return blobKey
        }
    }

    public func releaseAllLeases() async throws {
        try await database.write { db in
            try db.execute("UPDATE queue_recipients SET lease_token = NULL, lease_until = NULL WHERE lease_token IS NOT NULL")
        }
    }

    public func makeDue(domain: String, now: Date) async throws -> Int {
        try await database.write { db in
            try db.execute(
                "UPDATE queue_recipients SET next_retry = ? WHERE domain = ? AND status IN ('pending', 'retry')",
                [.integer(now.unixSeconds), .text(domain)])
            return db.changes
        }
    }

    public func waitingCount(domain: String) async throws -> Int {
        try await database.read { db in
            let rows = try db.query(
                "SELECT COUNT(*) AS n FROM queue_recipients WHERE domain = ? AND status IN ('pending', 'retry')", [.text(domain)])
            return Int(rows.first?.int("n") ?? 0)
        }
    }

    public func referencedBlobKeys() async throws -> Set<String> {
        try await database.read { db in
            Set(try db.query("SELECT blob_key FROM queue_messages").compactMap { $0.string("blob_key") })
        }
    }
}
