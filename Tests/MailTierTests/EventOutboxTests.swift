import Foundation
import Testing

@testable import MailTier
@testable import MailTierPostgres
@testable import MailTierSQLite

// The webhook outbox (`events`) on a real SQLite file and a real PostgreSQL schema (each case
// runs on both): the producers writing in their own transactions, claims with leases, fencing,
// backoff and giving up, pruning; and the retry schedule.

private let start = Date(timeIntervalSince1970: 1_761_220_800)

private func message(_ id: String, subject: String? = "Test Email", at date: Date = start) -> QueuedMessage {
    QueuedMessage(
        id: id, blobKey: "blob-\(id)", sha256: String(repeating: "0", count: 64), sizeBytes: 1234, mailFrom: "sender@example.com",
        subject: subject, smtputf8: false, bodyType: nil, deliverBy: nil, deliverByMode: nil, clientAddress: "192.0.2.7",
        heloName: "client.example", authenticatedUser: nil, createdAt: date)
}

private let recipients = [
    QueuedRecipient(address: "recipient@example.com", domain: "example.com", isLocal: true),
    QueuedRecipient(address: "other@example.org", domain: "example.org", isLocal: false),
]

private func json(_ text: String) throws -> [String: Any] {
    try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any], "not a JSON object: \(text)")
}

/// `n` events created one second apart from `start`, appended.
private func appendEvents(_ outbox: any EventOutbox, _ n: Int) async throws -> [OutboxEvent] {
    var events: [OutboxEvent] = []
    for index in 0..<n {
        let event = OutboxEvent.authFailed(username: "user\(index)", clientAddress: "192.0.2.\(index)", at: start + Double(index))
        try await outbox.append(event)
        events.append(event)
    }
    return events
}

