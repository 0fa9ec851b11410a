// Remote delivery through the real `smtp-server`: an authenticated user's message to a remote
// address goes out over SMTP to the domain's MX, which dnsmasq names (127.0.0.1) and a
// scriptable aiosmtpd peer (Support/smtp_peer.py) plays; SMTP_OUTBOUND_PORT points at it.

import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

/// A scriptable aiosmtpd standing in for a remote MX (see Support/smtp_peer.py).
final class SMTPPeer {
    let port: Int
    let directory: URL
    private let child: ChildProcess

    struct Received: Decodable {
        var mail_from: String
        var rcpt_tos: [String]
        var mail_options: [String]
        var peer_port: Int?
        var helo: String?
        var tls: Bool
        /// The content as received (after dot-unstuffing).
        var content: [UInt8] = []

        enum CodingKeys: String, CodingKey { case mail_from, rcpt_tos, mail_options, peer_port, helo, tls }
    }

    init(arguments: [String] = []) async throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-peer-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        port = try Ports.free()
        let python = try await Tools.python()
        child = try ChildProcess(
            python, [try Tools.script("smtp_peer.py"), "--port", "\(port)", "--dir", directory.path] + arguments,
            environment: cleanEnvironment(), outputDirectory: directory, name: "peer")
        let child = self.child
        let ready = await poll(timeout: .seconds(30)) { !child.isRunning || child.stdout.contains("READY") }
        guard ready, child.isRunning else {
            let result = await child.wait(timeout: .seconds(5))
            throw HarnessError("smtp_peer.py did not start:\n\(result.output)")
        }
    }

    /// Every message received so far, in order.
    func messages() -> [Received] {
        var result: [Received] = []
        for n in 1... {
            let base = directory.appendingPathComponent("msg-\(n)")
            guard let json = try? Data(contentsOf: base.appendingPathExtension("json")),
                var message = try? JSONDecoder().decode(Received.self, from: json)
            else { break }
            message.content = (try? Array(Data(contentsOf: base.appendingPathExtension("eml")))) ?? []
            result.append(message)
        }
        return result
    }

    /// Waits until at least `count` messages arrived.
    @discardableResult
    func waitForMessages(_ count: Int, timeout: Duration = .seconds(60), server: ServerHarness? = nil) async throws -> [Received] {
        var messages: [Received] = []
        let ok = await poll(timeout: timeout, interval: .milliseconds(100)) {
            messages = self.messages()
            return messages.count >= count
        }
        guard ok else {
            throw HarnessError("the peer received \(messages.count) message(s), expected \(count); log tail:\n\(server?.logTail() ?? "")")
        }
        return messages
    }

    /// Connections accepted so far.
    var connectionCount: Int {
        let text = (try? String(contentsOf: directory.appendingPathComponent("connections.log"), encoding: .utf8)) ?? ""
        return text.split(separator: "\n").count
    }

    func stop() async {
        child.signal(SIGKILL)
        _ = await child.wait(timeout: .seconds(10))
        try? FileManager.default.removeItem(at: directory)
    }
}

/// dnsmasq on 127.0.0.1 answering for `*.test` from `records` (`--mx-host=…`, `--host-record=…`).
///
/// Started as a daemon (its starter exits at once) and stopped by the pid in its pid file:
/// dnsmasq closes every inherited descriptor, which Foundation's `Process` takes for the child's
/// exit, and its blocking wait for that child would then stall the reaping of every later one.
final class DNSMasq {
    let port: Int
    private let directory: URL

    init(records: [String]) async throws {
        let candidates = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/usr/local/sbin/dnsmasq"]
        guard let path = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw HarnessError("dnsmasq not found (apt-get install dnsmasq-base, or run scripts/install-deps.sh)")
        }
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-dns-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        var lastError = "no attempt"
        for _ in 0..<5 {
            let port = try Ports.free()
            let result = try await runProcess(
                path,
                [
                    "--conf-file=/dev/null", "--pid-file=\(directory.path)/dnsmasq.pid", "--user=\(NSUserName())",
                    "--port=\(port)", "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                    "--log-facility=\(directory.path)/dnsmasq.log", "--local=/test/",
                ] + records, timeout: .seconds(30))
            if result.status == 0, await poll(timeout: .seconds(20), { Ports.canConnect(port: port) }) {
                self.port = port
                return
            }
            lastError = "dnsmasq did not start on port \(port): \(result.output)"
            Self.stopDaemon(in: directory)
        }
        throw HarnessError(lastError)
    }

    var server: String { "127.0.0.1:\(port)" }

    private static func stopDaemon(in directory: URL) {
        let pidFile = directory.appendingPathComponent("dnsmasq.pid")
        if let text = try? String(contentsOf: pidFile, encoding: .utf8),
            let pid = Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)), pid > 1
        {
            kill(pid, SIGKILL)
        }
        try? FileManager.default.removeItem(at: pidFile)
    }

    func stop() async {
        Self.stopDaemon(in: directory)
        try? FileManager.default.removeItem(at: directory)
    }
}

