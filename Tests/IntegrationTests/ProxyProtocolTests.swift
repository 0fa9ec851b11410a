// PROXY protocol v1/v2 in front of the SMTP listener, and the TLS facts in the Received field:
// the real smtp-server, raw-socket clients (Support/smtp_session.py) and a real haproxy.
//
// The harness probes the server from 127.0.0.2; the tests' clients connect from 127.0.0.1, which
// is the trusted proxy where a test sets SMTP_TRUSTED_PROXIES=127.0.0.1/32.

import Foundation
import Testing

/// A PROXY v2 header (haproxy's proxy-protocol.txt §2.2) for TCP over IPv4, or LOCAL.
func proxyV2Header(source: (String, Int)? = nil, destination: (String, Int) = ("192.0.2.1", 25), version: UInt8 = 2) -> [UInt8] {
    let signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]
    guard let source else { return signature + [version << 4 | 0x0, 0x00, 0x00, 0x00] }  // LOCAL, AF_UNSPEC
    func octets(_ address: String) -> [UInt8] { address.split(separator: ".").map { UInt8($0)! } }
    func port(_ value: Int) -> [UInt8] { [UInt8(value >> 8), UInt8(value & 0xFF)] }
    let block = octets(source.0) + octets(destination.0) + port(source.1) + port(destination.1)
    return signature + [version << 4 | 0x1, 0x11, 0x00, UInt8(block.count)] + block
}

/// The log lines at warning level or above (swift-log's stream format: `<time> <level> <label>: …`).
func loudLogLines(_ log: String) -> [String] {
    log.split(separator: "\n").map(String.init).filter { line in
        let words = line.split(separator: " ", maxSplits: 2)
        return words.count >= 2 && ["warning", "error", "critical"].contains(String(words[1]))
    }
}

/// The `Received:` field of a stored message, unfolded.
func receivedField(_ stored: [UInt8]) -> String {
    let text = String(decoding: stored, as: UTF8.self)
    guard let start = text.range(of: "Received: ") else { return "" }
    var field = ""
    for line in text[start.lowerBound...].components(separatedBy: "\r\n") {
        if field.isEmpty || line.hasPrefix("\t") || line.hasPrefix(" ") {
            field += line
        } else {
            break
        }
    }
    return field
}

@Suite("PROXY protocol, black box", .timeLimit(.minutes(3)))
struct ProxyProtocolTests {
    static let trusted = ["SMTP_TRUSTED_PROXIES": "127.0.0.1/32", "SMTP_ENABLE_AUTH": "false"]