@Suite("Webhook outbox") struct EventOutboxTests {
    @Test("message.received: API.md's payload, in the enqueue's transaction; none for a duplicate enqueueIfAbsent", arguments: DatabaseBackend.allCases)
    func messageReceived(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            let queue = database.queue(recording: [.messageReceived])
            try await queue.enqueue(message("msg_abc123"), recipients: recipients, maxAttempts: 5)
            #expect(try await database.int("SELECT COUNT(*) FROM events") == 1)
            let payload = try #require(try await database.text("SELECT payload FROM events WHERE type = 'message.received'"))
            #expect(
                payload
                    == #"{"data":{"from":"sender@example.com","message_id":"msg_abc123","size_bytes":1234,"subject":"Test Email","to":["recipient@example.com","other@example.org"]},"event":"message.received","timestamp":"2025-10-23T12:00:00Z"}"#)
            #expect(try await database.int("SELECT next_attempt FROM events") == start.unixSeconds, "due at once")
            #expect(try await database.text("SELECT id FROM events")?.hasPrefix("evt_") == true)

            #expect(try await queue.enqueueIfAbsent(message("msg_abc123"), recipients: recipients, maxAttempts: 5) == false)
            #expect(try await database.int("SELECT COUNT(*) FROM events") == 1, "a message already queued reports nothing")
            #expect(try await queue.enqueueIfAbsent(message("msg_other", subject: nil), recipients: recipients, maxAttempts: 5))
            let other = try json(try #require(try await database.text("SELECT payload FROM events WHERE payload LIKE '%msg_other%'")))
            #expect((other["data"] as? [String: Any])?["subject"] is NSNull, "no Subject: null, as in the queue view")

            // One transaction: when the event cannot be written, the message is not queued either.
            try await database.execute("ALTER TABLE events RENAME TO events_away")
            await #expect(throws: (any Error).self) {
                try await queue.enqueue(message("msg_lost"), recipients: recipients, maxAttempts: 5)
            }
            try await database.execute("ALTER TABLE events_away RENAME TO events")
            #expect(try await database.int("SELECT COUNT(*) FROM queue_messages WHERE id = 'msg_lost'") == 0)
            #expect(try await database.int("SELECT COUNT(*) FROM queue_recipients WHERE message_id = 'msg_lost'") == 0)

            // Not recorded: nothing written.
            try await database.queue(recording: []).enqueue(message("msg_quiet"), recipients: recipients, maxAttempts: 5)
            try await database.queue(recording: [.messageSent]).enqueue(message("msg_quiet2"), recipients: recipients, maxAttempts: 5)
            #expect(try await database.int("SELECT COUNT(*) FROM events") == 2)
        }
    }

    @Test("message.sent/failed only when recorded", arguments: DatabaseBackend.allCases)
    func deliveryEventsFollowRecording(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            let queue = database.queue(recording: [.messageFailed])
            try await queue.enqueue(message("msg_d"), recipients: recipients, maxAttempts: 5)
            let jobs = try await queue.claimDue(now: start, limit: 10, lease: .seconds(60), localOnly: false, makeDeliveryKey: { "k" })
            try #require(jobs.count == 2)
            try await queue.record([(jobs[0], .delivered), (jobs[1], .failed(error: "550 no"))], now: start + 1)
            #expect(try await database.text("SELECT type FROM events") == "message.failed")
            #expect(try await database.int("SELECT COUNT(*) FROM events") == 1)
        }
    }

    @Test("user.created: the account without its hash, in the insert's transaction", arguments: DatabaseBackend.allCases)
    func userCreated(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            let users = database.users(recording: WebhookEvent.all)
            let jane = try await users.create(username: "jane", email: "jane@example.com", passwordHash: "$argon2id$secret", quotaMB: 1000, isAdmin: false)
            let payload = try #require(try await database.text("SELECT payload FROM events WHERE type = 'user.created'"))
            #expect(!payload.contains("argon2id"))
            let object = try json(payload)
            #expect(object["event"] as? String == "user.created" && object["timestamp"] as? String == MailDate.iso8601(jane.createdAt))
            let data = try #require(object["data"] as? [String: Any])
            #expect(Set(data.keys) == ["id", "username", "email", "quota_mb", "is_admin", "enabled", "created_at"])
            #expect(data["id"] as? Int == Int(jane.id) && data["username"] as? String == "jane" && data["email"] as? String == "jane@example.com")
            #expect(data["quota_mb"] as? Int == 1000 && data["is_admin"] as? Bool == false && data["enabled"] as? Bool == true)

            // A refused insert writes no event; an insert whose event fails is not kept.
            await #expect(throws: UserStoreError.duplicateUsername) {
                _ = try await users.create(username: "jane", email: "jane2@example.com", passwordHash: "x", quotaMB: 1, isAdmin: false)
            }
            try await database.execute("ALTER TABLE events RENAME TO events_away")
            await #expect(throws: (any Error).self) {
                _ = try await users.create(username: "john", email: "john@example.com", passwordHash: "x", quotaMB: 1, isAdmin: false)
            }
            try await database.execute("ALTER TABLE events_away RENAME TO events")
            #expect(try await users.user(named: "john") == nil)
            _ = try await database.users(recording: [.messageReceived]).create(
                username: "quiet", email: "quiet@example.com", passwordHash: "x", quotaMB: 1, isAdmin: false)
            #expect(try await database.int("SELECT COUNT(*) FROM events") == 1)
        }
    }

    @Test("claim: oldest due first, leased (not claimed again until the lease ends), each claim counts the attempt", arguments: DatabaseBackend.allCases)
    func claimAndLease(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            let outbox = database.events
            let events = try await appendEvents(outbox, 5)
            #expect(try await outbox.claim(now: start - 1, limit: 10, lease: .seconds(60)).isEmpty, "not due yet")
            let first = try await outbox.claim(now: start + 10, limit: 3, lease: .seconds(60))
            #expect(first.map(\.id) == events.prefix(3).map(\.id))
            #expect(first.allSatisfy { $0.attempt == 1 })
            #expect(first[0].payload == events[0].payload && first[0].type == "auth.failed" && first[0].createdAt == start)
            let second = try await outbox.claim(now: start + 10, limit: 10, lease: .seconds(60))
            #expect(second.map(\.id) == events.suffix(2).map(\.id), "leased events are not handed out twice")
            #expect(try await outbox.claim(now: start + 69, limit: 10, lease: .seconds(60)).isEmpty)
            #expect(try await outbox.counts() == EventOutboxCounts(waiting: 5, failed: 0, delivered: 0))

            // Delivered: never claimed again. The lease of the others ends: claimed again, attempt 2.
            for event in first { #expect(try await outbox.markDelivered(event, at: start + 11)) }
            let again = try await outbox.claim(now: start + 71, limit: 10, lease: .seconds(60))
            #expect(again.map(\.id) == events.suffix(2).map(\.id) && again.allSatisfy { $0.attempt == 2 })
            #expect(try await outbox.counts() == EventOutboxCounts(waiting: 2, failed: 0, delivered: 3))
            #expect(try await database.int("SELECT delivered_at FROM events WHERE id = '\(first[0].id)'") == (start + 11).unixSeconds)

            // Fencing: the sender whose lease ended records nothing; the new holder does.
            #expect(try await outbox.markDelivered(second[0], at: start + 72) == false)
            #expect(try await outbox.markFailed(second[1], error: "late", retryAt: start + 999) == false)
            #expect(try await outbox.markDelivered(again[0], at: start + 72))
            #expect(try await outbox.markDelivered(again[0], at: start + 73) == false, "delivered once")
        }
    }

    @Test("backoff: a failed attempt keeps its error and is due at retryAt; nil gives up and stays visible as failed", arguments: DatabaseBackend.allCases)
    func backoffAndGiveUp(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            let outbox = database.events
            let policy = WebhookRetryPolicy(first: .seconds(10), maximum: .seconds(3600), maxAttempts: 3, jitter: 0)
            let event = try await appendEvents(outbox, 1)[0]
            var now = start
            for attempt in 1...3 {
                let claimed = try await outbox.claim(now: now, limit: 10, lease: .seconds(60))
                try #require(claimed.count == 1)
                #expect(claimed[0].id == event.id && claimed[0].attempt == attempt)
                let retryAt = policy.retryAt(afterAttempt: attempt, now: now, random: 0)
                #expect(try await outbox.markFailed(claimed[0], error: "HTTP 503 (attempt \(attempt))", retryAt: retryAt))
                if let retryAt {
                    #expect(retryAt == now + 10 * Double(1 << (attempt - 1)))
                    #expect(try await outbox.claim(now: retryAt - 1, limit: 10, lease: .seconds(60)).isEmpty, "not before its time")
                    now = retryAt
                } else {
                    #expect(attempt == 3)
                }
            }
            #expect(try await outbox.claim(now: now + 86400 * 365, limit: 10, lease: .seconds(60)).isEmpty, "failed for good")
            #expect(try await outbox.counts() == EventOutboxCounts(waiting: 0, failed: 1, delivered: 0))
            #expect(try await database.text("SELECT last_error FROM events") == "HTTP 503 (attempt 3)")
            #expect(try await database.int("SELECT attempts FROM events") == 3)
            #expect(
                try await outbox.failed(limit: 10)
                    == [FailedEvent(id: event.id, type: "auth.failed", createdAt: start, attempts: 3, lastError: "HTTP 503 (attempt 3)")])

            // Sent again by hand (`smtp-server webhooks retry-failed`): due at once, attempts from 0.
            #expect(try await outbox.retryFailed(now: now + 5) == 1)
            #expect(try await outbox.failed(limit: 10).isEmpty)
            let retried = try await outbox.claim(now: now + 5, limit: 10, lease: .seconds(60))
            #expect(retried.map(\.id) == [event.id] && retried.first?.attempt == 1)
        }
    }

    @Test("prune: delivered ones after their retention, failed ones after theirs; waiting ones stay", arguments: DatabaseBackend.allCases)
    func prune(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            let outbox = database.events
            _ = try await appendEvents(outbox, 4)
            let claimed = try await outbox.claim(now: start + 10, limit: 3, lease: .seconds(60))
            #expect(try await outbox.markDelivered(claimed[0], at: start + 10))
            #expect(try await outbox.markDelivered(claimed[1], at: start + 500))
            #expect(try await outbox.markFailed(claimed[2], error: "gone", retryAt: nil))
            #expect(try await outbox.prune(deliveredBefore: start + 100, failedBefore: start) == 1)
            #expect(try await outbox.counts() == EventOutboxCounts(waiting: 1, failed: 1, delivered: 1))
            #expect(try await outbox.prune(deliveredBefore: start + 1000, failedBefore: start + 1000) == 2)
            #expect(try await outbox.counts() == EventOutboxCounts(waiting: 1, failed: 0, delivered: 0))
        }
    }

    @Test("concurrent senders never claim one event twice", arguments: DatabaseBackend.allCases)
    func concurrentClaims(_ backend: DatabaseBackend) async throws {
        try await withTestDatabase(backend) { database in
            let events = try await appendEvents(database.events, 60)
            let claimed = try await withThrowingTaskGroup(of: [String].self) { group in
                for _ in 0..<4 {
                    group.addTask {
                        var mine: [String] = []
                        while true {
                            let batch = try await database.events.claim(now: start + 100, limit: 5, lease: .seconds(60))
                            if batch.isEmpty { return mine }
                            mine += batch.map(\.id)
                        }
                    }
                }
                var all: [String] = []
                for try await ids in group { all += ids }
                return all
            }
            #expect(claimed.count == 60 && Set(claimed) == Set(events.map(\.id)))
        }
    }

    @Test("retry schedule: 10 s doubling to 1 h, jitter within its fraction, nil after the last attempt")
    func retrySchedule() {
        let policy = WebhookRetryPolicy()
        let delays = (1...9).map { policy.retryAt(afterAttempt: $0, now: start, random: 0)!.timeIntervalSince(start) }
        #expect(delays == [10, 20, 40, 80, 160, 320, 640, 1280, 2560])
        #expect(WebhookRetryPolicy(maxAttempts: 20).retryAt(afterAttempt: 15, now: start, random: 0) == start + 3600)
        #expect(policy.retryAt(afterAttempt: 10, now: start, random: 0) == nil)
        #expect(policy.retryAt(afterAttempt: 1, now: start, random: 1) == start + 12)
        #expect(policy.retryAt(afterAttempt: 1, now: start, random: -1) == start + 8)
        #expect(policy.retryAt(afterAttempt: 2, now: start, random: 5) == start + 24, "random is clamped to -1...1")
    }
}
