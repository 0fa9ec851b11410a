#if canImport(Glibc)
import Glibc
#endif
import Foundation
import MailTier
import MailTierDNS
import NIOPosix
import Testing

/// A dnsmasq that this test started on 127.0.0.1 (UDP and TCP on one free port), answering
/// only from the records on its command line. Missing dnsmasq is a failure, not a skip.
///
/// dnsmasq daemonizes (no `--keep-in-foreground`): it closes every inherited descriptor at
/// start, and Foundation's `Process` takes that for the child's exit and blocks its monitor
/// thread in `wait4` until the child really ends — which a foreground dnsmasq never does, and
/// then no other `Process` in the test run is ever seen to finish. A daemonizing dnsmasq's first
/// process exits at once; the daemon's pid comes from the pid file.
final class PrivateDNSServer: Sendable {
    let port: Int
    private let pid: pid_t
    private let directory: URL

    static let records = [
        "--mx-host=example.test,mx1.example.test,10",
        "--mx-host=example.test,mx2.example.test,20",
        "--host-record=mx1.example.test,192.0.2.11",
        "--host-record=mx2.example.test,192.0.2.12,2001:db8::12",
        "--host-record=nomx.test,192.0.2.30,2001:db8::30",
        "--mx-host=null.test,.,0",
        "--txt-record=empty.test,nothing here",
        "--mx-host=dangling.test,gone.test,10",
        "--mx-host=tie.test,mx1.example.test,5",
        "--mx-host=tie.test,mx2.example.test,5",
        // Names under test. that are not listed above are NXDOMAIN.
        "--local=/test/",
    ]

    static func executable() throws -> String {
        let candidates = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/usr/local/sbin/dnsmasq"]
        guard let path = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            throw TestFailure("dnsmasq not found (apt-get install dnsmasq-base, or run scripts/install-deps.sh)")
        }
        return path
    }

    private init(port: Int, pid: pid_t, directory: URL) {
        self.port = port
        self.pid = pid
        self.directory = directory
    }

    /// Starts dnsmasq with `records` on a free port and waits until it accepts TCP; retries on a
    /// port race.
    static func start(records: [String] = records) throws -> PrivateDNSServer {
        let path = try executable()
        var lastError = "no attempt"
        for _ in 0..<5 {
            let port = try freeUDPPort()
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-dns-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            let pidFile = directory.appendingPathComponent("dnsmasq.pid").path
            let process = Process()
            process.executableURL = URL(fileURLWithPath: path)
            process.arguments = [
                "--conf-file=/dev/null", "--pid-file=\(pidFile)", "--user=root",
                "--port=\(port)", "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                "--log-facility=\(directory.path)/dnsmasq.log",
            ] + records
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            process.waitUntilExit()
            guard process.terminationStatus == 0,
                let text = try? String(contentsOfFile: pidFile, encoding: .utf8),
                let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines))
            else {
                lastError = "dnsmasq exited with \(process.terminationStatus) (port \(port) taken?)"
                try? FileManager.default.removeItem(at: directory)
                continue
            }
            let server = PrivateDNSServer(port: port, pid: pid, directory: directory)
            // Generous: the full suite keeps both cores busy.
            let deadline = Date().addingTimeInterval(20)
            while Date() < deadline && kill(pid, 0) == 0 {
                if canConnect(port: port) { return server }
                usleep(50_000)
            }
            lastError = kill(pid, 0) == 0 ? "dnsmasq did not listen on \(port) within 20 s" : "dnsmasq exited (port \(port) taken?)"
            server.stop()
        }
        throw TestFailure(lastError)
    }

    var servers: [DNSServer] { [DNSServer(address: "127.0.0.1", port: self.port)] }

    func stop() {
        // SIGKILL: dnsmasq inherits the test process's signal mask, in which SIGTERM is blocked.
        kill(self.pid, SIGKILL)
        // Not our child (it daemonized): wait for it to go by polling.
        for _ in 0..<100 where kill(self.pid, 0) == 0 { usleep(20_000) }
        try? FileManager.default.removeItem(at: self.directory)
    }
}

struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Runs `body` with a fresh dnsmasq, stopped afterwards even when `body` throws.
func withDNSServer<T>(_ body: (PrivateDNSServer) async throws -> T) async throws -> T {
    let server = try PrivateDNSServer.start()
    defer { server.stop() }
    return try await body(server)
}

/// A UDP port on 127.0.0.1 that was free a moment ago.
func freeUDPPort() throws -> Int {
    let socket = try BoundUDPSocket()
    defer { socket.close() }
    return socket.port
}

func canConnect(port: Int) -> Bool {
    let fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    guard fd >= 0 else { return false }
    defer { Glibc.close(fd) }
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    return withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
            Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
        }
    }
}

/// A UDP socket bound on 127.0.0.1 that never reads: a DNS server that does not answer.
final class BoundUDPSocket: @unchecked Sendable {
    // @unchecked: `fd` is immutable; `close()` is called once by the owning test.
    let fd: Int32
    let port: Int

    init() throws {
        let fd = Glibc.socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw TestFailure("socket: \(errno)") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0
            }
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let named = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) == 0 }
        }
        guard bound, named else {
            Glibc.close(fd)
            throw TestFailure("bind: \(errno)")
        }
        self.fd = fd
        self.port = Int(UInt16(bigEndian: address.sin_port))
    }

    func close() { Glibc.close(self.fd) }
}

/// The thread pool the lookups block on (each test's own, so parallel tests do not starve
/// `NIOThreadPool.singleton`).
func withResolverPool<T>(_ body: (NIOThreadPool) async throws -> T) async throws -> T {
    let pool = NIOThreadPool(numberOfThreads: 4)
    pool.start()
    do {
        let result = try await body(pool)
        try await pool.shutdownGracefully()
        return result
    } catch {
        try? await pool.shutdownGracefully()
        throw error
    }
}

func lookup(_ domain: String, _ resolver: CAresResolver) async -> Result<MailRoute, DNSError> {
    do {
        return .success(try await resolver.mailExchangers(for: domain))
    } catch {
        return .failure(error)
    }
}

@Suite("MailTierDNSTests")
struct CAresResolverTests {
    // Generous limit: dnsmasq answers in milliseconds, but the whole suite shares 2 busy cores.
    static let timeout: Duration = .seconds(10)

    @Test("MX hosts in preference order, each with its IPv4 and IPv6 addresses")
    func mxOrderAndAddresses() async throws {
        try await withDNSServer { server in
            try await withResolverPool { pool in
                let resolver = CAresResolver(servers: server.servers, timeout: Self.timeout, threadPool: pool)
                let route = try await resolver.mailExchangers(for: "Example.TEST.")
                #expect(route == .exchangers([
                    MailExchanger(host: "mx1.example.test", preference: 10, ipv4: ["192.0.2.11"]),
                    MailExchanger(host: "mx2.example.test", preference: 20, ipv4: ["192.0.2.12"], ipv6: ["2001:db8::12"]),
                ]))
                #expect(route.hosts.last?.addresses == ["2001:db8::12", "192.0.2.12"])

