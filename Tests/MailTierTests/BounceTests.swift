import Foundation
import Logging
import NIOCore
import SMTPProtocol
import Testing

@testable import MailTier
@testable import MailTierFiles

// Bounces (RFC 3464 DSNs) and DELIVERBY (RFC 2852) in the embedded services, on SQLite and on
// PostgreSQL: the failures come from real local deliveries (quota, deadlines), the DSN is queued
// in the real queue, delivered into a real maildir, and parsed by Python's email package.

/// The embedded services with a bounce generator wired into delivery, as smtp-server wires it.
private struct Bouncing {
    let e: Embedded
    let bounces: BounceService
    let delivery: DeliveryService

    init(_ e: Embedded) {
        self.e = e
        let logger = Logger(label: "test")
        bounces = BounceService(
            configuration: e.configuration, accounts: e.accounts, queue: e.queue, spool: e.spool, newMail: nil, logger: logger)
        delivery = DeliveryService(
            queue: e.queue, spool: e.spool, mailboxes: e.mailboxes, settings: .init(exclusive: true, pollInterval: .seconds(1)),
            doorbell: Doorbell(), quota: (e.accounts.users, e.quota), notifier: bounces, logger: logger)
    }

    /// alice sends, carol (quota 1 MB) receives.
    func makeAccounts() async throws {
        _ = try await e.accounts.create(username: "alice", email: "alice@example.test", password: "Al1ce-Passw0rd", quotaMB: 10, isAdmin: false)
        _ = try await e.accounts.create(username: "carol", email: "carol@example.test", password: "Car0l-Passw0rd", quotaMB: 1, isAdmin: false)
    }

    /// Accepts a message through ingress; returns its queue id.
    func send(
        from sender: ReversePath = .mailbox(Mailbox(localPart: "alice", domain: "example.test")), to recipient: String = "carol@example.test",
        subject: String = "Quarterly numbers", size: Int = 100, deliverBy: DeliverBy? = nil, sourceLocation: SourceLocation = #_sourceLocation
    ) async throws -> String {
        var envelope = e.envelope(to: [recipient])
        envelope.reversePath = sender
        envelope.parameters.deliverBy = deliverBy
        let content = ByteBuffer(string: "From: Alice <alice@example.test>\r\nSubject: \(subject)\r\n\r\n" + String(repeating: "a", count: size) + "\r\n")
        guard case .queued(let id) = await e.ingress.deliver(envelope, content: content, session: e.session) else {
            throw TestFailure("not queued")
        }
        return id
    }

    /// Checks with Python that `file` is alice's DSN for carol of "Quarterly numbers".
    func expectDSNForCarol(_ file: String, status: String, diagnostic: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        try checkDSNWithPython(
            file,
            expected: [
                "reporting_mta": e.configuration.hostname, "to": "alice@example.test", "original_subject": "Quarterly numbers",
                "recipients": [["final": "carol@example.test", "action": "failed", "status": status, "diagnostic": diagnostic, "remote_mta": NSNull()]],
            ], sourceLocation: sourceLocation)
    }

    /// Bounces queued so far (messages from `<>`).
    func bounceCount() async throws -> Int64 { try await e.count("SELECT COUNT(*) AS n FROM queue_messages WHERE mail_from = ''") }

    /// Runs delivery until nothing more is due at `now`.
    func deliverAll(now: Date = Date()) async throws {
        var rounds = 0
        while try await delivery.runOnce(now: now) > 0, rounds < 10 { rounds += 1 }
    }
}

struct TestFailure: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

private func withBouncing(_ backend: DatabaseBackend, _ body: (Bouncing) async throws -> Void) async throws {
    try await withEmbedded(backend) { e in try await body(Bouncing(e)) }
}

/// Runs Tests/IntegrationTests/Support/dsn_check.py (Python's email package) on a stored message.
func checkDSNWithPython(_ path: String, expected: [String: Any], sourceLocation: SourceLocation = #_sourceLocation) throws {
    let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("IntegrationTests/Support/dsn_check.py").path
    let json = String(decoding: try JSONSerialization.data(withJSONObject: expected), as: UTF8.self)
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    process.arguments = ["python3", script, path, json]
    let output = Pipe()
    process.standardOutput = output
    process.standardError = output
    try process.run()
    let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    process.waitUntilExit()
    #expect(process.terminationStatus == 0 && text.hasPrefix("ok"), "dsn_check.py (python3 must be on PATH): \(text)", sourceLocation: sourceLocation)
}

@Suite("Bounces and DELIVERBY") struct BounceTests {
    static let host = "mail.example.test"

