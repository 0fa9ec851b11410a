import Foundation
import Logging
import Metrics
import MetricsTestKit
import NIOCore
import NIOPosix
import Testing

@testable import MailTier
@testable import MailTierFiles

// The queue operations of the admin API (list, retry now, delete), lease renewal and release, and
// the delivery events and counters, on a real SQLite file and a real PostgreSQL schema (each case
// runs on both), with a real spool directory and maildirs.

private let start = Date(timeIntervalSince1970: 1_761_220_800)

private func message(_ id: String, subject: String? = nil, size: Int = 10, at date: Date = start) -> QueuedMessage {
    QueuedMessage(
        id: id, blobKey: "blob-\(id)", sha256: String(repeating: "0", count: 64), sizeBytes: size, mailFrom: "bob@example.org",
        subject: subject ?? "Subject \(id)", smtputf8: false, bodyType: nil, deliverBy: nil, deliverByMode: nil,
        clientAddress: "192.0.2.7", heloName: "client.example", authenticatedUser: nil, createdAt: date)
}

private func local(_ addresses: String...) -> [QueuedRecipient] {
    addresses.map { QueuedRecipient(address: $0, domain: "example.test", isLocal: true) }
}

private func claim(_ queue: any MessageQueue, at now: Date, lease: Duration = .seconds(300)) async throws -> [DeliveryJob] {
    try await queue.claimDue(now: now, limit: 100, lease: lease, localOnly: true, makeDeliveryKey: { "key-\(UUID().uuidString)" })
}

/// The rows of `events` of delivery results (not `message.received`), by type then id, their payloads parsed.
private func eventRows(_ database: TestDatabase) async throws -> [(type: String, payload: [String: Any])] {
    var rows: [(String, [String: Any])] = []
    let delivery = "FROM events WHERE type <> 'message.received'"
    let count = try await database.int("SELECT COUNT(*) \(delivery)") ?? 0
    for index in 0..<count {
        let type = try #require(try await database.text("SELECT type \(delivery) ORDER BY type, id LIMIT 1 OFFSET \(index)"))
        let payload = try #require(try await database.text("SELECT payload \(delivery) ORDER BY type, id LIMIT 1 OFFSET \(index)"))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(payload.utf8)) as? [String: Any], "not JSON: \(payload)")
        rows.append((type, object))
    }
    return rows
}

