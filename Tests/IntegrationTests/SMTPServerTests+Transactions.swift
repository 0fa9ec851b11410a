// Mail transactions: PIPELINING, CHUNKING, SIZE, smuggling, line limits, relay,
// limits, DELIVERBY, ETRN and ATRN.

import Foundation
import Testing

extension SMTPServerTests {

    // MARK: 6. PIPELINING

    @Test("PIPELINING: swaks --pipeline delivers; a pipelined group gets its replies in order")
    func pipelining() async throws {
        let swaks = try Tools.path("swaks")
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            let token = "pipelined-\(UUID().uuidString)"
            let run = try await runProcess(
                swaks,
                [
                    "--pipeline", "--server", "127.0.0.1:\(h.smtpPort)", "--to", "alice@example.test",
                    "--from", "bob@example.org", "--ehlo", "client.test", "--header", "Subject: swaks pipeline",
                    "--body", "body \(token)", "--timeout", "20",
                ], environment: cleanEnvironment())
            #expect(run.status == 0, "swaks failed:\n\(run.output)")
            let swaksID = try #require(
                run.stdout.split(separator: "\n").lazy.compactMap { parseQueueID(String($0)) }.first,
                "no queue id in swaks' transcript:\n\(run.output)")
            let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: token)
            let text = String(decoding: stored.bytes, as: UTF8.self)
            #expect(text.hasPrefix("Return-Path: <bob@example.org>\r\nReceived: "))
            #expect(text.contains(swaksID))
            #expect(text.contains("\r\nSubject: swaks pipeline\r\n"))
            #expect(text.contains("\r\nbody \(token)\r\n"))

            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            s.send(
                "MAIL FROM:<bob@example.org>\r\nRCPT TO:<alice@example.test>\r\nRCPT TO:<nobody@example.test>\r\nDATA\r\n",
                expect: [
                    SMTP.senderOk, SMTP.recipientOk,
                    "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown", SMTP.startData,
                ])
            s.send("Subject: pipelined group\r\n\r\nfour commands, one write\r\n.\r\nQUIT\r\n", expect: [SMTP.queued, SMTP.bye])
            s.expectClosed()
            let t = try await s.run(h)
            let id = try #require(t.queueIDs.first)
            let group = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
            expectStoredMessage(
                group.bytes, sender: "bob@example.org", helo: "client.test", queueID: id, recipient: "alice@example.test",
                body: crlf("Subject: pipelined group", "", "four commands, one write"))
        }
    }

    // MARK: 7. CHUNKING (BDAT)

    @Test("BDAT: chunks, LAST, BDAT 0 LAST, binary-safe body, bad sequences, malformed BDAT closes")
    func bdat() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            // A bare LF, an 8-bit byte (not UTF-8) and a lone "." line: stored verbatim.
            let binary: [UInt8] =
                Array("Subject: binary\r\n\r\nbare LF here\nand an 8-bit ".utf8) + [0xE9]
                + Array(" byte\r\n.\r\nafter a dot line\r\n".utf8)

            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.send("BDAT 5\r\nHello", expect: ["250 2.0.0 5 octets received"])
            s.send("BDAT 8 LAST\r\n World\r\n", expect: [SMTP.queued])  // " World\r\n" is 8 octets

            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.send(Array("BDAT \(binary.count)\r\n".utf8) + binary, expect: ["250 2.0.0 \(binary.count) octets received"])
            s.cmd("BDAT 0 LAST", SMTP.queued)

            // DATA after BDAT in one transaction.
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.send("BDAT 3\r\nabc", expect: ["250 2.0.0 3 octets received"])
            s.cmd("DATA", "503 5.5.1 DATA not allowed after BDAT")
            s.cmd("RSET", SMTP.ok)
            // BDAT without MAIL: the chunk is consumed (else "xyzwNOOP" would be a command).
            s.send("BDAT 4\r\nxyzw", expect: ["503 5.5.1 Need MAIL command first"])
            s.cmd("NOOP", SMTP.ok)
            s.send("BDAT 4 LAST\r\nxyzw", expect: ["503 5.5.1 Need MAIL command first"])
            s.cmd("NOOP", SMTP.ok)
            // BDAT without an accepted recipient.
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.send("BDAT 2 LAST\r\nhi", expect: ["554 5.5.1 No valid recipients"])
            s.cmd("RSET", SMTP.ok)
            // Malformed BDAT: the chunk length is unknown, so the connection is closed.
            s.cmd("BDAT abc", "501 5.5.4 Syntax: BDAT <size> [LAST]")
            s.expectClosed()
            let t = try await s.run(h)
            try #require(t.queueIDs.count == 2)

            let hello = try await h.waitForStoredMessage(for: "alice@example.test", containing: t.queueIDs[0])
            expectStoredMessage(
                hello.bytes, sender: "bob@example.org", helo: "client.test", queueID: t.queueIDs[0],
                recipient: "alice@example.test", body: Array("Hello World\r\n".utf8))
            let bin = try await h.waitForStoredMessage(for: "alice@example.test", containing: t.queueIDs[1])
            expectStoredMessage(
                bin.bytes, sender: "bob@example.org", helo: "client.test", queueID: t.queueIDs[1],
                recipient: "alice@example.test", body: binary)
        }
    }

    // MARK: 8. SIZE and the transaction's errors

    @Test("SIZE: advertised limit, SIZE= over it, body over it (552), session resyncs; MAIL/RCPT/DATA errors")
    func sizeAndTransactionErrors() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false", "SMTP_MAX_MESSAGE_SIZE": "2048"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            let big = String(repeating: String(repeating: "x", count: 58) + "\r\n", count: 50)  // 3000 octets
            #expect(big.utf8.count == 3000)

            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo(size: 2048))
            s.cmd("RCPT TO:<alice@example.test>", "503 5.5.1 Need MAIL command first")
            s.cmd("DATA", "503 5.5.1 Need MAIL command first")
            s.cmd("MAIL FROM:<a@b.test> SIZE=2049", "552 5.3.4 Message size exceeds fixed maximum message size")
            s.cmd("MAIL FROM:<a@b.test> SIZE=abc", "501 5.5.4 Invalid SIZE parameter")
            s.cmd("MAIL FROM:<a@b.test> BODY=9BIT", "501 5.5.4 Invalid BODY parameter")
            s.cmd("MAIL FROM:<a@b.test> RET=HDRS", "555 5.5.4 Unsupported parameter RET")
            s.cmd("MAIL FROM:<a@b.test> ENVID=abc", "555 5.5.4 Unsupported parameter ENVID")
            s.cmd("MAIL FROM:<a@b.test", "501 5.1.7 Bad sender address syntax")
            // EHLO in the middle of a transaction resets it.
            s.cmd("MAIL FROM:<a@b.test>", SMTP.senderOk)
            s.cmd("EHLO client.test", SMTP.ehlo(size: 2048))
            s.cmd("RCPT TO:<alice@example.test>", "503 5.5.1 Need MAIL command first")
            s.cmd("MAIL FROM:<a@b.test> SIZE=2048 BODY=8BITMIME", SMTP.senderOk)
            s.cmd("MAIL FROM:<a@b.test>", "503 5.5.1 Sender already specified")
            s.cmd("DATA", "554 5.5.1 No valid recipients")
            s.cmd("RSET", SMTP.ok)
            s.cmd("MAIL FROM:<a@b.test> SIZE=100", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test> NOTIFY=NEVER", "555 5.5.4 Unsupported parameter NOTIFY")
            s.cmd("RCPT TO:<alice@example.test", "501 5.1.3 Bad recipient address syntax")
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("DATA now", "501 5.5.4 Syntax error, no parameters allowed")
            s.cmd("DATA", SMTP.startData)
            s.send(big + ".\r\n", expect: ["552 5.3.4 Message size exceeds fixed maximum message size"])
            // The session is in sync: a small message in the same session is accepted.
            s.cmd("MAIL FROM:<a@b.test>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: small\r\n\r\nfits\r\n.\r\n", expect: [SMTP.queued])
            s.cmd("QUIT", SMTP.bye)
            let t = try await s.run(h)
            let id = try #require(t.queueIDs.first)
            let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
            expectStoredMessage(
                stored.bytes, sender: "a@b.test", helo: "client.test", queueID: id, recipient: "alice@example.test",
                body: crlf("Subject: small", "", "fits"))
            #expect(h.maildirFiles(for: "alice@example.test").count == 1)
        }
    }

    // MARK: 9. SMTP smuggling

    @Test("smuggling: fake end-of-data sequences and bare LF never split a message (554 5.6.0)")
    func smuggling() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            let smuggled = "MAIL FROM:<evil@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled body\r\n.\r\n"
            let bareCRLF = "554 5.6.0 Message contains bare CR or LF, lines must end with CRLF"

            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            for fake in ["\n.\n", "\r.\r", "\n.\r\n", "\r\n.\n", "\r.\r\n"] {
                s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
                s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
                s.cmd("DATA", SMTP.startData)
                // One reply, at the real CRLF.CRLF; the "smuggled" commands are body text.
                s.send("Subject: smuggle\r\n\r\nfirst" + fake + smuggled, expect: [bareCRLF])
                s.cmd("NOOP", SMTP.ok)
            }
            // Bare LF line endings in the body.
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: bare LF\nline one\nline two\n\r\n.\r\n", expect: [bareCRLF])
            // A command line ending in a bare LF is discarded, not executed.
            s.send("NOOP\n", expect: ["500 5.5.2 Bare LF received, lines must end with CRLF"])
            s.send(
                "MAIL FROM:<bob@example.org>\nRCPT TO:<alice@example.test>\r\n",
                expect: ["500 5.5.2 Bare LF received, lines must end with CRLF", "503 5.5.1 Need MAIL command first"])
            s.cmd("NOOP", SMTP.ok)
            s.cmd("QUIT", SMTP.bye)
            s.expectClosed()
            let t = try await s.run(h)
            #expect(t.queueIDs.isEmpty)

            // A canary sent afterwards arrives; nothing else ever does.
            var canary = SMTPScript()
            canary.greeting()
            canary.cmd("EHLO client.test", SMTP.ehlo())
            canary.cmd("MAIL FROM:<canary@example.org>", SMTP.senderOk)
            canary.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            canary.cmd("DATA", SMTP.startData)
            canary.send("Subject: canary\r\n\r\ncanary\r\n.\r\n", expect: [SMTP.queued])
            canary.cmd("QUIT", SMTP.bye)
            let c = try await canary.run(h)
            let id = try #require(c.queueIDs.first)
            _ = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
            // Give the queue (1 s poll) two more rounds to show anything smuggled.
            let extra = await poll(timeout: .milliseconds(2500)) { h.maildirFiles(for: "alice@example.test").count > 1 }
            #expect(!extra)
            let files = h.maildirFiles(for: "alice@example.test")
            #expect(files.count == 1)
            for file in files {
                let text = String(decoding: (try? Data(contentsOf: file)) ?? Data(), as: UTF8.self)
                #expect(!text.contains("smuggled"), "a smuggled message was stored: \(text)")
            }
        }
    }

    // MARK: 10. Over-long lines

    @Test("line limits: command line over 512 octets, DATA text line over 1000 octets; the session continues")
    func longLines() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            let longest = String(repeating: "y", count: 998)  // 1000 octets with CRLF: allowed

            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            s.cmd("NOOP " + String(repeating: "x", count: 505), SMTP.ok)  // 512 octets with CRLF
            s.cmd("NOOP " + String(repeating: "x", count: 506), "500 5.5.2 Line too long")  // 513
            s.cmd("NOOP " + String(repeating: "x", count: 593), "500 5.5.2 Line too long")  // 600
            s.cmd("NOOP", SMTP.ok)
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: too long\r\n\r\n" + String(repeating: "z", count: 1001) + "\r\nafter\r\n.\r\n", expect: ["500 5.5.2 Line too long"])
            s.cmd("NOOP", SMTP.ok)
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: longest\r\n\r\n" + longest + "\r\n.\r\n", expect: [SMTP.queued])
            s.cmd("QUIT", SMTP.bye)
            let t = try await s.run(h)
            let id = try #require(t.queueIDs.first)
            let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
            expectStoredMessage(
                stored.bytes, sender: "bob@example.org", helo: "client.test", queueID: id,
                recipient: "alice@example.test", body: crlf("Subject: longest", "", longest))
            #expect(h.maildirFiles(for: "alice@example.test").count == 1)
        }
    }

    // MARK: 11. Relay

    @Test("relay: unauthenticated relay denied, unknown local user rejected, relay allowed after AUTH")
    func relay() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.cmd("RCPT TO:<x@remote.test>", "554 5.7.1 <x@remote.test>: Relay access denied")
            s.cmd("RCPT TO:<nobody@example.test>", "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown")
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword))", "503 5.5.1 AUTH not allowed during a mail transaction")
            s.cmd("RSET", SMTP.ok)
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword))", SMTP.authOK)
            s.cmd("MAIL FROM:<alice@example.test>", SMTP.senderOk)
            s.cmd("RCPT TO:<x@remote.test>", SMTP.recipientOk)
            s.cmd("RSET", SMTP.ok)
            s.cmd("QUIT", SMTP.bye)
            try await s.run(h)
        }
    }

    // MARK: 12. Limits

    @Test("limits: SMTP_MAX_RECIPIENTS (452 4.5.3) and SMTP_MAX_CONNECTIONS (421 4.7.0, then close)")
    func recipientAndConnectionLimits() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false", "SMTP_MAX_RECIPIENTS": "2", "SMTP_MAX_CONNECTIONS": "2"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            try await h.createUser("bob", "bob@example.test", "Bob-Passw0rd!")
            try await h.createUser("carol", "carol@example.test", "Carol-Passw0rd!")

            var s = SMTPScript()
            s.greeting(conn: "a")
            s.cmd("EHLO client.test", SMTP.ehlo(), conn: "a")
            s.cmd("MAIL FROM:<sender@example.org>", SMTP.senderOk, conn: "a")
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk, conn: "a")
            s.cmd("RCPT TO:<bob@example.test>", SMTP.recipientOk, conn: "a")
            s.cmd("RCPT TO:<carol@example.test>", "452 4.5.3 Too many recipients", conn: "a")
            s.cmd("DATA", SMTP.startData, conn: "a")
            s.send("Subject: two of three\r\n\r\nlimited\r\n.\r\n", expect: [SMTP.queued], conn: "a")
            // Connection "a" stays open; "b" is the second; "c" is one too many.
            s.greeting(conn: "b")
            s.expect(["421 4.7.0 \(SMTP.hostname) Too many connections, try again later"], conn: "c")
            s.expectClosed(conn: "c")
            s.cmd("NOOP", SMTP.ok, conn: "a")
            s.cmd("NOOP", SMTP.ok, conn: "b")
            s.cmd("QUIT", SMTP.bye, conn: "a")
            s.cmd("QUIT", SMTP.bye, conn: "b")
            let t = try await s.run(h)
            let id = try #require(t.queueIDs.first)
            _ = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
            _ = try await h.waitForStoredMessage(for: "bob@example.test", containing: id)
            #expect(h.maildirFiles(for: "carol@example.test").isEmpty)

            // Once the connections are gone, a new one is greeted again.
            let port = h.smtpPort
            let greeted = await poll(timeout: .seconds(5), interval: .milliseconds(100)) {
                await onBackgroundThread { Ports.probeGreeting(port: port) }?.hasPrefix("220 ") == true
            }
            #expect(greeted)
        }
    }

    @Test("limits: an idle session gets 421 4.4.2 after SMTP_TIMEOUT_SECONDS and is closed")
    func idleTimeout() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false", "SMTP_TIMEOUT_SECONDS": "1"]) { h in
            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            s.expect(["421 4.4.2 \(SMTP.hostname) Timeout exceeded, closing connection"], timeout: 10)
            s.expectClosed()
            let started = ContinuousClock.now
            try await s.run(h)
            #expect(ContinuousClock.now - started >= .milliseconds(900))
        }
    }

    // MARK: 13 and 14. DELIVERBY, ETRN, ATRN

    @Test("DELIVERBY parameters; ETRN; ATRN before and after AUTH")
    func deliverByETRNAndATRN() async throws {
        try await withServer { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo(deliverBy: 86_400))
            s.cmd("ETRN example.org", "250 2.0.0 Queuing started for example.org")
            s.cmd("ETRN", "501 5.5.4 Syntax: ETRN <domain>")
            s.cmd("ATRN example.test", "530 5.7.0 Authentication required")
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword))", SMTP.authOK)
            s.cmd("ATRN", "501 5.5.4 Syntax: ATRN <domain>[,<domain>...]")
            s.cmd("ATRN other.test", "450 4.7.1 ATRN request refused for other.test")
            s.cmd("ATRN example.test", "453 4.3.0 You have no mail")
            s.cmd("MAIL FROM:<alice@example.test> BY=86400;R", SMTP.senderOk)
            s.cmd("ETRN example.org", "503 5.5.1 ETRN not allowed during a mail transaction")
            s.cmd("RSET", SMTP.ok)
            s.cmd("MAIL FROM:<alice@example.test> BY=3600;R", "501 5.5.4 BY time is below the minimum of 86400 seconds")
            s.cmd("MAIL FROM:<alice@example.test> BY=3600;N", SMTP.senderOk)
            s.cmd("RSET", SMTP.ok)
            s.cmd("MAIL FROM:<alice@example.test> BY=abc;R", "501 5.5.4 Invalid BY parameter")
            s.cmd("QUIT", SMTP.bye)
            try await s.run(h)
        }
    }
}