    @Test("quota: a message deferred for a full mailbox until its attempts run out fails, and a DSN reaches the local sender", arguments: DatabaseBackend.allCases)
    func quotaExhaustedBounces(_ backend: DatabaseBackend) async throws {
        try await withBouncing(backend) { b in
            try await b.makeAccounts()
            // 0.6 MB fits carol's 1 MB; the second does not and is deferred on every attempt.
            _ = try await b.send(subject: "first", size: 600_000)
            let id = try await b.send(subject: "Quarterly numbers", size: 600_000)
            var now = Date()
            for attempt in 1...5 {
                #expect(try b.e.maildir("alice@example.test").isEmpty, "no DSN before the last attempt")
                try await b.deliverAll(now: now)
                #expect(try await b.e.database.int("SELECT attempts FROM queue_recipients WHERE message_id = '\(id)'") == Int64(attempt))
                now = now.addingTimeInterval(40_000)
            }
            #expect(try await b.e.database.text("SELECT status FROM queue_recipients WHERE message_id = '\(id)'") == "failed")
            // The DSN was queued by the last run and delivered into alice's mailbox by the next.
            let files = try b.e.maildir("alice@example.test")
            try #require(files.count == 1)
            let stored = try String(contentsOfFile: files[0], encoding: .utf8)
            #expect(stored.hasPrefix("Return-Path: <>\r\nFrom: Mail Delivery System <MAILER-DAEMON@\(Self.host)>\r\n"))
            #expect(stored.contains("Message-ID: <dsn.\(id)."))
            try b.expectDSNForCarol(files[0], status: "5.2.2", diagnostic: "x-mailtier; mailbox full (quota 1 MB)")
            #expect(try b.e.maildir("carol@example.test").count == 1, "only the first message")
            #expect(try await b.bounceCount() == 0, "the delivered DSN left the queue")
        }
    }

    @Test("a recipient accepted at RCPT whose mailbox fills before the end of data is still queued (then deferred, then bounced), not dropped", arguments: DatabaseBackend.allCases)
    func mailboxFillsDuringTransaction(_ backend: DatabaseBackend) async throws {
        try await withBouncing(backend) { b in
            try await b.makeAccounts()
            try await b.e.accounts.setQuota(username: "carol", quotaMB: 10)
            _ = try await b.send(subject: "one", size: 600_000)
            _ = try await b.send(subject: "two", size: 600_000)
            try await b.deliverAll()
            #expect(try b.e.maildir("carol@example.test").count == 2)
            // RCPT said 250 for carol and alice; then carol's mailbox is over quota.
            let carol = ForwardPath.mailbox(Mailbox(localPart: "carol", domain: "example.test"))
            #expect(await b.e.ingress.checkRecipient(carol, envelope: b.e.envelope(to: []), session: b.e.session) == nil)
            try await b.e.accounts.setQuota(username: "carol", quotaMB: 1)
            #expect(await b.e.ingress.checkRecipient(carol, envelope: b.e.envelope(to: []), session: b.e.session) == .mailboxFull("carol@example.test"))
            let content = ByteBuffer(string: "Subject: Quarterly numbers\r\n\r\nsmall\r\n")
            guard case .queued(let id) = await b.e.ingress.deliver(b.e.envelope(from: "alice@example.test", to: ["carol@example.test", "alice@example.test"]), content: content, session: b.e.session) else {
                Issue.record("not queued")
                return
            }
            #expect(try await b.e.count("SELECT COUNT(*) AS n FROM queue_recipients WHERE message_id = '\(id)'") == 2, "carol was not dropped")
            var now = Date()
            for _ in 1...5 {
                try await b.deliverAll(now: now)
                now = now.addingTimeInterval(40_000)
            }
            #expect(try await b.e.database.text("SELECT status FROM queue_recipients WHERE message_id = '\(id)' AND recipient = 'carol@example.test'") == "failed")
            let files = try b.e.maildir("alice@example.test")
            #expect(files.count == 2, "the message itself and the DSN for carol")
            let dsn = try #require(try files.first { try String(contentsOfFile: $0, encoding: .utf8).contains("report-type=delivery-status") })
            try b.expectDSNForCarol(dsn, status: "5.2.2", diagnostic: "mailbox full")
        }
    }

