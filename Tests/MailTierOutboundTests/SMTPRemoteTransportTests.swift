// SMTPRemoteTransport against a real SMTP peer (Tests/IntegrationTests/Support/smtp_peer.py,
// aiosmtpd) reached as the relay host: time limits shortened, the per-destination limit, reuse.

import Foundation
import Logging
import MailTier
import MailTierDNS
import MailTierOutbound
import NIOCore
import SMTPNIO
import Testing

#if canImport(Glibc)
import Glibc
#endif

struct PeerFailure: Error, CustomStringConvertible {
    let description: String
}

/// aiosmtpd on 127.0.0.1, stopped with SIGKILL by `stop()`.
final class Peer: @unchecked Sendable {
    // @unchecked: `process` is only touched by the test that owns the peer, one call at a time.
    let port: Int
    let directory: URL
    private let process: Process

    /// `smtp_peer.py` with `arguments`, storing into `directory`.
    convenience init(arguments: [String] = []) throws {
        try self.init(script: "smtp_peer.py") { directory in ["--dir", directory.path] + arguments }
    }

    /// `scripted_smtp.py` answering with `replies` (verb → octets), logging to `sessionLog`.
    convenience init(replies: [String: String]) throws {
        let json = String(decoding: try JSONSerialization.data(withJSONObject: replies), as: UTF8.self)
        try self.init(script: "scripted_smtp.py") { directory in
            ["--log", directory.appendingPathComponent("session.log").path, "--replies", json]
        }
    }

    /// What `scripted_smtp.py` received, one line each.
    var sessionLog: [String] {
        let text = (try? String(contentsOf: directory.appendingPathComponent("session.log"), encoding: .utf8)) ?? ""
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        if lines.last == "" { lines.removeLast() }
        return lines
    }

    init(script name: String, arguments: (URL) -> [String]) throws {
        let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("IntegrationTests/Support/\(name)").path
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-outbound-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        port = try Self.freePort()
        process = Process()
        process.executableURL = URL(fileURLWithPath: try Self.python())
        process.arguments = [script, "--port", "\(port)"] + arguments(directory)
        let output = directory.appendingPathComponent("peer.out")
        _ = FileManager.default.createFile(atPath: output.path, contents: nil)
        let handle = try FileHandle(forWritingTo: output)
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        try handle.close()
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline, process.isRunning {
            if let text = try? String(contentsOf: output, encoding: .utf8), text.contains("READY") { return }
            usleep(50_000)
        }
        let text = (try? String(contentsOf: output, encoding: .utf8)) ?? ""
        stop()
        throw PeerFailure(description: "\(name) did not start: \(text)")
    }

    var messageCount: Int {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []).filter { $0.hasSuffix(".json") }.count
    }

    var connectionCount: Int {
        let text = (try? String(contentsOf: directory.appendingPathComponent("connections.log"), encoding: .utf8)) ?? ""
        return text.split(separator: "\n").count
    }

    func stop() {
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        try? FileManager.default.removeItem(at: directory)
    }

    /// python3's real interpreter (not a pyenv shim, so that SIGKILL reaches the server itself).
    static func python() throws -> String {
        let probe = Process()
        probe.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        probe.arguments = ["python3", "-c", "import sys; print(sys.executable)"]
        let pipe = Pipe()
        probe.standardOutput = pipe
        try probe.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        probe.waitUntilExit()
        let path = String(decoding: data, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard probe.terminationStatus == 0, FileManager.default.isExecutableFile(atPath: path) else {
            throw PeerFailure(description: "python3 not found")
        }
        return path
    }

    static func freePort() throws -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw PeerFailure(description: "socket: \(errno)") }
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let ok = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0
            }
        }
        guard ok else { throw PeerFailure(description: "bind: \(errno)") }
        return Int(UInt16(bigEndian: address.sin_port))
    }
}

@Suite("SMTPRemoteTransport against a real peer")
struct SMTPRemoteTransportTests {
    static let message = ByteBuffer(string: "Subject: test\r\n\r\nHello.\r\n")

    static func job(_ id: Int64, to recipient: String) -> DeliveryJob {
        DeliveryJob(
            id: id, messageID: "msg_\(id)", blobKey: "blob_\(id)", mailFrom: "alice@example.test", recipient: recipient,
            isLocal: false, attempts: 0, maxAttempts: 5, leaseToken: "token", deliveryKey: "key", receivedAt: Date(),
            sizeBytes: message.readableBytes)
    }

    static func transport(relayPort: Int, concurrency: Int = 10, timeouts: SMTPClientTimeouts = SMTPClientTimeouts()) -> SMTPRemoteTransport {
        SMTPRemoteTransport(
            settings: .init(
                hostname: "mail.example.test", relay: RelayHost(host: "127.0.0.1", port: relayPort), concurrency: concurrency,
                timeouts: timeouts),
            resolver: CAresResolver(), logger: Logger(label: "test"))
    }

