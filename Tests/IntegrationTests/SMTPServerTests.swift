// Black-box tests of the SMTP server against docs/SMTP.md: real `smtp-server`, real
// clients (raw sockets and smtplib in Python, swaks, openssl). Each test starts its own
// server (own directory and ports), so the tests run in parallel.

import Foundation
import Testing

let alicePassword = "Alice-Passw0rd!"

/// A message: lines joined and terminated with CRLF.
func crlf(_ lines: String...) -> [UInt8] { Array(lines.map { $0 + "\r\n" }.joined().utf8) }

func expectReply(
    _ result: SMTPClientResult, _ step: String, _ expected: [String],
    sourceLocation: SourceLocation = #_sourceLocation
) {
    let actual = result.reply(step)?.lines ?? ["(no \(step) reply)"]
    #expect(
        SMTPTranscript.matches(actual, expected), "\(step): expected \(expected), got \(actual)\n\(result.process.output)",
        sourceLocation: sourceLocation)
}

@Suite("SMTP server, black box", .timeLimit(.minutes(3)))
struct SMTPServerTests {

    // MARK: 1. Greeting, EHLO and the simple commands

    @Test("greeting, EHLO capabilities, HELO, NOOP, RSET, VRFY, HELP, unknown verbs, QUIT")
    func greetingAndSimpleCommands() async throws {
        try await withServer { h in
            var s = SMTPScript()
            s.greeting()
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", "x"))", "503 5.5.1 Send EHLO first")
            s.cmd("EHLO client.test", SMTP.ehlo())
            s.cmd("HELO client.test", "250 \(SMTP.hostname)")
            s.cmd("EHLO", "501 5.5.4 Syntax: EHLO <domain>")
            s.cmd("HELO", "501 5.5.4 Syntax: HELO <domain>")
            s.cmd("NOOP", SMTP.ok)
            s.cmd("NOOP anything at all", SMTP.ok)
            s.cmd("noop", SMTP.ok)
            s.cmd("RSET", SMTP.ok)
            s.cmd("RSET now", "501 5.5.4 Syntax error, no parameters allowed")
            s.cmd("VRFY alice", "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")
            s.cmd("HELP", "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH ETRN ATRN")
            s.cmd("FROBNICATE", "500 5.5.2 Command not recognized")
            for command in ["EXPN staff", "TURN", "SEND FROM:<a@b.test>", "SAML FROM:<a@b.test>", "SOML FROM:<a@b.test>"] {
                s.cmd(command, "502 5.5.1 Command not implemented")
            }
            s.cmd("STARTTLS", "502 5.5.1 STARTTLS not available")
            s.cmd("EHLO again.test", SMTP.ehlo())
            s.cmd("QUIT", SMTP.bye)
            s.expectClosed()
            try await s.run(h)
        }
    }

    // MARK: 2. Plain delivery, exact bytes, dot-stuffing

    @Test("delivery without AUTH: the maildir file holds exactly Return-Path, Received and the message")
    func plainDeliveryExactBytes() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)

            // smtplib dot-stuffs ".leading dot", "." and "..two dots" on the wire.
            let body = crlf(
                "From: Bob <bob@example.org>", "To: Alice <alice@example.test>", "Subject: plain delivery", "",
                "Hello Alice.", ".leading dot", ".", "..two dots", "", "last line")
            let r = try await smtplibSend(h, from: "bob@example.org", to: ["alice@example.test"], body: body)
            expectReply(r, "ehlo", SMTP.ehlo())
            expectReply(r, "mail", [SMTP.senderOk])
            expectReply(r, "rcpt", [SMTP.recipientOk])
            expectReply(r, "data", [SMTP.queued])
            expectReply(r, "quit", [SMTP.bye])
            let id = try #require(r.queueID)
            #expect(id.hasPrefix("msg_"))
            let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
            expectStoredMessage(
                stored.bytes, sender: "bob@example.org", helo: "client.test", queueID: id,
                recipient: "alice@example.test", body: body)

            // The same over a raw socket, with the dot-stuffing written out; and a null sender.
            var s = SMTPScript()
            s.greeting()
            s.cmd("MAIL FROM:<bob@example.org>", "503 5.5.1 Send HELO/EHLO first")
            s.cmd("EHLO raw.test", SMTP.ehlo())
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: dots\r\n\r\n..leading dot\r\n..\r\n...\r\nend\r\n.\r\n", expect: [SMTP.queued])
            s.cmd("MAIL FROM:<>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: bounce\r\n\r\nnull sender\r\n.\r\n", expect: [SMTP.queued])
            s.cmd("QUIT", SMTP.bye)
            s.expectClosed()
            let t = try await s.run(h)
            try #require(t.queueIDs.count == 2)

            let dots = try await h.waitForStoredMessage(for: "alice@example.test", containing: t.queueIDs[0])
            expectStoredMessage(
                dots.bytes, sender: "bob@example.org", helo: "raw.test", queueID: t.queueIDs[0],
                recipient: "alice@example.test", body: crlf("Subject: dots", "", ".leading dot", ".", "..", "end"))
            let bounce = try await h.waitForStoredMessage(for: "alice@example.test", containing: t.queueIDs[1])
            expectStoredMessage(
                bounce.bytes, sender: "", helo: "raw.test", queueID: t.queueIDs[1],
                recipient: "alice@example.test", body: crlf("Subject: bounce", "", "null sender"))
            #expect(h.maildirFiles(for: "alice@example.test").count == 3)

            // API.md, Storage API → Maildir: cur/new/tmp; new files named
            // <timestamp>.M<microseconds>P<pid>.<hostname>; nothing left in tmp/.
            let box = h.mailDirectory.appendingPathComponent("alice@example.test")
            for sub in ["cur", "new", "tmp"] {
                var isDirectory: ObjCBool = false
                let exists = FileManager.default.fileExists(atPath: box.appendingPathComponent(sub).path, isDirectory: &isDirectory)
                #expect(exists && isDirectory.boolValue, "maildir lacks \(sub)/")
            }
            #expect((try? FileManager.default.contentsOfDirectory(atPath: box.appendingPathComponent("tmp").path))?.isEmpty == true)
            let name = try Regex(#"([0-9]+)\.M[0-9]+P[0-9]+\.[^/:]+"#)
            let now = Date().timeIntervalSince1970
            for file in h.maildirFiles(for: "alice@example.test") where file.deletingLastPathComponent().lastPathComponent == "new" {
                let match = try name.wholeMatch(in: file.lastPathComponent)
                #expect(match != nil, "maildir file name \(file.lastPathComponent) is not <timestamp>.M<usec>P<pid>.<host>")
                if let stamp = match?.output[1].substring.flatMap({ Double($0) }) {
                    #expect(abs(stamp - now) < 3600, "maildir timestamp \(stamp) is not now (\(now))")
                }
            }
        }
    }

    // MARK: 3. AUTH

    @Test("AUTH required: MAIL before AUTH, PLAIN, LOGIN, cancel, bad data, wrong password; no secret in the log")
    func authentication() async throws {
        try await withServer { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            let wrong = "Wr0ng-Passw0rd!"

            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            s.cmd("MAIL FROM:<alice@example.test>", "530 5.7.0 Authentication required")
            s.cmd("AUTH CRAM-MD5", "504 5.5.4 Unrecognized authentication mechanism")
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", wrong))", SMTP.authInvalid)
            s.cmd("AUTH PLAIN", "334 ")
            s.cmd("*", "501 5.0.0 Authentication cancelled")
            s.cmd("AUTH PLAIN", "334 ")
            s.cmd("!!not*base64!!", "501 5.5.2 Invalid authentication data")
            s.cmd("AUTH PLAIN \(SMTP.base64("alice\u{0}\(alicePassword)"))", "501 5.5.2 Invalid authentication data")
            s.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6")
            s.cmd(SMTP.base64("alice"), "334 UGFzc3dvcmQ6")
            s.cmd("*", "501 5.0.0 Authentication cancelled")
            s.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6")
            s.cmd(SMTP.base64("alice"), "334 UGFzc3dvcmQ6")
            s.cmd(SMTP.base64(wrong), SMTP.authInvalid)
            // PLAIN with a 334 continuation.
            s.cmd("AUTH PLAIN", "334 ")
            s.cmd(SMTP.plain("alice", alicePassword), SMTP.authOK)
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword))", "503 5.5.1 Already authenticated")
            s.cmd("MAIL FROM:<alice@example.test>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: after auth\r\n\r\nsent after AUTH PLAIN\r\n.\r\n", expect: [SMTP.queued])
            s.cmd("QUIT", SMTP.bye)
            s.expectClosed()

            // PLAIN with initial response and the email address as login; authzid = login.
            s.greeting(conn: "ir")
            s.cmd("EHLO client.test", SMTP.ehlo(), conn: "ir")
            s.cmd("AUTH PLAIN \(SMTP.plain("alice@example.test", alicePassword))", SMTP.authOK, conn: "ir")
            s.cmd("QUIT", SMTP.bye, conn: "ir")
            s.greeting(conn: "authz")
            s.cmd("EHLO client.test", SMTP.ehlo(), conn: "authz")
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword, authzid: "alice"))", SMTP.authOK, conn: "authz")
            s.cmd("QUIT", SMTP.bye, conn: "authz")
            // AUTH LOGIN with the initial response (the username).
            s.greeting(conn: "login-ir")
            s.cmd("EHLO client.test", SMTP.ehlo(), conn: "login-ir")
            s.cmd("AUTH LOGIN \(SMTP.base64("alice"))", "334 UGFzc3dvcmQ6", conn: "login-ir")
            s.cmd(SMTP.base64(alicePassword), SMTP.authOK, conn: "login-ir")
            s.cmd("QUIT", SMTP.bye, conn: "login-ir")
            let t = try await s.run(h)
            #expect(t.queueIDs.count == 1)

            // smtplib: AUTH PLAIN and AUTH LOGIN, then a message each.
            for mechanism in ["PLAIN", "LOGIN"] {
                let body = crlf("Subject: smtplib \(mechanism)", "", "authenticated with \(mechanism)")
                var options = SMTPClientOptions()
                options.auth = (mechanism, "alice", alicePassword)
                let r = try await smtplibSend(h, from: "alice@example.test", to: ["alice@example.test"], body: body, options: options)
                expectReply(r, "auth", [SMTP.authOK])
                expectReply(r, "data", [SMTP.queued])
                let id = try #require(r.queueID)
                let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
                expectStoredMessage(
                    stored.bytes, sender: "alice@example.test", helo: "client.test", queueID: id,
                    recipient: "alice@example.test", body: body)
            }

            // Nothing secret in the log.
            await h.stop()
            let log = h.log
            let secrets = [
                alicePassword, wrong, SMTP.base64(alicePassword), SMTP.base64(wrong),
                SMTP.plain("alice", alicePassword), SMTP.plain("alice", wrong),
                SMTP.plain("alice@example.test", alicePassword), SMTP.plain("alice", alicePassword, authzid: "alice"),
                SMTP.base64("alice\u{0}\(alicePassword)"), ServerHarness.adminPassword,
            ]
            for secret in secrets {
                #expect(!log.contains(secret), "the server log contains a secret: \(secret)")
            }
        }
    }

    // MARK: 4. STARTTLS

    @Test("STARTTLS: no AUTH before TLS (538), AUTH after, delivery over TLS with smtplib")
    func startTLS() async throws {
        try await withServer(prepare: { try await makeTLSCertificate(in: $0).environment }) { h in
            let ca = h.directory.appendingPathComponent("cert.pem").path
            try await h.createUser("alice", "alice@example.test", alicePassword)

            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo(startTLS: true, auth: false))
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword))", "538 5.7.11 Encryption required for requested authentication mechanism")
            s.cmd("AUTH LOGIN", "538 5.7.11 Encryption required for requested authentication mechanism")
            s.cmd("MAIL FROM:<alice@example.test>", "530 5.7.0 Authentication required")
            s.cmd("STARTTLS now", "501 5.5.4 Syntax error, no parameters allowed")
            s.cmd("STARTTLS", "220 2.0.0 Ready to start TLS")
            s.startTLS(cafile: ca)
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword))", "503 5.5.1 Send EHLO first")
            s.cmd("EHLO client.test", SMTP.ehlo(startTLS: false, auth: true))
            s.cmd("STARTTLS", "503 5.5.1 TLS already active")
            s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword))", SMTP.authOK)
            s.cmd("MAIL FROM:<alice@example.test>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: raw TLS\r\n\r\nover TLS\r\n.\r\n", expect: [SMTP.queued])
            s.cmd("QUIT", SMTP.bye)
            s.expectClosed()
            let t = try await s.run(h)
            let rawID = try #require(t.queueIDs.first)
            let rawStored = try await h.waitForStoredMessage(for: "alice@example.test", containing: rawID)
            expectStoredMessage(
                rawStored.bytes, sender: "alice@example.test", helo: "client.test", queueID: rawID,
                recipient: "alice@example.test", body: crlf("Subject: raw TLS", "", "over TLS"))
            // The TLS version and the suite the server chose (Python's client offers TLS 1.3's three).
            let received = receivedField(rawStored.bytes)
            let suites = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
            #expect(suites.contains { received.contains("\t(using TLSv1.3 with cipher \($0))\t") }, "\(received)")
            #expect(received.contains("with ESMTPSA id \(rawID)"), "\(received)")

            // smtplib: STARTTLS verified against the certificate, AUTH PLAIN, one message.
            let body = crlf("From: alice@example.test", "To: alice@example.test", "Subject: over TLS", "", ".dot first", "body")
            var options = SMTPClientOptions()
            options.starttlsCA = ca
            options.auth = ("PLAIN", "alice", alicePassword)
            let r = try await smtplibSend(h, from: "alice@example.test", to: ["alice@example.test"], body: body, options: options)
            expectReply(r, "ehlo", SMTP.ehlo(startTLS: true, auth: false))
            expectReply(r, "starttls", ["220 2.0.0 Ready to start TLS"])
            expectReply(r, "ehlo_tls", SMTP.ehlo(startTLS: false, auth: true))
            expectReply(r, "auth", [SMTP.authOK])
            expectReply(r, "data", [SMTP.queued])
            let id = try #require(r.queueID)
            let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
            expectStoredMessage(
                stored.bytes, sender: "alice@example.test", helo: "client.test", queueID: id,
                recipient: "alice@example.test", body: body)
        }
    }

    @Test("STARTTLS injection: plaintext pipelined behind STARTTLS closes the connection, never answered")
    func startTLSInjection() async throws {
        try await withServer(prepare: { try await makeTLSCertificate(in: $0).environment }) { h in
            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo(startTLS: true, auth: false))
            s.send("STARTTLS\r\nNOOP\r\n")
            let end = s.readToEnd(timeout: 10)
            let t = try await s.run(h)
            let result = try #require(t.result(end))
            // At most the 220 (the documented behaviour is no reply at all), then EOF.
            #expect(result.lines.allSatisfy { $0 == "220 2.0.0 Ready to start TLS" }, "got \(result.lines)")
            #expect(!result.lines.contains { $0.hasPrefix("250") }, "NOOP was answered in plaintext: \(result.lines)")
            #expect(result.eof == true, "the server did not close the connection; got \(result.lines)")
        }
    }

    // MARK: 5. SMTPUTF8

    @Test("SMTPUTF8: a UTF-8 sender with SMTPUTF8 is delivered exactly; without it 553 5.6.7")
    func smtpUTF8() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            let sender = "发件人@例え.jp"
            let body = crlf("From: \(sender)", "To: alice@example.test", "Subject: Grüße 你好", "", "UTF-8 body: 你好, Alice — ✓")
            var options = SMTPClientOptions()
            options.smtputf8 = true
            let r = try await smtplibSend(h, from: sender, to: ["alice@example.test"], body: body, options: options)
            expectReply(r, "mail", [SMTP.senderOk])
            expectReply(r, "rcpt", [SMTP.recipientOk])
            expectReply(r, "data", [SMTP.queued])
            let id = try #require(r.queueID)
            let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
            expectStoredMessage(
                stored.bytes, sender: sender, helo: "client.test", queueID: id, recipient: "alice@example.test", body: body)

            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            s.cmd("MAIL FROM:<\(sender)>", "553 5.6.7 SMTPUTF8 is required for a non-ASCII address")
            s.cmd("MAIL FROM:<\(sender)> SMTPUTF8", SMTP.senderOk)
            s.cmd("RCPT TO:<用户@example.test>", "550 5.1.1 <用户@example.test>: Recipient address rejected: User unknown")
            s.cmd("RSET", SMTP.ok)
            s.cmd("QUIT", SMTP.bye)
            try await s.run(h)
        }
    }
}