@Suite("Queue operations, events and counters") struct QueueOperationsTests {
    @Test("list: the API's shape per message, status aggregated over undelivered recipients, filter, paging, total", arguments: DatabaseBackend.allCases)
    func list(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            let queue = database.queue
            // pending: never tried. retry: one recipient tried. failed: its only recipient failed.
            // partly: one recipient delivered (not listed), one pending.
            try await queue.enqueue(message("msg_pending", size: 111), recipients: local("a@example.test", "b@example.test"), maxAttempts: 5)
            try await queue.enqueue(message("msg_retry", at: start + 1), recipients: local("c@example.test", "d@example.test"), maxAttempts: 7)
            try await queue.enqueue(message("msg_failed", at: start + 2), recipients: local("e@example.test"), maxAttempts: 5)
            try await queue.enqueue(message("msg_partly", subject: "Partly", at: start + 3), recipients: local("f@example.test", "g@example.test"), maxAttempts: 5)
            let jobs = Dictionary(uniqueKeysWithValues: try await claim(queue, at: start + 10).map { ($0.recipient, $0) })
            try #require(jobs.count == 7)
            let retryAt = start.addingTimeInterval(600)
            try await queue.record(
                [
                    (jobs["c@example.test"]!, .retry(error: "421 try later", at: retryAt)),
                    (jobs["e@example.test"]!, .failed(error: "550 no such user")),
                    (jobs["f@example.test"]!, .delivered),
                ], now: start + 10)
            try await queue.releaseLeases(Array(jobs.values))

            let all = try await queue.list(status: nil, offset: 0, limit: 100)
            #expect(all.total == 4 && all.offset == 0 && all.limit == 100)
            #expect(all.messages.map(\.id) == ["msg_pending", "msg_retry", "msg_failed", "msg_partly"], "oldest first")
            #expect(
                all.messages[0]
                    == QueueEntry(
                        id: "msg_pending", from: "bob@example.org", to: ["a@example.test", "b@example.test"], subject: "Subject msg_pending",
                        sizeBytes: 111, attempts: 0, maxAttempts: 5, nextRetry: start, status: .pending, createdAt: start))
            #expect(
                all.messages[1]
                    == QueueEntry(
                        id: "msg_retry", from: "bob@example.org", to: ["c@example.test", "d@example.test"], subject: "Subject msg_retry",
                        sizeBytes: 10, attempts: 1, maxAttempts: 7, nextRetry: start + 1, status: .retry, createdAt: start + 1),
                "next_retry is the earliest of its waiting recipients (d was never tried)")
            #expect(all.messages[2].status == .failed && all.messages[2].nextRetry == nil && all.messages[2].attempts == 1)
            #expect(all.messages[3].to == ["g@example.test"] && all.messages[3].status == .pending, "the delivered recipient is not listed")

            #expect(try await queue.list(status: .retry, offset: 0, limit: 100).messages.map(\.id) == ["msg_retry"])
            #expect(try await queue.list(status: .failed, offset: 0, limit: 100).messages.map(\.id) == ["msg_failed"])
            let pending = try await queue.list(status: .pending, offset: 0, limit: 100)
            #expect(pending.messages.map(\.id) == ["msg_pending", "msg_partly"] && pending.total == 2)
            let page = try await queue.list(status: nil, offset: 1, limit: 2)
            #expect(page.messages.map(\.id) == ["msg_retry", "msg_failed"] && page.total == 4 && page.offset == 1 && page.limit == 2)
            #expect(try await queue.list(status: .pending, offset: 5, limit: 2) == QueuePage(messages: [], total: 2, offset: 5, limit: 2))

            // The JSON of API.md's GET /api/queue.
            let json = try #require(try JSONSerialization.jsonObject(with: Data(page.json.utf8)) as? [String: Any])
            #expect(json["total"] as? Int == 4 && json["offset"] as? Int == 1 && json["limit"] as? Int == 2)
            let first = try #require((json["messages"] as? [[String: Any]])?.first)
            #expect(Set(first.keys) == ["id", "from", "to", "subject", "size_bytes", "attempts", "max_attempts", "next_retry", "status", "created_at"])
            #expect(first["id"] as? String == "msg_retry" && first["to"] as? [String] == ["c@example.test", "d@example.test"])
            #expect(first["status"] as? String == "retry" && first["max_attempts"] as? Int == 7 && first["attempts"] as? Int == 1)
            #expect(first["next_retry"] as? String == "2025-10-23T12:00:01Z" && first["created_at"] as? String == "2025-10-23T12:00:01Z")
            let failed = try #require((json["messages"] as? [[String: Any]])?.last)
            #expect(failed["next_retry"] is NSNull, "a failed message has no next retry: \(failed)")
        }
    }

    @Test("retry now: every waiting recipient is due at once; failed ones stay failed; unknown ids answer false", arguments: DatabaseBackend.allCases)
    func retryNow(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            let queue = database.queue
            try await queue.enqueue(message("msg_later"), recipients: local("a@example.test", "b@example.test", "c@example.test"), maxAttempts: 5)
            let jobs = try await claim(queue, at: start)
            let later = start.addingTimeInterval(3600)
            try await queue.record(
                [(jobs[0], .retry(error: "busy", at: later)), (jobs[1], .retry(error: "busy", at: later)), (jobs[2], .failed(error: "gone"))],
                now: start)
            #expect(try await claim(queue, at: start + 60).isEmpty, "not due for an hour")

            #expect(try await queue.retryNow(messageID: "msg_later", now: start + 60))
            let due = try await claim(queue, at: start + 60)
            #expect(due.map(\.recipient).sorted() == ["a@example.test", "b@example.test"])
            #expect(due.allSatisfy { $0.attempts == 1 }, "retrying now does not reset the attempts")
            #expect(try await database.text("SELECT status FROM queue_recipients WHERE recipient = 'c@example.test'") == "failed")

            #expect(try await queue.retryNow(messageID: "msg_nothing", now: start) == false)
            try await queue.enqueue(message("msg_dead"), recipients: local("d@example.test"), maxAttempts: 5)
            let dead = try await claim(queue, at: start)
            try await queue.record([(dead[0], .failed(error: "gone"))], now: start)
            #expect(try await queue.retryNow(messageID: "msg_dead", now: start) == false, "nothing of it waits")
        }
    }

    @Test("delete: the message, its recipients and (by the caller, after the commit) its blob go; a worker's later result records nothing", arguments: DatabaseBackend.allCases)
    func delete(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            try await withTemporaryDirectory("mailtier-spool") { directory in
                let queue = database.queue
                let spool = try SpoolBlobStore(directory: directory, threadPool: NIOThreadPool.singleton)
                for id in ["msg_keep", "msg_drop"] {
                    try await spool.put(key: "blob-\(id)", data: ByteBuffer(string: "Subject: \(id)\r\n\r\nbody\r\n"))
                    try await queue.enqueue(message(id), recipients: local("a@example.test", "b@example.test"), maxAttempts: 5)
                }
                let jobs = try await claim(queue, at: start).filter { $0.messageID == "msg_drop" }

                #expect(try await queue.delete(messageID: "msg_drop", spool: spool))
                #expect(try await database.int("SELECT COUNT(*) FROM queue_messages WHERE id = 'msg_drop'") == 0)
                #expect(try await database.int("SELECT COUNT(*) FROM queue_recipients WHERE message_id = 'msg_drop'") == 0)
                #expect(try await database.int("SELECT COUNT(*) FROM queue_recipients") == 2, "the other message keeps its recipients")
                #expect(try await spool.list().map(\.key) == ["blob-msg_keep"])

                #expect(try await queue.delete(messageID: "msg_drop", spool: spool) == false, "already gone")
                #expect(try await queue.delete(messageID: "msg_drop") == nil)
                // The worker that was delivering it records nothing, and no event.
                let recorded = try await queue.recordOutcomes(jobs.map { ($0, DeliveryOutcome.delivered) }, now: start)
                #expect(recorded == RecordedOutcomes(finishedBlobKeys: [], recorded: []))
                #expect(try await database.int("SELECT COUNT(*) FROM events WHERE type <> 'message.received'") == 0)
                #expect(try await queue.list(status: nil, offset: 0, limit: 10).messages.map(\.id) == ["msg_keep"])
            }
        }
    }

    @Test("leases: renewed only for the token that holds them; released ones are due at once, the attempt not counted", arguments: DatabaseBackend.allCases)
    func leases(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            let queue = database.queue
            try await queue.enqueue(message("msg_lease"), recipients: local("a@example.test", "b@example.test"), maxAttempts: 5)
            let jobs = try await claim(queue, at: start, lease: .seconds(10))
            try #require(jobs.count == 2)
            // Renewed to an hour from now: still held 30 s later, when the first lease would have expired.
            #expect(try await queue.renewLeases(jobs, until: start + 3600) == Set(jobs.map(\.id)))
            #expect(try await claim(queue, at: start + 30).isEmpty)
            var stale = jobs[0]
            stale.leaseToken = "msg_not-the-token"
            #expect(try await queue.renewLeases([stale], until: start + 7200) == [])
            #expect(try await database.int("SELECT MAX(lease_until) FROM queue_recipients") == (start + 3600).unixSeconds)

            // Released (shutdown): due again at once, for anyone; attempts unchanged.
            try await queue.releaseLeases([jobs[0]])
            let again = try await claim(queue, at: start + 31)
            #expect(again.map(\.id) == [jobs[0].id] && again[0].attempts == 0 && again[0].leaseToken != jobs[0].leaseToken)
            // A release with a token that lost the lease leaves the new holder alone.
            try await queue.releaseLeases([jobs[0]])
            #expect(try await claim(queue, at: start + 32).isEmpty)
            #expect(try await queue.renewLeases([jobs[0]], until: start + 7200) == [], "the old token renews nothing")
        }
    }

    @Test("events: message.sent and message.failed rows with the outcome, in record's transaction; none for retries or a fenced result", arguments: DatabaseBackend.allCases)
    func events(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            let queue = database.queue
            try await queue.enqueue(
                message("msg_events", subject: "Quarterly \"report\"", size: 1234),
                recipients: local("a@example.test", "b@example.test", "c@example.test", "d@example.test"), maxAttempts: 5)
            let jobs = Dictionary(uniqueKeysWithValues: try await claim(queue, at: start, lease: .seconds(5)).map { ($0.recipient, $0) })
            let recorded = try await queue.recordOutcomes(
                [
                    (jobs["a@example.test"]!, .delivered), (jobs["b@example.test"]!, .delivered),
                    (jobs["c@example.test"]!, .failed(error: "550 5.1.1 no such user")),
                ], now: start + 5)
            #expect(recorded.recorded == Set(["a", "b", "c"].map { jobs["\($0)@example.test"]!.id }) && recorded.finishedBlobKeys == [])
            var rows = try await eventRows(database)
            #expect(rows.map(\.type) == ["message.failed", "message.sent"])
            let sent = try #require(rows.last?.payload)
            #expect(sent["event"] as? String == "message.sent" && sent["timestamp"] as? String == "2025-10-23T12:00:05Z")
            let sentData = try #require(sent["data"] as? [String: Any])
            #expect(sentData["message_id"] as? String == "msg_events" && sentData["from"] as? String == "bob@example.org")
            #expect(sentData["to"] as? [String] == ["a@example.test", "b@example.test"])
            #expect(sentData["subject"] as? String == "Quarterly \"report\"" && sentData["size_bytes"] as? Int == 1234)
            let failedData = try #require(rows.first?.payload["data"] as? [String: Any])
            #expect(failedData["to"] as? [String] == ["c@example.test"])
            #expect(failedData["errors"] as? [String: String] == ["c@example.test": "550 5.1.1 no such user"])
            #expect(try await database.int("SELECT COUNT(*) FROM events WHERE delivered_at IS NULL AND next_attempt = \((start + 5).unixSeconds)") == 2,
                    "waiting for the webhook sender")

            // d's lease expires; another worker claims it. The stale worker's result is fenced: no row, no event.
            let fresh = try await claim(queue, at: start + 60)
            try #require(fresh.count == 1)
            let stale = try await queue.recordOutcomes([(jobs["d@example.test"]!, .delivered)], now: start + 61)
            #expect(stale.recorded.isEmpty)
            #expect(try await database.int("SELECT COUNT(*) FROM events WHERE type <> 'message.received'") == 2)
            // A retry makes no event; the newer attempt's delivery does, and finishes nothing (c failed).
            try await queue.record([(fresh[0], .retry(error: "later", at: start + 100))], now: start + 62)
            #expect(try await database.int("SELECT COUNT(*) FROM events WHERE type <> 'message.received'") == 2)
            let retried = try await claim(queue, at: start + 100)
            #expect(try await queue.recordOutcomes([(retried[0], .delivered)], now: start + 101).recorded == [retried[0].id])
            rows = try await eventRows(database)
            #expect(rows.filter { $0.type == "message.sent" }.compactMap { ($0.payload["data"] as? [String: Any])?["to"] as? [String] }
                .sorted { $0.count > $1.count } == [["a@example.test", "b@example.test"], ["d@example.test"]])
        }
    }

    @Test("counters: smtp_messages_sent_total counts delivered and failed recipients the delivery service recorded", arguments: DatabaseBackend.allCases)
    func counters(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            try await withTemporaryDirectory("mailtier-counters") { directory in
                let queue = database.queue
                let spool = try SpoolBlobStore(directory: directory + "/spool", threadPool: NIOThreadPool.singleton)
                let mailboxes = MaildirStore(root: directory + "/mail", hostname: "test-host", threadPool: NIOThreadPool.singleton)
                let metrics = TestMetrics()
                let delivery = DeliveryService(
                    queue: queue, spool: spool, mailboxes: mailboxes, settings: .init(exclusive: false, pollInterval: .seconds(1)),
                    doorbell: Doorbell(), metricsFactory: metrics, logger: Logger(label: "test"))
                try await spool.put(key: "blob-msg_ok", data: ByteBuffer(string: "Subject: ok\r\n\r\nhello\r\n"))
                try await queue.enqueue(message("msg_ok"), recipients: local("a@example.test", "b@example.test"), maxAttempts: 5)
                // No blob: a temporary failure, and with one attempt allowed, a failure for good.
                try await queue.enqueue(message("msg_lost"), recipients: local("c@example.test"), maxAttempts: 1)

                #expect(try await delivery.runOnce(now: Date()) == 3)
                let delivered = try metrics.expectCounter(DeliveryService.sentMetric, [("status", "delivered")])
                let failed = try metrics.expectCounter(DeliveryService.sentMetric, [("status", "failed")])
                #expect(delivered.totalValue == 2 && failed.totalValue == 1)
                #expect(try mailboxes.messageFiles(of: "a@example.test").count == 1)
                #expect(try await database.int("SELECT COUNT(*) FROM events WHERE type = 'message.sent'") == 1)
                #expect(try await database.int("SELECT COUNT(*) FROM events WHERE type = 'message.failed'") == 1)
                #expect(try await spool.list().isEmpty, "msg_ok's blob is gone with it")
            }
        }
    }
}