    /// `count` one-recipient messages handed to `transport` at the same time; every result.
    static func deliverAtOnce(_ count: Int, through transport: SMTPRemoteTransport) async -> [DeliveryProblem?] {
        await withTaskGroup(of: [DeliveryProblem?].self) { group in
            for id in 1...count {
                group.addTask { await transport.deliver(message, jobs: [job(Int64(id), to: "user\(id)@remote.test")]) }
            }
            var all: [DeliveryProblem?] = []
            for await result in group { all += result }
            return all
        }
    }

    @Test("a peer slower than the time limits: a temporary 4.4.2 naming the step, nothing delivered")
    func timeout() async throws {
        let peer = try Peer(arguments: ["--delay", "60"])
        defer { peer.stop() }
        var timeouts = SMTPClientTimeouts.all(.seconds(30))
        timeouts.mail = .seconds(2)
        let transport = Self.transport(relayPort: peer.port, timeouts: timeouts)
        let started = ContinuousClock.now
        let problems = await transport.deliver(Self.message, jobs: [Self.job(1, to: "bob@remote.test")])
        #expect(ContinuousClock.now - started < .seconds(50))
        let problem = try #require(problems.first ?? nil)
        #expect(!problem.isPermanent)
        #expect(problem.status == "4.4.2")
        #expect(problem.message.contains("no reply to MAIL within 2 s"), "\(problem.message)")
        #expect(problem.remoteMTA == "dns; 127.0.0.1")
        await transport.shutdown()
        #expect(peer.messageCount == 0)
    }

    @Test("nobody listening: a temporary 4.4.1")
    func connectionRefused() async throws {
        let transport = Self.transport(relayPort: try Peer.freePort(), timeouts: .all(.seconds(10)))
        let problems = await transport.deliver(Self.message, jobs: [Self.job(1, to: "bob@remote.test")])
        let problem = try #require(problems.first ?? nil)
        #expect(!problem.isPermanent && problem.status == "4.4.1", "\(problem)")
        await transport.shutdown()
    }

    @Test("SMTP_OUTBOUND_CONCURRENCY=1: six messages at once go over one connection, one after the other")
    func concurrencyLimit() async throws {
        let peer = try Peer(arguments: ["--delay", "0.1"])
        defer { peer.stop() }
        let transport = Self.transport(relayPort: peer.port, concurrency: 1)
        let results = await Self.deliverAtOnce(6, through: transport)
        #expect(results.count == 6 && results.allSatisfy { $0 == nil }, "\(results)")
        #expect(peer.messageCount == 6)
        #expect(peer.connectionCount == 1)
        await transport.shutdown()
    }

    @Test("with a limit of 2, six messages at once use at most two connections; after shutdown nothing is sent")
    func concurrencyLimitTwo() async throws {
        let peer = try Peer(arguments: ["--delay", "0.1"])
        defer { peer.stop() }
        let transport = Self.transport(relayPort: peer.port, concurrency: 2)
        let results = await Self.deliverAtOnce(6, through: transport)
        #expect(results.count == 6 && results.allSatisfy { $0 == nil }, "\(results)")
        #expect(peer.messageCount == 6)
        #expect((1...2).contains(peer.connectionCount), "\(peer.connectionCount) connections")
        await transport.shutdown()
        let after = await transport.deliver(Self.message, jobs: [Self.job(7, to: "late@remote.test")])
        #expect(after.first??.isPermanent == false)
        #expect(peer.messageCount == 6)
    }

    @Test("EHLO refused with 5xx: HELO, then MAIL without parameters and DATA with dot-stuffing")
    func heloFallback() async throws {
        let peer = try Peer(replies: ["EHLO": "502 5.5.1 EHLO not supported\r\n"])
        defer { peer.stop() }
        let transport = Self.transport(relayPort: peer.port, timeouts: .all(.seconds(20)))
        let content = ByteBuffer(string: "Subject: old\r\n\r\n.hidden\r\nend")
        let problems = await transport.deliver(content, jobs: [Self.job(1, to: "bob@remote.test")])
        #expect(problems == [nil])
        await transport.shutdown()
        let log = peer.sessionLog
        #expect(log.starts(with: ["C: EHLO mail.example.test", "C: HELO mail.example.test", "C: MAIL FROM:<alice@example.test>"]), "\(log)")
        // The stuffed dot arrives doubled on the wire; the missing final CRLF was added.
        #expect(log.contains("..hidden") && log.contains("end"), "\(log)")
        let begin = try #require(log.firstIndex(of: "DATA-BEGIN"))
        #expect(Array(log[(begin + 1)...].prefix(5)) == ["Subject: old", "", "..hidden", "end", "DATA-END"])
    }

