// Bounces (RFC 3464 DSNs) and DELIVERBY (RFC 2852) with the real smtp-server binary: the failure
// is a real local delivery into a full mailbox or a missed deadline, the DSN is queued and
// delivered by the server itself, and Python's email package parses what lands in the sender's
// maildir (Support/dsn_check.py).

import Foundation
import Testing

@Suite("Bounces with the smtp-server binary", .serialized)
struct BounceDeliveryTests {
    static let password = "Al1ce-Passw0rd!"

    /// alice sends; carol's 1 MB mailbox is filled by a first message of 0.6 MB.
    static func fillCarol(_ h: ServerHarness, createAlice: Bool = true) async throws {
        if createAlice { try await h.createUser("alice", "alice@example.test", password) }
        try await h.createUser("carol", "carol@example.test", password)
        let quota = try await h.userCLI(["set-quota", "carol", "1"])
        #expect(quota.status == 0, "\(quota.output)")
        let sent = try await smtplibSend(h, from: "alice@example.test", to: ["carol@example.test"], body: message("first", size: 600_000))
        #expect(sent.queueID != nil, "\(sent.replies)")
        try await h.waitForMaildirFiles(for: "carol@example.test", count: 1)
    }

    static func message(_ subject: String, size: Int) -> [UInt8] {
        Array("From: Alice <alice@example.test>\r\nTo: carol@example.test\r\nSubject: \(subject)\r\n\r\n".utf8)
            + Array(body(size).utf8)
    }

    /// About `size` octets of text in lines of 100 (lines are limited to 1000).
    static func body(_ size: Int) -> String {
        String(repeating: String(repeating: "a", count: 98) + "\r\n", count: size / 100)
    }

    /// Runs dsn_check.py on a stored message; fails with its report.
    static func checkDSN(_ file: URL, _ expected: [String: Any], sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let json = String(decoding: try JSONSerialization.data(withJSONObject: expected), as: UTF8.self)
        let result = try await runProcess(try await Tools.python(), [try Tools.script("dsn_check.py"), file.path, json])
        #expect(result.status == 0 && result.stdout.hasPrefix("ok"), "dsn_check.py: \(result.output)", sourceLocation: sourceLocation)
    }

    /// The messages of `email`'s mailbox that are DSNs.
    static func bounces(_ h: ServerHarness, _ email: String) -> [URL] {
        h.maildirFiles(for: email).filter { ((try? String(contentsOf: $0, encoding: .utf8)) ?? "").contains("report-type=delivery-status") }
    }