extension Ports {
    static func canConnect(port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var address = loopback(port: port)
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
        }
    }
}

/// One row of `queue_recipients`.
struct RecipientRow: Equatable {
    var recipient: String
    var status: String
    var attempts: Int
    var lastError: String
}

extension ServerHarness {
    /// The queue's recipients, read with the sqlite3 tool.
    func recipientRows() async throws -> [RecipientRow] {
        let database = directory.appendingPathComponent("smtp.db").path
        let result = try await runProcess(
            "/usr/bin/env",
            ["sqlite3", "-cmd", ".timeout 5000", "-separator", "\u{1F}", "-newline", "\u{1E}", database,
             "SELECT recipient, status, attempts, COALESCE(last_error, '') FROM queue_recipients ORDER BY id"],
            environment: ProcessInfo.processInfo.environment)
        guard result.status == 0 else { throw HarnessError("sqlite3 failed: \(result.stderr)") }
        return result.stdout.split(separator: "\u{1E}").compactMap { line in
            let fields = line.split(separator: "\u{1F}", omittingEmptySubsequences: false).map(String.init)
            guard fields.count == 4 else { return nil }
            return RecipientRow(recipient: fields[0], status: fields[1], attempts: Int(fields[2]) ?? -1, lastError: fields[3])
        }
    }

    /// Polls until the row of `recipient` satisfies `condition` (nil: no row, which is how a
    /// message whose recipients were all delivered leaves the queue); returns it.
    @discardableResult
    func waitForRow(
        _ recipient: String, timeout: Duration = .seconds(60), _ condition: @escaping (RecipientRow?) -> Bool
    ) async throws -> RecipientRow? {
        var row: RecipientRow?
        var readError: (any Error)?
        let ok = await poll(timeout: timeout, interval: .milliseconds(100)) {
            do {
                row = try await recipientRows().first { $0.recipient == recipient }
                readError = nil
                return condition(row)
            } catch {
                readError = error
                return false
            }
        }
        guard ok else {
            throw HarnessError(
                "queue row of \(recipient) is \(String(describing: row)) \(readError.map { "(\($0))" } ?? ""); log tail:\n\(logTail())")
        }
        return row
    }
}

@Suite("Remote delivery: MX lookup, outbound SMTP to a real peer, outcomes", .serialized)
struct RemoteDeliveryTests {
    static let records = [
        "--mx-host=remote.test,mx.remote.test,10",
        "--host-record=mx.remote.test,127.0.0.1",
        // A null MX (RFC 7505) whose A record would reach the peer: it must not be tried.
        "--mx-host=nullmx.test,.,0",
        "--host-record=nullmx.test,127.0.0.1",
        // The preferred MX refuses (nothing listens on 127.0.0.2), the second one takes it.
        "--mx-host=fallback.test,mx1.fallback.test,10",
        "--mx-host=fallback.test,mx2.fallback.test,20",
        "--host-record=mx1.fallback.test,127.0.0.2",
        "--host-record=mx2.fallback.test,127.0.0.1",
    ]

    static let body = Array(
        "From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\nSubject: outbound\r\n\r\nHello remote.\r\n.leading dot\r\n..two dots\r\n\r\nBye.\r\n"
            .utf8)

    /// A server (SMTP_DNS_SERVERS = dnsmasq, SMTP_OUTBOUND_PORT = the peer) with user alice, a
    /// peer and dnsmasq, all stopped afterwards.
    func withRemoteSetup(
        peerArguments: [String] = [], overrides: [String: String] = [:],
        _ body: (ServerHarness, SMTPPeer) async throws -> Void
    ) async throws {
        let dns = try await DNSMasq(records: Self.records)
        let peer: SMTPPeer
        do {
            peer = try await SMTPPeer(arguments: peerArguments)
        } catch {
            await dns.stop()
            throw error
        }
        do {
            var environment = [
                "SMTP_DNS_SERVERS": dns.server, "SMTP_OUTBOUND_PORT": "\(peer.port)", "SMTP_ENABLE_AUTH": "false",
                "SMTP_LOG_LEVEL": "debug",
            ]
            environment.merge(overrides) { _, new in new }
            try await withServer(environment) { h in
                try await h.createUser("alice", "alice@example.test", alicePassword)
                try await body(h, peer)
            }
        } catch {
            await peer.stop()
            await dns.stop()
            throw error
        }
        await peer.stop()
        await dns.stop()
    }