    @Test("after HELO an SMTPUTF8 message fails for good with 5.6.7 and MAIL is never sent")
    func heloAndSMTPUTF8() async throws {
        let peer = try Peer(replies: ["EHLO": "500 5.5.2 what?\r\n"])
        defer { peer.stop() }
        let transport = Self.transport(relayPort: peer.port, timeouts: .all(.seconds(20)))
        var job = Self.job(1, to: "bob@remote.test")
        job.smtputf8 = true
        let problem = try #require(await transport.deliver(Self.message, jobs: [job]).first ?? nil)
        #expect(problem.isPermanent && problem.status == "5.6.7", "\(problem)")
        await transport.shutdown()
        #expect(!peer.sessionLog.contains { $0.hasPrefix("C: MAIL") })
    }

    @Test("a message over the peer's SIZE fails for good with 5.3.4 and MAIL is never sent")
    func sizeLimit() async throws {
        let peer = try Peer(replies: ["EHLO": "250-scripted.test\r\n250 SIZE 10\r\n"])
        defer { peer.stop() }
        let transport = Self.transport(relayPort: peer.port, timeouts: .all(.seconds(20)))
        let problem = try #require(await transport.deliver(Self.message, jobs: [Self.job(1, to: "bob@remote.test")]).first ?? nil)
        #expect(problem.isPermanent && problem.status == "5.3.4", "\(problem)")
        await transport.shutdown()
        #expect(!peer.sessionLog.contains { $0.hasPrefix("C: MAIL") })
    }

    @Test("plaintext behind the peer's 220 to STARTTLS closes the connection: temporary, nothing sent")
    func startTLSInjection() async throws {
        let peer = try Peer(replies: [
            "EHLO": "250-scripted.test\r\n250 STARTTLS\r\n",
            "STARTTLS": "220 2.0.0 go ahead\r\n250 2.0.0 injected\r\n",
        ])
        defer { peer.stop() }
        let transport = Self.transport(relayPort: peer.port, timeouts: .all(.seconds(20)))
        let problem = try #require(await transport.deliver(Self.message, jobs: [Self.job(1, to: "bob@remote.test")]).first ?? nil)
        #expect(!problem.isPermanent, "\(problem)")
        #expect(problem.message.contains("plaintext behind its STARTTLS reply"), "\(problem)")
        await transport.shutdown()
        #expect(!peer.sessionLog.contains { $0.hasPrefix("C: MAIL") })
    }

    @Test("PIPELINING: MAIL, every RCPT and DATA go together; each recipient gets its own RCPT reply")
    func pipelinedRejections() async throws {
        let peer = try Peer(replies: [
            "EHLO": "250-scripted.test\r\n250 PIPELINING\r\n",
            "RCPT": "550 5.1.1 no such user\r\n",
            "DATA": "554 5.5.1 no valid recipients\r\n",
        ])
        defer { peer.stop() }
        let transport = Self.transport(relayPort: peer.port, timeouts: .all(.seconds(20)))
        let problems = await transport.deliver(
            Self.message, jobs: [Self.job(1, to: "a@remote.test"), Self.job(2, to: "b@remote.test")])
        #expect(problems.count == 2)
        for problem in problems {
            #expect(problem?.isPermanent == true && problem?.status == "5.1.1", "\(String(describing: problem))")
            #expect(problem?.diagnostic == "smtp; 550 5.1.1 no such user")
            #expect(problem?.remoteMTA == "dns; 127.0.0.1")
        }
        await transport.shutdown()
        let log = peer.sessionLog
        #expect(
            Array(log.dropFirst()).starts(with: ["C: MAIL FROM:<alice@example.test>", "C: RCPT TO:<a@remote.test>", "C: RCPT TO:<b@remote.test>", "C: DATA"]),
            "\(log)")
        #expect(!log.contains("DATA-BEGIN"))
    }

    @Test("PIPELINING: a 354 to DATA after every RCPT was refused gets only the final dot (RFC 2920 §3.1)")
    func pipelinedDataWithoutRecipients() async throws {
        let peer = try Peer(replies: ["EHLO": "250-scripted.test\r\n250 PIPELINING\r\n", "RCPT": "451 4.3.0 later\r\n"])
        defer { peer.stop() }
        let transport = Self.transport(relayPort: peer.port, timeouts: .all(.seconds(20)))
        let problems = await transport.deliver(Self.message, jobs: [Self.job(1, to: "a@remote.test")])
        #expect(problems.first??.isPermanent == false && problems.first??.status == "4.3.0", "\(problems)")
        await transport.shutdown()
        let log = peer.sessionLog
        let begin = try #require(log.firstIndex(of: "DATA-BEGIN"), "\(log)")
        #expect(log[begin + 1] == "DATA-END", "\(log)")
    }
}