    @Test("SMTP_MAX_ATTEMPTS=1: a message deferred for a full mailbox fails at once; the local sender gets a DSN that Python parses; <> gets none")
    func quotaBounce() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false", "SMTP_MAX_ATTEMPTS": "1"]) { h in
            try await Self.fillCarol(h)
            // From <>: fails the same way, and nobody is told.
            let null = try await smtplibSend(h, from: "", to: ["carol@example.test"], body: Self.message("from null", size: 600_000))
            let nullID = try #require(null.queueID, "\(null.replies)")
            let sent = try await smtplibSend(h, from: "alice@example.test", to: ["carol@example.test"], body: Self.message("Quarterly numbers", size: 600_000))
            let id = try #require(sent.queueID, "\(sent.replies)")
            let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: "dsn.\(id).", timeout: .seconds(60))
            try await Self.checkDSN(
                stored.url,
                [
                    "reporting_mta": ServerHarness.hostname, "to": "alice@example.test", "original_subject": "Quarterly numbers",
                    "recipients": [
                        ["final": "carol@example.test", "action": "failed", "status": "5.2.2", "diagnostic": "mailbox full", "remote_mta": NSNull()]
                    ],
                ])
            let text = String(decoding: stored.bytes, as: UTF8.self)
            #expect(text.contains("Received: from client.test"), "the original's trace header is returned")
            #expect(!text.contains("aaaaaaaaaa"), "headers only, not the body")
            #expect(Self.bounces(h, "alice@example.test").count == 1)
            #expect(h.maildirFiles(for: "carol@example.test").count == 1)
            #expect(h.log.contains("no bounce: the message came from the null sender <>"))
            #expect(h.log.contains(nullID))
        }
    }

    @Test("remote peer 5xx: the local sender gets a DSN naming the refused recipient, the peer and its reply; the accepted one is not in it")
    func remoteRejectionBounce() async throws {
        try await RemoteDeliveryTests().withRemoteSetup { h, peer in
            let id = try await RemoteDeliveryTests().send(h, to: ["reject-erin@remote.test", "frank@remote.test"])
            let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: "dsn.\(id).", timeout: .seconds(60))
            try await Self.checkDSN(
                stored.url,
                [
                    "reporting_mta": ServerHarness.hostname, "to": "alice@example.test", "original_subject": "outbound",
                    "recipients": [
                        [
                            "final": "reject-erin@remote.test", "action": "failed", "status": "5.1.1", "remote_mta": "mx.remote.test",
                            "diagnostic": "smtp; 550 5.1.1 <reject-erin@remote.test>: Recipient address rejected: no such user here",
                        ]
                    ],
                ])
            let messages = try await peer.waitForMessages(1, server: h)
            #expect(messages[0].rcpt_tos == ["frank@remote.test"])
            #expect(Self.bounces(h, "alice@example.test").count == 1)
        }
    }

    @Test("a remote sender's bounce goes out like any other message: MAIL FROM:<> to the sender's MX, a DSN that Python parses")
    func bounceToRemoteSender() async throws {
        try await RemoteDeliveryTests().withRemoteSetup(overrides: ["SMTP_MAX_ATTEMPTS": "1"]) { h, peer in
            try await Self.fillCarol(h, createAlice: false)
            let sent = try await smtplibSend(h, from: "bob@remote.test", to: ["carol@example.test"], body: Self.message("Quarterly numbers", size: 600_000))
            let id = try #require(sent.queueID, "\(sent.replies)")
            let messages = try await peer.waitForMessages(1, timeout: .seconds(60), server: h)
            #expect(messages[0].mail_from == "<>", "aiosmtpd reports the null reverse path as <>")
            #expect(messages[0].rcpt_tos == ["bob@remote.test"])
            let file = peer.directory.appendingPathComponent("msg-1.eml")
            #expect(String(decoding: messages[0].content, as: UTF8.self).contains("Message-ID: <dsn.\(id)."))
            try await Self.checkDSN(
                file,
                [
                    "return_path": false, "reporting_mta": ServerHarness.hostname, "to": "bob@remote.test",
                    "original_subject": "Quarterly numbers",
                    "recipients": [["final": "carol@example.test", "action": "failed", "status": "5.2.2", "diagnostic": "mailbox full"]],
                ])
            #expect(Self.bounces(h, "alice@example.test").isEmpty)
        }
    }

    @Test("DELIVERBY: BY=5;R past its deadline is returned with 5.4.7; BY=1;N past its deadline is still delivered, without a notice")
    func deliverBy() async throws {
        try await withServer([
            "SMTP_ENABLE_AUTH": "false", "SMTP_DELIVERBY_MIN_SECONDS": "1", "SMTP_RETRY_SCHEDULE": "2", "SMTP_MAX_ATTEMPTS": "100",
        ]) { h in
            try await Self.fillCarol(h)
            let body = Self.body(600_000)
            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo(deliverBy: 1))
            s.cmd("MAIL FROM:<alice@example.test> BY=5;R", SMTP.senderOk)
            s.cmd("RCPT TO:<carol@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: Return me\r\n\r\n\(body).\r\n", expect: [SMTP.queued])
            s.cmd("MAIL FROM:<alice@example.test> BY=1;N", SMTP.senderOk)
            s.cmd("RCPT TO:<carol@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: Keep trying\r\n\r\n\(body).\r\n", expect: [SMTP.queued])
            s.cmd("QUIT", SMTP.bye)
            let ids = try await s.run(h).queueIDs
            try #require(ids.count == 2)

            // Deferred (full) every 2 s; at the ;R deadline the sender is told.
            let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: "dsn.\(ids[0]).", timeout: .seconds(60))
            try await Self.checkDSN(
                stored.url,
                [
                    "reporting_mta": ServerHarness.hostname, "to": "alice@example.test", "original_subject": "Return me",
                    "recipients": [["final": "carol@example.test", "action": "failed", "status": "5.4.7", "diagnostic": "delivery time expired"]],
                ])
            // Room again: the ;N message, long past its deadline, is delivered; the ;R one is not.
            let quota = try await h.userCLI(["set-quota", "carol", "100"])
            #expect(quota.status == 0, "\(quota.output)")
            _ = try await h.waitForStoredMessage(for: "carol@example.test", containing: ids[1], timeout: .seconds(60))
            try await Task.sleep(for: .seconds(3))
            #expect(h.maildirFiles(for: "carol@example.test").count == 2, "the first message and the ;N one")
            #expect(Self.bounces(h, "alice@example.test").count == 1, "no notice for ;N")
        }
    }
}