    /// One message to alice on `conn`, after the greeting and HELO were already checked.
    static func transaction(_ s: inout SMTPScript, conn: String, subject: String) {
        s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk, conn: conn)
        s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk, conn: conn)
        s.cmd("DATA", SMTP.startData, conn: conn)
        s.send("Subject: \(subject)\r\n\r\nhello\r\n.\r\n", expect: [SMTP.queued], conn: conn)
        s.cmd("QUIT", SMTP.bye, conn: conn)
        s.expectClosed(conn: conn)
    }

    @Test("trusted proxy: v2 and v1 headers; greeted only after the header; the Received field names the header's source")
    func trustedProxyHeaders() async throws {
        try await withServer(Self.trusted) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            var s = SMTPScript()
            // v2, with HELO in the same write: the bytes after the header reach the session.
            s.send(
                proxyV2Header(source: ("203.0.113.7", 56324)) + Array("HELO client.test\r\n".utf8),
                expect: [SMTPScript.greetingLine, "250 \(SMTP.hostname)"], conn: "v2")
            Self.transaction(&s, conn: "v2", subject: "via v2")
            // v1 over IPv6, sent in two pieces.
            s.send("PROXY TCP6 2001:db8::7 2001:db8::1 40000 25", conn: "v1")
            s.send("\r\n", expect: [SMTPScript.greetingLine], conn: "v1")
            s.cmd("HELO client.test", "250 \(SMTP.hostname)", conn: "v1")
            Self.transaction(&s, conn: "v1", subject: "via v1")
            let t = try await s.run(h)
            let ids = t.queueIDs
            #expect(ids.count == 2)
            for (id, source) in zip(ids, ["203.0.113.7", "IPv6:2001:db8::7"]) {
                let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
                let received = receivedField(stored.bytes)
                #expect(received.hasPrefix("Received: from client.test ([\(source)])"), "\(received)")
            }
            #expect(loudLogLines(h.log).isEmpty, "\(loudLogLines(h.log))")
        }
    }

    @Test("the header's source, not the proxy, is what the per-address connection limit counts")
    func rateLimitBySource() async throws {
        try await withServer(Self.trusted.merging(["SMTP_RATE_CONNECTIONS_PER_MINUTE": "2"]) { $1 }) { h in
            var s = SMTPScript()
            for conn in ["a1", "a2"] {
                s.send(proxyV2Header(source: ("203.0.113.7", 1000)), expect: [SMTPScript.greetingLine], conn: conn)
            }
            s.send(proxyV2Header(source: ("203.0.113.7", 1003)), conn: "a3")
            s.expectClosed(after: [RateLimitTests.connectionRefused], conn: "a3")
            s.send("PROXY TCP4 203.0.113.8 192.0.2.1 1000 25\r\n", expect: [SMTPScript.greetingLine], conn: "b1")
            s.cmd("QUIT", SMTP.bye, conn: "b1")
            try await s.run(h)
            #expect(h.log.contains("client=203.0.113.7"), "\(h.logTail())")
        }
    }

    @Test("trusted proxy: a malformed header, SMTP without a header, or no header within 5 s: closed without a banner")
    func trustedProxyWithoutValidHeader() async throws {
        try await withServer(Self.trusted) { h in
            var s = SMTPScript()
            // Opened first, so that their 5 s run while the others are checked.
            s.send(Array(proxyV2Header(source: ("203.0.113.7", 1)).prefix(20)), conn: "truncated")
            s.send([UInt8](), conn: "silent")
            let started = ContinuousClock.now
            s.send("PROXY TCP4 203.0.113.7 192.0.2.1 65536 25\r\nHELO client.test\r\n", conn: "bad-port")
            s.expectClosed(conn: "bad-port")
            s.send("PROXY TCP4 ::1 192.0.2.1 1 25\r\n", conn: "bad-address")
            s.expectClosed(conn: "bad-address")
            s.send(proxyV2Header(source: ("203.0.113.7", 1), version: 1), conn: "v2-version")
            s.expectClosed(conn: "v2-version")
            s.send("HELO client.test\r\n", conn: "no-header")
            s.expectClosed(conn: "no-header")
            s.expectClosed(conn: "truncated", timeout: 15)
            s.expectClosed(conn: "silent", timeout: 15)
            try await s.run(h)
            #expect(ContinuousClock.now - started >= .seconds(4), "the silent connections were closed too early")
            let warnings = loudLogLines(h.log)
            #expect(warnings.filter { $0.contains("malformed PROXY header, closing") }.count == 4, "\(warnings)")
            #expect(warnings.filter { $0.contains("no PROXY header in time, closing") }.count == 2, "\(warnings)")
        }
    }

    @Test("untrusted peers (no trusted proxies, or 10.0.0.0/8): a PROXY header closes the connection unanswered; nothing is queued",
          arguments: [[:], ["SMTP_TRUSTED_PROXIES": "10.0.0.0/8"]])
    func untrustedPeer(trust: [String: String]) async throws {
        try await withServer(trust.merging(["SMTP_ENABLE_AUTH": "false"]) { $1 }) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            let transaction = "HELO client.test\r\nMAIL FROM:<bob@example.org>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\nQUIT\r\n"
            var s = SMTPScript()
            // After the banner, with a whole pipelined transaction behind the header.
            s.greeting(conn: "v2")
            s.send(proxyV2Header(source: ("203.0.113.7", 56324)) + Array(transaction.utf8), conn: "v2")
            s.expectClosed(conn: "v2")
            s.greeting(conn: "v1")
            s.send("PROXY TCP4 203.0.113.7 192.0.2.1 56324 25\r\n" + transaction, conn: "v1")
            s.expectClosed(conn: "v1")
            // Before reading the banner: the server greets everyone but trusted proxies at once,
            // so the banner is there; then the connection is closed.
            s.send("PROXY UNKNOWN\r\n" + transaction, conn: "early")
            s.expectClosed(after: [SMTPScript.greetingLine], conn: "early")
            // The signature in two writes.
            s.greeting(conn: "split")
            s.send("\r\n\r\n", conn: "split")
            s.send(Array(proxyV2Header(source: ("203.0.113.7", 1)).dropFirst(4)), conn: "split")
            s.expectClosed(conn: "split")
            // The listener still serves plain SMTP.
            s.greeting(conn: "plain")
            s.cmd("HELO client.test", "250 \(SMTP.hostname)", conn: "plain")
            s.cmd("QUIT", SMTP.bye, conn: "plain")
            try await s.run(h)
            try await Task.sleep(for: .milliseconds(1500))
            #expect(h.maildirFiles(for: "alice@example.test").isEmpty)
            #expect(!h.log.contains("queue_id"), "something was queued:\n\(h.logTail())")
            #expect(loudLogLines(h.log).filter { $0.contains("PROXY header from an untrusted address, closing") }.count == 4)
        }
    }

    @Test("a v2 LOCAL header (haproxy's health check) keeps the socket's address; LOCAL then close logs nothing above debug")
    func localHealthCheck() async throws {
        try await withServer(Self.trusted.merging(["SMTP_LOG_LEVEL": "debug", "SMTP_RATE_CONNECTIONS_PER_MINUTE": "2"]) { $1 }) { h in
            var s = SMTPScript()
            for check in 0..<5 {
                s.send(proxyV2Header(), conn: "check\(check)")
                s.close(conn: "check\(check)")
            }
            s.close(conn: "nothing")  // connect and close before any header
            // The proxy's own sessions are not counted against its address (the limit is 2 here).
            s.send(proxyV2Header() + Array("QUIT\r\n".utf8), expect: [SMTPScript.greetingLine, SMTP.bye], conn: "smtpchk")
            s.expectClosed(conn: "smtpchk")
            try await s.run(h)
            try await Task.sleep(for: .milliseconds(500))
            #expect(loudLogLines(h.log).isEmpty, "\(loudLogLines(h.log))")
            #expect(h.log.contains("client=127.0.0.1:"))
            #expect(h.log.components(separatedBy: "proxy_header=v2 LOCAL").count - 1 >= 1)
        }
    }

    @Test("haproxy in tcp mode with send-proxy-v2 and health checks: mail through it names the real client, also after STARTTLS; checks log nothing above debug")
    func haproxy() async throws {
        try await withServer(
            ["SMTP_TRUSTED_PROXIES": "127.0.0.4/32", "SMTP_LOG_LEVEL": "debug"],
            prepare: { try await makeTLSCertificate(in: $0).environment }
        ) { h in
            let ca = h.directory.appendingPathComponent("cert.pem").path
            try await h.createUser("alice", "alice@example.test", alicePassword)
            let port = try Ports.free()
            // haproxy connects to the server from 127.0.0.4 (the trusted proxy); clients reach
            // haproxy from 127.0.0.1, the address the Received field must name.
            let config = """
                global
                    maxconn 64
                defaults
                    mode tcp
                    timeout connect 2s
                    timeout client 30s
                    timeout server 30s
                frontend smtp
                    bind 127.0.0.1:\(port)
                    default_backend mailtier
                backend mailtier
                    server s1 127.0.0.1:\(h.smtpPort) send-proxy-v2 check inter 200ms source 127.0.0.4

                """
            let configFile = h.directory.appendingPathComponent("haproxy.cfg")
            try config.write(to: configFile, atomically: true, encoding: .utf8)
            let haproxy = try ChildProcess(
                try Tools.path("haproxy"), ["-db", "-f", configFile.path], environment: cleanEnvironment(),
                outputDirectory: h.directory, name: "haproxy")
            do {
                let ready = await poll(timeout: .seconds(20), interval: .milliseconds(100)) {
                    await onBackgroundThread { Ports.probeGreeting(port: port) }?.hasPrefix("220 ") == true || !haproxy.isRunning
                }
                guard ready, haproxy.isRunning else {
                    throw HarnessError("haproxy did not relay a greeting:\n\(haproxy.stdout)\n\(haproxy.stderr)")
                }
                var s = SMTPScript()
                s.greeting(conn: "plain")
                s.cmd("HELO client.test", "250 \(SMTP.hostname)", conn: "plain")
                s.cmd("QUIT", SMTP.bye, conn: "plain")
                s.greeting(conn: "tls")
                s.cmd("EHLO client.test", SMTP.ehlo(startTLS: true, auth: false), conn: "tls")
                s.cmd("STARTTLS", "220 2.0.0 Ready to start TLS", conn: "tls")
                s.startTLS(cafile: ca, conn: "tls")
                s.cmd("EHLO client.test", SMTP.ehlo(startTLS: false, auth: true), conn: "tls")
                s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword))", SMTP.authOK, conn: "tls")
                Self.transaction(&s, conn: "tls", subject: "through haproxy")
                let t = try await s.start(port: port).finish(harness: h)
                let id = try #require(t.queueIDs.first)
                let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
                let received = receivedField(stored.bytes)
                #expect(received.hasPrefix("Received: from client.test ([127.0.0.1])"), "\(received)")
                #expect(received.contains("(using TLSv1.3 with cipher TLS_"), "\(received)")
                // A few more check intervals, then: the checks reached the server, quietly.
                let checked = await poll(timeout: .seconds(15), interval: .milliseconds(200)) {
                    h.log.components(separatedBy: "proxy_header=v2 LOCAL").count - 1 >= 3
                }
                let log = h.log
                #expect(checked, "too few health checks seen")
                #expect(loudLogLines(log).isEmpty, "\(loudLogLines(log))")
                #expect(haproxy.isRunning, "haproxy exited:\n\(haproxy.stderr)")
            } catch {
                haproxy.signal(SIGTERM)
                _ = await haproxy.wait(timeout: .seconds(10))
                throw error
            }
            haproxy.signal(SIGTERM)
            _ = await haproxy.wait(timeout: .seconds(10))
        }
    }
}
