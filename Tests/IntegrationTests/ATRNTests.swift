import Foundation
import Testing

// ATRN (RFC 2645, On-Demand Mail Relay) against the real smtp-server: a customer whose mail waits
// with us logs in, says ATRN, and — now the server on the same connection (aiosmtpd, attached to
// the socket by Support/atrn_client.py) — receives its mail from us as the client.

/// What `atrn_client.py` saw: its steps and the messages it took.
private struct ATRNSession {
    struct Step: Decodable {
        var step: String
        var line: String
    }

    struct Message: Decodable {
        var mail_from: String
        var rcpt_tos: [String]
        var content_b64: String
        var content: String { String(decoding: Data(base64Encoded: content_b64) ?? Data(), as: UTF8.self) }
    }

    private struct Line: Decodable {
        var step: String?
        var line: String?
        var message: Message?
        var closed: Bool?
    }

    var steps: [Step] = []
    var messages: [Message] = []
    var closed = false
    var output: String

    init(_ result: ProcessResult) {
        output = result.output
        for text in result.stdout.split(separator: "\n") {
            guard let line = try? JSONDecoder().decode(Line.self, from: Data(text.utf8)) else { continue }
            if let step = line.step { steps.append(Step(step: step, line: line.line ?? "")) }
            if let message = line.message { messages.append(message) }
            if line.closed == true { closed = true }
        }
    }

    func reply(_ step: String) -> String? { steps.first { $0.step == step }?.line }
}

@Suite("ATRN: the connection turns around and the customer takes its mail")
struct ATRNTests {
    static let customerPassword = "Carl-Passw0rd!"

    private func atrn(_ h: ServerHarness, user: String, password: String, domains: String) async throws -> ATRNSession {
        let result = try await runProcess(
            try await Tools.python(),
            [try Tools.script("atrn_client.py"), "\(h.smtpPort)", user, password, domains, "--timeout", "60"],
            environment: cleanEnvironment(), timeout: .seconds(90))
        let session = ATRNSession(result)
        if result.timedOut || session.reply("error") != nil {
            throw HarnessError("atrn_client.py failed:\n\(result.output)\nlog tail:\n\(h.logTail())")
        }
        return session
    }

    private func send(_ h: ServerHarness, to recipients: [String], subject: String) async throws -> String {
        var options = SMTPClientOptions()
        options.auth = ("PLAIN", "alice", alicePassword)
        let body = Array("From: alice@example.test\r\nSubject: \(subject)\r\n\r\nFor the customer.\r\n".utf8)
        let result = try await smtplibSend(h, from: "alice@example.test", to: recipients, body: body, options: options)
        guard let queueID = result.queueID else { throw HarnessError("not queued: \(result.replies.map(\.line))") }
        return queueID
    }

    @Test("ATRN by the domain's user: 250, then our client delivers every waiting message over the same connection and QUITs; the rows go; a second ATRN finds no mail; another domain is refused")
    func turnAround() async throws {
        // Remote mail cannot leave on its own: the relay is a closed port, and a retry waits an hour.
        let closedPort = try Ports.free()
        try await withServer([
            "SMTP_RELAY_HOST": "127.0.0.1:\(closedPort)", "SMTP_RETRY_SCHEDULE": "3600", "SMTP_LOG_LEVEL": "debug",
        ]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            try await h.createUser("carl", "carl@customer.test", Self.customerPassword)
            let first = try await send(h, to: ["bob@customer.test"], subject: "one")
            let second = try await send(h, to: ["bob@customer.test", "dan@customer.test", "eve@other.test"], subject: "two")
            for recipient in ["bob@customer.test", "dan@customer.test", "eve@other.test"] {
                try await h.waitForRow(recipient) { $0?.status == "retry" && $0?.attempts == 1 }
            }

            let session = try await atrn(h, user: "carl", password: Self.customerPassword, domains: "customer.test")
            #expect(session.reply("atrn")?.hasPrefix("250") == true, "\(session.output)")
            #expect(session.closed, "\(session.output)")
            #expect(session.messages.count == 2, "\(session.output)")
            let byRecipients = Dictionary(session.messages.map { ($0.rcpt_tos.sorted(), $0) }, uniquingKeysWith: { a, _ in a })
            let one = byRecipients[["bob@customer.test"]]
            let two = byRecipients[["bob@customer.test", "dan@customer.test"]]
            #expect(one?.mail_from == "alice@example.test" && one?.content.contains("Subject: one") == true)
            #expect(one?.content.contains(first) == true, "the Received field names the queue id")
            #expect(two?.mail_from == "alice@example.test" && two?.content.contains("Subject: two") == true)
            #expect(two?.content.contains(second) == true)
            #expect(two.map { !$0.rcpt_tos.contains("eve@other.test") } ?? false, "only the customer's domain")

            // Delivered: the first message leaves the queue; the second stays for the other
            // domain's recipient, which still waits.
            try await h.waitForRow("dan@customer.test") { $0?.status == "delivered" }
            let rows = try await h.recipientRows()
            #expect(
                rows.map { "\($0.recipient) \($0.status)" } == ["bob@customer.test delivered", "dan@customer.test delivered", "eve@other.test retry"],
                "\(rows)")

            let again = try await atrn(h, user: "carl", password: Self.customerPassword, domains: "customer.test")
            #expect(again.reply("atrn")?.hasPrefix("453") == true, "\(again.output)")
            #expect(again.messages.isEmpty)
            let refused = try await atrn(h, user: "carl", password: Self.customerPassword, domains: "other.test")
            #expect(refused.reply("atrn")?.hasPrefix("450") == true, "\(refused.output)")
            #expect(refused.messages.isEmpty)
        }
    }

    @Test("ETRN (RFC 1985): a deferred remote recipient, next due in an hour, goes at once: 250, then the peer has it and the row is gone")
    func etrnMakesDeferredMailGoNow() async throws {
        try await RemoteDeliveryTests().withRemoteSetup(overrides: ["SMTP_RETRY_SCHEDULE": "3600"]) { h, peer in
            _ = try await RemoteDeliveryTests().send(h, to: ["tempfail-dora@remote.test"])
            let waiting = try await h.waitForRow("tempfail-dora@remote.test") { $0?.status == "retry" }
            #expect(waiting?.attempts == 1)
            #expect(peer.messages().isEmpty)
            let python = try await Tools.python()
            let etrn = try await runProcess(
                python,
                ["-c", "import smtplib, sys; s = smtplib.SMTP('127.0.0.1', int(sys.argv[1]), timeout=30); s.ehlo('client.test'); "
                    + "code, text = s.docmd('ETRN', 'remote.test'); print(code, text.decode()); s.quit()", "\(h.smtpPort)"],
                environment: cleanEnvironment())
            #expect(etrn.stdout.hasPrefix("250 2.0.0 Queuing started for remote.test"), "\(etrn.output)")
            let messages = try await peer.waitForMessages(1, timeout: .seconds(30), server: h)
            #expect(messages.first?.rcpt_tos == ["tempfail-dora@remote.test"])
            try await h.waitForRow("tempfail-dora@remote.test") { $0 == nil }
        }
    }
}