    func send(_ h: ServerHarness, to recipients: [String], body: [UInt8] = RemoteDeliveryTests.body, smtputf8: Bool = false) async throws -> String {
        var options = SMTPClientOptions()
        options.auth = ("PLAIN", "alice", alicePassword)
        options.smtputf8 = smtputf8
        let result = try await smtplibSend(h, from: "alice@example.test", to: recipients, body: body, options: options)
        guard let queueID = result.queueID else {
            throw HarnessError("not queued: \(result.replies.map(\.line))")
        }
        return queueID
    }

    /// The content after our one `Received:` field (which must name the queue id).
    func afterReceived(_ content: [UInt8], queueID: String) -> [UInt8]? {
        let text = Array(content)
        guard text.starts(with: Array("Received: ".utf8)) else { return nil }
        var i = 0
        while i + 2 < text.count {
            if text[i] == 13, text[i + 1] == 10, text[i + 2] != 32, text[i + 2] != 9 {
                let field = String(decoding: text[..<i], as: UTF8.self)
                return field.contains(queueID) ? Array(text[(i + 2)...]) : nil
            }
            i += 1
        }
        return nil
    }

    @Test("a message to two recipients at one remote domain arrives in one transaction, byte for byte, and both rows are delivered")
    func deliversByteForByte() async throws {
        try await withRemoteSetup { h, peer in
            let queueID = try await send(h, to: ["bob@remote.test", "carol@remote.test"])
            let messages = try await peer.waitForMessages(1, server: h)
            // Both recipients in one transaction; nothing else arrives.
            try await Task.sleep(for: .seconds(2))
            #expect(peer.messages().count == 1)
            let message = messages[0]
            #expect(message.mail_from == "alice@example.test")
            #expect(message.rcpt_tos == ["bob@remote.test", "carol@remote.test"])
            #expect(message.helo == ServerHarness.hostname)
            #expect(message.mail_options.contains { $0.hasPrefix("SIZE=") })
            #expect(!message.content.starts(with: Array("Return-Path:".utf8)))
            #expect(afterReceived(message.content, queueID: queueID) == Self.body, "content: \(SMTPScript.describe(message.content))")
            // Every recipient delivered: the message leaves the queue.
            for recipient in ["bob@remote.test", "carol@remote.test"] {
                try await h.waitForRow(recipient) { $0 == nil }
            }
        }
    }

    @Test("4xx twice, then 250: retried (status retry, attempts 1 then 2, the peer's reply as last_error), then delivered")
    func temporaryFailureIsRetried() async throws {
        try await withRemoteSetup(overrides: ["SMTP_RETRY_SCHEDULE": "2"]) { h, peer in
            let recipient = "tempfail2-dave@remote.test"
            _ = try await send(h, to: [recipient])
            let first = try await h.waitForRow(recipient) { $0?.status == "retry" }
            #expect(first?.attempts == 1)
            #expect(first?.lastError.contains("451 4.2.0 <\(recipient)>: try again later") == true, "\(String(describing: first))")
            let second = try await h.waitForRow(recipient) { $0?.status == "retry" && $0?.attempts == 2 }
            #expect(second?.lastError.contains("451 4.2.0") == true)
            #expect(peer.messages().isEmpty)
            let messages = try await peer.waitForMessages(1, timeout: .seconds(60), server: h)
            #expect(messages[0].rcpt_tos == [recipient])
            try await h.waitForRow(recipient) { $0 == nil }
        }
    }

