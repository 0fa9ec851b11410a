import Foundation
import Testing

/// The per-address limits of API.md "Rate Limiting", in embedded mode (in-process counters),
/// through the running server. The cluster tests check the same limits shared through Redis.
@Suite("Rate limits, black box", .timeLimit(.minutes(3)))
struct RateLimitTests {
    static let connectionRefused = "421 4.7.0 \(SMTP.hostname) Too many connections from your address, try again later"
    static let commandRefused = "421 4.7.0 \(SMTP.hostname) Too many commands from your address, closing connection"
    static let messageRefused = "450 4.7.1 Too many messages from your address, try again later"
    static let authLocked = "454 4.7.0 Too many authentication failures, try again later"

    @Test("connections: the one over SMTP_RATE_CONNECTIONS_PER_MINUTE gets 421 4.7.0 before any greeting and is closed")
    func connectionLimit() async throws {
        try await withServer(["SMTP_RATE_CONNECTIONS_PER_MINUTE": "3"]) { h in
            var s = SMTPScript()
            for conn in ["1", "2", "3"] {
                s.greeting(conn: conn)
            }
            s.expectClosed(after: [Self.connectionRefused], conn: "4")
            // The admitted sessions keep working.
            s.cmd("EHLO client.test", SMTP.ehlo(), conn: "1")
            s.cmd("QUIT", SMTP.bye, conn: "1")
            try await s.run(h)
            #expect(h.logTail(200).contains("connection rate limit"))
        }
    }

    @Test("commands: the command over SMTP_RATE_COMMANDS_PER_MINUTE gets 421 4.7.0 and the connection closes; pipelined too")
    func commandLimit() async throws {
        try await withServer(["SMTP_RATE_COMMANDS_PER_MINUTE": "4"]) { h in
            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            s.cmd("NOOP", SMTP.ok)
            s.cmd("NOOP", SMTP.ok)
            s.cmd("NOOP", SMTP.ok)
            s.cmd("NOOP", [Self.commandRefused])
            s.expectClosed()
            // The window is per address: a new connection in the same minute is refused at its first command.
            s.greeting(conn: "again")
            s.send("NOOP\r\nNOOP\r\n", conn: "again")
            s.expectClosed(after: [Self.commandRefused], conn: "again")
            try await s.run(h)
        }
    }

    @Test("AUTH: after SMTP_RATE_AUTH_FAILURES_PER_HOUR failures even the right password gets 454 4.7.0; other checks unchanged")
    func authFailureLimit() async throws {
        try await withServer(["SMTP_RATE_AUTH_FAILURES_PER_HOUR": "2"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", "wrong-1"))", SMTP.authInvalid)
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", "wrong-2"))", SMTP.authInvalid)
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword))", Self.authLocked)
            s.cmd("MAIL FROM:<alice@example.test>", "530 5.7.0 Authentication required")
            s.cmd("QUIT", SMTP.bye)
            s.expectClosed()
            // Counted per address, not per connection.
            s.greeting(conn: "next")
            s.cmd("EHLO client.test", SMTP.ehlo(), conn: "next")
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword))", Self.authLocked, conn: "next")
            try await s.run(h)
            #expect(h.logTail(200).contains("AUTH refused: too many failures"))
        }
    }

    @Test("messages: after SMTP_RATE_MESSAGES_PER_HOUR accepted messages the next gets 450 4.7.1 at RCPT and nothing is queued")
    func messageLimit() async throws {
        try await withServer(["SMTP_RATE_MESSAGES_PER_HOUR": "2", "SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            for index in 1...2 {
                s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
                s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
                s.cmd("DATA", SMTP.startData)
                s.send("Subject: limited \(index)\r\n\r\nbody\r\n.\r\n", expect: [SMTP.queued])
            }
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", Self.messageRefused)
            s.cmd("DATA", "554 5.5.1 No valid recipients")
            s.cmd("QUIT", SMTP.bye)
            s.expectClosed()
            try await s.run(h)
            _ = try await h.waitForMaildirFiles(for: "alice@example.test", count: 2)
            try await Task.sleep(for: .seconds(2))
            #expect(h.maildirFiles(for: "alice@example.test").count == 2)
        }
    }
}