    @Test("DELIVERBY ;R: a retry is moved to the deadline; at the deadline no attempt, the recipient fails 5.4.7 and a DSN goes to the sender", arguments: DatabaseBackend.allCases)
    func deliverByReturn(_ backend: DatabaseBackend) async throws {
        try await withBouncing(backend) { b in
            try await b.makeAccounts()
            _ = try await b.send(subject: "first", size: 600_000)
            let id = try await b.send(size: 600_000, deliverBy: DeliverBy(seconds: 600, mode: .returnMessage))
            let deliverBy = try #require(try await b.e.database.int("SELECT deliver_by FROM queue_recipients WHERE message_id = '\(id)'"))
            #expect(try await b.e.database.text("SELECT by_mode FROM queue_messages WHERE id = '\(id)'") == "R")
            let created = try #require(try await b.e.database.int("SELECT created_at FROM queue_messages WHERE id = '\(id)'"))
            #expect(deliverBy - created == 600)

            // First attempt: deferred (full); the schedule would say 60 s, well before the deadline.
            try await b.deliverAll()
            #expect(try await b.e.database.text("SELECT status FROM queue_recipients WHERE message_id = '\(id)'") == "retry")
            // Second attempt at +550 s: the schedule's 300 s would pass the deadline: moved to it.
            try await b.deliverAll(now: Date(unixSeconds: created + 550))
            #expect(try await b.e.database.int("SELECT next_retry FROM queue_recipients WHERE message_id = '\(id)'") == deliverBy)
            #expect(try await b.bounceCount() == 0)

            // Room in carol's mailbox now: but the deadline has come, so no attempt is made.
            try await b.e.accounts.setQuota(username: "carol", quotaMB: 100)
            try await b.deliverAll(now: Date(unixSeconds: deliverBy))
            #expect(try await b.e.database.text("SELECT status FROM queue_recipients WHERE message_id = '\(id)'") == "failed")
            #expect(try await b.e.database.text("SELECT last_error FROM queue_recipients WHERE message_id = '\(id)'") == "delivery time expired")
            #expect(try b.e.maildir("carol@example.test").count == 1, "not delivered after the deadline")
            let files = try b.e.maildir("alice@example.test")
            try #require(files.count == 1)
            let stored = try String(contentsOfFile: files[0], encoding: .utf8)
            #expect(!stored.contains("Last-Attempt-Date"), "no attempt at the deadline")
            try b.expectDSNForCarol(files[0], status: "5.4.7", diagnostic: "delivery time expired")
        }
    }

    @Test("DELIVERBY ;N past the deadline: still delivered, no notice; ;R before it: delivered, no notice", arguments: DatabaseBackend.allCases)
    func deliverByNotify(_ backend: DatabaseBackend) async throws {
        try await withBouncing(backend) { b in
            try await b.makeAccounts()
            let late = try await b.send(subject: "late", deliverBy: DeliverBy(seconds: 60, mode: .notify))
            #expect(try await b.e.database.text("SELECT by_mode FROM queue_messages WHERE id = '\(late)'") == "N")
            _ = try await b.send(subject: "in time", deliverBy: DeliverBy(seconds: 3600, mode: .returnMessage))
            try await b.deliverAll(now: Date().addingTimeInterval(600))
            #expect(try b.e.maildir("carol@example.test").count == 2)
            #expect(try b.e.maildir("alice@example.test").isEmpty)
            #expect(try await b.e.count("SELECT COUNT(*) AS n FROM queue_messages") == 0)
        }
    }

    @Test("never to the null sender <>, so never a bounce of a bounce", arguments: DatabaseBackend.allCases)
    func nullSender(_ backend: DatabaseBackend) async throws {
        try await withBouncing(backend) { b in
            try await b.makeAccounts()
            let id = try await b.send(from: .null, deliverBy: DeliverBy(seconds: 60, mode: .returnMessage))
            try await b.deliverAll(now: Date().addingTimeInterval(120))
            #expect(try await b.e.database.text("SELECT status FROM queue_recipients WHERE message_id = '\(id)'") == "failed")
            #expect(try await b.e.count("SELECT COUNT(*) AS n FROM queue_messages") == 1, "no DSN queued")
            #expect(try await b.bounces.bounce([Self.failure(id: 1, messageID: id, mailFrom: "")]) == nil)
        }
    }