    @Test("5xx for one recipient: that one fails with the peer's reply, the other is delivered")
    func permanentRejection() async throws {
        try await withRemoteSetup { h, peer in
            _ = try await send(h, to: ["reject-erin@remote.test", "frank@remote.test"])
            let failed = try await h.waitForRow("reject-erin@remote.test") { $0?.status == "failed" }
            #expect(failed?.attempts == 1)
            #expect(
                failed?.lastError.contains("550 5.1.1 <reject-erin@remote.test>: Recipient address rejected: no such user here") == true,
                "\(String(describing: failed))")
            try await h.waitForRow("frank@remote.test") { $0?.status == "delivered" }
            let messages = try await peer.waitForMessages(1, server: h)
            #expect(messages[0].rcpt_tos == ["frank@remote.test"])
        }
    }

    @Test("null MX (RFC 7505): failed at once with 5.1.10, no connection to the peer the domain's A record names")
    func nullMX() async throws {
        try await withRemoteSetup { h, peer in
            _ = try await send(h, to: ["grace@nullmx.test"])
            let failed = try await h.waitForRow("grace@nullmx.test") { $0?.status == "failed" }
            #expect(failed?.attempts == 1)
            #expect(failed?.lastError.contains("null MX") == true, "\(String(describing: failed))")
            #expect(peer.connectionCount == 0)
        }
    }

    @Test("the preferred MX refuses the connection: the next MX by preference takes the message")
    func nextExchanger() async throws {
        try await withRemoteSetup { h, peer in
            _ = try await send(h, to: ["olga@fallback.test"])
            let messages = try await peer.waitForMessages(1, server: h)
            #expect(messages[0].rcpt_tos == ["olga@fallback.test"])
            try await h.waitForRow("olga@fallback.test") { $0 == nil }
        }
    }

    @Test("a domain that does not exist (NXDOMAIN) fails for good at once")
    func noSuchDomain() async throws {
        try await withRemoteSetup { h, peer in
            _ = try await send(h, to: ["pat@nowhere.test"])
            let failed = try await h.waitForRow("pat@nowhere.test") { $0?.status == "failed" }
            #expect(failed?.attempts == 1)
            #expect(failed?.lastError.contains("noSuchDomain") == true, "\(String(describing: failed))")
            #expect(peer.connectionCount == 0)
        }
    }

    @Test("a DNS server that does not answer: the recipient waits for a retry (4.4.3)")
    func dnsUnreachable() async throws {
        try await withRemoteSetup(overrides: ["SMTP_DNS_SERVERS": "127.0.0.1:\(try Ports.free())"]) { h, peer in
            _ = try await send(h, to: ["quinn@remote.test"])
            let waiting = try await h.waitForRow("quinn@remote.test") { $0?.status == "retry" }
            #expect(waiting?.attempts == 1)
            #expect(waiting?.lastError.contains("DNS temporary failure") == true, "\(String(describing: waiting))")
            #expect(peer.connectionCount == 0)
        }
    }

    @Test("an SMTPUTF8 message to a peer without SMTPUTF8 fails for good (5.6.7) and is not sent")
    func smtputf8Refused() async throws {
        try await withRemoteSetup(peerArguments: ["--no-smtputf8"]) { h, peer in
            _ = try await send(h, to: ["heidi@remote.test"], smtputf8: true)
            let failed = try await h.waitForRow("heidi@remote.test") { $0?.status == "failed" }
            #expect(failed?.lastError.contains("SMTPUTF8") == true, "\(String(describing: failed))")
            #expect(peer.messages().isEmpty)
            // The same message without SMTPUTF8 goes through.
            _ = try await send(h, to: ["ivan@remote.test"])
            try await peer.waitForMessages(1, server: h)
        }
    }

    @Test("SMTP_RELAY_HOST: everything goes to the relay, even though the MX names another host")
    func relayHost() async throws {
        let relay = try await SMTPPeer()
        do {
            try await withRemoteSetup(overrides: ["SMTP_RELAY_HOST": "127.0.0.1:\(relay.port)"]) { h, mx in
                _ = try await send(h, to: ["judy@remote.test"])
                let messages = try await relay.waitForMessages(1, server: h)
                #expect(messages[0].rcpt_tos == ["judy@remote.test"])
                try await h.waitForRow("judy@remote.test") { $0 == nil }
                #expect(mx.connectionCount == 0)
                #expect(mx.messages().isEmpty)
            }
        } catch {
            await relay.stop()
            throw error
        }
        await relay.stop()
    }

    @Test("consecutive messages to one destination reuse one connection (RSET between transactions)")
    func connectionReuse() async throws {
        try await withRemoteSetup { h, peer in
            for (index, recipient) in ["kate@remote.test", "leo@remote.test", "mia@remote.test"].enumerated() {
                _ = try await send(h, to: [recipient])
                try await peer.waitForMessages(index + 1, server: h)
            }
            let ports = Set(peer.messages().compactMap(\.peer_port))
            #expect(ports.count == 1, "client ports: \(ports)")
            #expect(peer.connectionCount == 1)
        }
    }
}