                // Equal preferences: both hosts, in either order.
                let tie = try await resolver.mailExchangers(for: "tie.test")
                #expect(Set(tie.hosts.map(\.host)) == ["mx1.example.test", "mx2.example.test"])
                #expect(tie.hosts.allSatisfy { $0.preference == 5 })
            }
        }
    }

    @Test("no MX record: the implicit MX is the domain's own A/AAAA (RFC 5321 §5.1)")
    func implicitMX() async throws {
        try await withDNSServer { server in
            try await withResolverPool { pool in
                let resolver = CAresResolver(servers: server.servers, timeout: Self.timeout, threadPool: pool)
                let route = try await resolver.mailExchangers(for: "nomx.test")
                #expect(route == .implicit(MailExchanger(host: "nomx.test", preference: 0, ipv4: ["192.0.2.30"], ipv6: ["2001:db8::30"])))
            }
        }
    }

    @Test("null MX (RFC 7505), NXDOMAIN, no address at all: permanent")
    func permanentAnswers() async throws {
        try await withDNSServer { server in
            try await withResolverPool { pool in
                let resolver = CAresResolver(servers: server.servers, timeout: Self.timeout, threadPool: pool)
                let null = try await resolver.mailExchangers(for: "null.test")
                #expect(null == .nullMX)
                #expect(MailRoute.nullMX.hosts.isEmpty)

                let missing = await lookup("missing.test", resolver)
                #expect(missing.failure?.code == .noSuchDomain)
                #expect(missing.failure?.isPermanent == true)

                let empty = await lookup("empty.test", resolver)
                #expect(empty.failure?.code == .noAddresses)
                #expect(empty.failure?.isPermanent == true)

                // The only MX host does not exist.
                let dangling = await lookup("dangling.test", resolver)
                #expect(dangling.failure?.code == .noAddresses)
                #expect(dangling.failure?.isPermanent == true)

                let invalid = await lookup("bad name.test", resolver)
                #expect(invalid.failure?.code == .invalidName)
                #expect(invalid.failure?.isPermanent == true)
            }
        }
    }

    @Test("a server that never answers: temporary, within the time limit")
    func silentServerIsTemporary() async throws {
        let silent = try BoundUDPSocket()
        defer { silent.close() }
        try await withResolverPool { pool in
            let resolver = CAresResolver(
                servers: [DNSServer(address: "127.0.0.1", port: silent.port)], timeout: .seconds(1), threadPool: pool)
            let start = ContinuousClock.now
            let result = await lookup("example.test", resolver)
            let elapsed = ContinuousClock.now - start
            #expect(result.failure?.code == .timeout)
            #expect(result.failure?.isPermanent == false)
            #expect(elapsed < .seconds(15), "took \(elapsed)")
        }
    }

    @Test("a port nobody listens on: temporary")
    func closedPortIsTemporary() async throws {
        let port = try freeUDPPort()
        try await withResolverPool { pool in
            let resolver = CAresResolver(
                servers: [DNSServer(address: "127.0.0.1", port: port)], timeout: .seconds(1), threadPool: pool)
            let start = ContinuousClock.now
            let result = await lookup("example.test", resolver)
            #expect(result.failure != nil)
            #expect(result.failure?.isPermanent == false)
            #expect(ContinuousClock.now - start < .seconds(15))
        }
    }

    @Test("DNSError: permanent and temporary codes")
    func errorKinds() {
        for code in DNSError.Code.allCases {
            let permanent = [DNSError.Code.noSuchDomain, .noAddresses, .invalidName].contains(code)
            #expect(DNSError(code, domain: "example.test").isPermanent == permanent, "\(code)")
        }
        #expect(DNSError(.timeout, domain: "example.test", detail: "x").description == "DNS temporary failure for example.test: timeout (x)")
    }

    @Test("equal preferences are shuffled, lower preference first")
    func ordering() {
        let hosts = (0..<6).map { MailExchanger(host: "mx\($0).example", preference: $0 < 3 ? 10 : 5) }
        var seen: Set<[String]> = []
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<200 {
            let ordered = MailExchanger.ordered(hosts, using: &generator)
            #expect(ordered.map(\.preference) == [5, 5, 5, 10, 10, 10])
            seen.insert(ordered.map(\.host))
        }
        #expect(seen.count > 1)
    }

    @Test("SMTP_DNS_SERVERS forms, as c-ares takes them")
    func serverParsing() {
        #expect(DNSServer("192.0.2.53")?.description == "192.0.2.53:53")
        #expect(DNSServer("127.0.0.1:5353")?.description == "127.0.0.1:5353")
        #expect(DNSServer("2001:db8::53")?.description == "[2001:db8::53]:53")
        #expect(DNSServer("[::1]:5300") == DNSServer(address: "::1", port: 5300))
        for bad in ["", "dns.example", "127.0.0.1:0", "127.0.0.1:99999", "[::1]", "[::1]:x", "1.2.3.4:53:53"] {
            #expect(DNSServer(bad) == nil, "\(bad)")
        }
    }
}

extension Result {
    var failure: Failure? {
        if case .failure(let error) = self { return error }
        return nil
    }
}