    @Test("a repeated notice (crash between notice and record) queues one DSN", arguments: DatabaseBackend.allCases)
    func repeatedNotice(_ backend: DatabaseBackend) async throws {
        try await withBouncing(backend) { b in
            try await b.makeAccounts()
            let id = try await b.send(to: "carol@example.test", deliverBy: DeliverBy(seconds: 60, mode: .returnMessage))
            _ = try await b.send(to: "alice@example.test", subject: "unrelated")
            let later = Date().addingTimeInterval(120)
            // A worker claims the job, tells the notifier, and dies before recording.
            let jobs = try await b.e.queue.claimDue(
                now: later, limit: 10, lease: .seconds(300), localOnly: true, makeDeliveryKey: { b.e.mailboxes.makeDeliveryKey() })
            let job = try #require(jobs.first { $0.messageID == id })
            #expect(job.missedDeadline(at: later))
            let failure = FailedDelivery(job: job, problem: .deadlineExpired, reason: .deadline)
            try await b.bounces.notify([failure])
            try await b.bounces.notify([failure])
            #expect(try await b.bounceCount() == 1)
            let blobs = try await b.e.spool.list().count
            #expect(blobs == 3, "two messages and one DSN: the repeated notice left no blob behind")
            // Restart: the job is claimed again, fails again, is noticed again: still one DSN.
            try await b.e.queue.releaseAllLeases()
            try await b.deliverAll(now: later)
            #expect(try await b.e.database.text("SELECT status FROM queue_recipients WHERE message_id = '\(id)'") == "failed")
            let dsns = try b.e.maildir("alice@example.test").filter { try String(contentsOfFile: $0, encoding: .utf8).contains("multipart/report") }
            #expect(dsns.count == 1)
            #expect(BounceService.queueID(messageID: id, jobIDs: [3, 1]) == BounceService.queueID(messageID: id, jobIDs: [1, 3]))
            #expect(BounceService.queueID(messageID: id, jobIDs: [1]) != BounceService.queueID(messageID: id, jobIDs: [1, 3]))
        }
    }

    @Test("the sender decides the route: a remote sender's DSN is a remote job; an unknown local sender gets none", arguments: DatabaseBackend.allCases)
    func routing(_ backend: DatabaseBackend) async throws {
        try await withBouncing(backend) { b in
            try await b.makeAccounts()
            // Two failed recipients of one message: one DSN with two recipient blocks.
            let remote = try #require(
                try await b.bounces.bounce([
                    Self.failure(id: 7, messageID: "msg_original", mailFrom: "Bob@Remote.Example", recipient: "carol@example.test"),
                    Self.failure(id: 8, messageID: "msg_original", mailFrom: "Bob@Remote.Example", recipient: "alice@example.test"),
                ]))
            #expect(try await b.e.database.text("SELECT recipient FROM queue_recipients WHERE message_id = '\(remote)'") == "Bob@Remote.Example")
            #expect(try await b.e.database.text("SELECT domain FROM queue_recipients WHERE message_id = '\(remote)'") == "remote.example")
            #expect(try await b.e.database.int("SELECT is_local FROM queue_recipients WHERE message_id = '\(remote)'") == 0)
            #expect(try await b.e.database.text("SELECT mail_from FROM queue_messages WHERE id = '\(remote)'") == "")
            let blobKey = try #require(try await b.e.database.text("SELECT blob_key FROM queue_messages WHERE id = '\(remote)'"))
            let text = String(buffer: try await b.e.spool.get(key: blobKey))
            #expect(text.components(separatedBy: "\r\nFinal-Recipient: ").count == 3)
            #expect(text.contains("To: <Bob@Remote.Example>\r\n"))
            #expect(text.contains("\r\nRemote-MTA: dns; mx.remote.example\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user\r\n"))
            #expect(!text.contains("smtp; smtp;") && !text.contains("dns; dns;"))
            // The original blob was missing: the DSN still went, without the headers.
            #expect(text.contains("Content-Type: text/rfc822-headers"))

            #expect(try await b.bounces.bounce([Self.failure(id: 9, messageID: "msg_other", mailFrom: "nobody@example.test")]) == nil)
            #expect(try await b.bounceCount() == 1)
        }
    }

    static func failure(
        id: Int64, messageID: String, mailFrom: String, recipient: String = "carol@example.test"
    ) -> FailedDelivery {
        let job = DeliveryJob(
            id: id, messageID: messageID, blobKey: messageID, mailFrom: mailFrom, recipient: recipient, isLocal: true, attempts: 0,
            maxAttempts: 5, leaseToken: "token", deliveryKey: "key", receivedAt: Date())
        return FailedDelivery(
            job: job,
            // As the outbound transport reports a refusal: both with their RFC 3464 type.
            problem: DeliveryProblem(
                isPermanent: true, status: "5.1.1", message: "mx.remote.example said: 550 5.1.1 no such user",
                diagnostic: "smtp; 550 5.1.1 no such user", remoteMTA: "dns; mx.remote.example"),
            reason: .permanent)
    }
}