@Suite("Remote delivery: STARTTLS, and another MailTier as the MX", .serialized)
struct RemoteDeliveryTLSTests {
    let base = RemoteDeliveryTests()

    @Test("STARTTLS is used when the peer offers it (opportunistic: its self-signed certificate is accepted)")
    func opportunisticTLS() async throws {
        let certificates = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-peer-cert-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: certificates, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: certificates) }
        let tls = try await makeTLSCertificate(in: certificates)
        let arguments = ["--tls-cert", tls.environment["SMTP_TLS_CERT"]!, "--tls-key", tls.environment["SMTP_TLS_KEY"]!]
        try await base.withRemoteSetup(peerArguments: arguments, overrides: ["SMTP_OUTBOUND_REQUIRE_TLS": "true"]) { h, peer in
            _ = try await base.send(h, to: ["nina@remote.test"])
            let messages = try await peer.waitForMessages(1, server: h)
            #expect(messages[0].tls)
            #expect(messages[0].rcpt_tos == ["nina@remote.test"])
        }
    }

    @Test("SMTP_OUTBOUND_REQUIRE_TLS with a peer that offers no STARTTLS: nothing is sent, the recipient waits (4.7.0)")
    func requiredTLSMissing() async throws {
        try await base.withRemoteSetup(overrides: ["SMTP_OUTBOUND_REQUIRE_TLS": "true"]) { h, peer in
            _ = try await base.send(h, to: ["oscar@remote.test"])
            let row = try await h.waitForRow("oscar@remote.test") { $0?.status == "retry" }
            #expect(row?.attempts == 1)
            #expect(row?.lastError.contains("TLS is required") == true, "\(String(describing: row))")
            #expect(peer.messages().isEmpty)
        }
    }

    @Test("to another MailTier as the MX: EHLO with PIPELINING and CHUNKING, STARTTLS, stored byte for byte in the recipient's mailbox")
    func toAnotherMailTier() async throws {
        let mx = try ServerHarness(overrides: ["SMTP_LOCAL_DOMAINS": "other.test", "SMTP_HOSTNAME": "mx.other.test", "SMTP_ENABLE_AUTH": "false"])
        do {
            mx.addEnvironment(try await makeTLSCertificate(in: mx.directory).environment)
            try await mx.start()
            try await mx.createUser("zoe", "zoe@other.test", "Zoe-Passw0rd!")
            let dns = try await DNSMasq(records: ["--mx-host=other.test,mx.other.test,10", "--host-record=mx.other.test,127.0.0.1"])
            do {
                try await withServer([
                    "SMTP_DNS_SERVERS": dns.server, "SMTP_OUTBOUND_PORT": "\(mx.smtpPort)", "SMTP_ENABLE_AUTH": "false",
                    "SMTP_LOG_LEVEL": "debug",
                ]) { h in
                    try await h.createUser("alice", "alice@example.test", alicePassword)
                    let queueID = try await base.send(h, to: ["zoe@other.test"])
                    let files = try await mx.waitForMaildirFiles(for: "zoe@other.test", count: 1, timeout: .seconds(60))
                    let stored = try Array(Data(contentsOf: files[0]))
                    // Return-Path, the MX's Received (over TLS), then ours and the message as sent.
                    let text = String(decoding: stored, as: UTF8.self)
                    #expect(text.hasPrefix("Return-Path: <alice@example.test>\r\nReceived: from mail.example.test"))
                    #expect(text.contains("with ESMTPS"), "\(text.prefix(600))")
                    guard let ours = text.range(of: "Received: from client.test") else {
                        Issue.record("our Received field is missing: \(text.prefix(800))")
                        return
                    }
                    let rest = Array(text[ours.lowerBound...].utf8)
                    #expect(base.afterReceived(rest, queueID: queueID) == RemoteDeliveryTests.body)
                    let connected = h.log.split(separator: "\n").first { $0.contains("connected") && $0.contains("mx.other.test") }
                    #expect(connected?.contains("tls=true") == true, "\(String(describing: connected))")
                    #expect(connected?.contains("CHUNKING") == true && connected?.contains("PIPELINING") == true)
                    try await h.waitForRow("zoe@other.test") { $0 == nil }
                }
            } catch {
                await dns.stop()
                throw error
            }
            await dns.stop()
        } catch {
            Issue.record("MX log tail:\n\(mx.logTail(40))")
            await mx.cleanup()
            throw error
        }
        await mx.cleanup()
    }
}
