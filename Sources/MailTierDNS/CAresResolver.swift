// MailTierDNS: MX lookups on libc-ares (DESIGN.md layer 4, adapter for `MailExchangeResolver`).
// Owns the c-ares channel and its polling; imports MailTier (the port) and nothing above it.

import CAres
import MailTier
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// `ares_library_init` once per process (a global `let` is initialised once, thread-safely).
private let libraryStatus: Int32 = ares_library_init(ARES_LIB_INIT_ALL)

/// MX lookups through libc-ares (RFC 5321 §5.1, RFC 7505).
///
/// Each lookup runs on one thread of `threadPool` with its own c-ares channel, created and
/// destroyed there: the channel and its C pointers never leave that thread. The thread polls
/// the channel's sockets (`ares_getsock` + `poll` + `ares_process_fd`) until every query has
/// answered or `timeout` has passed for the whole lookup (MX, then A and AAAA of every
/// exchange, which are sent together).
///
/// Equal MX preferences are shuffled (RFC 5321 §5.1 requires it); hosts without any address
/// are left out of the route.
public struct CAresResolver: MailExchangeResolver {
    /// Servers to ask, in order; the system resolver (`/etc/resolv.conf`) when empty.
    public var servers: [DNSServer]
    /// The limit for one whole `mailExchangers(for:)` call.
    public var timeout: Duration
    private let threadPool: NIOThreadPool

    /// `threadPool` must be started; each lookup holds one of its threads for up to `timeout`.
    public init(servers: [DNSServer] = [], timeout: Duration = .seconds(5), threadPool: NIOThreadPool = .singleton) {
        self.servers = servers
        self.timeout = timeout
        self.threadPool = threadPool
    }

    public func mailExchangers(for domain: String) async throws(DNSError) -> MailRoute {
        guard let name = Self.normalized(domain) else {
            throw DNSError(.invalidName, domain: domain, detail: "not a domain name")
        }
        let servers = self.servers.map(\.description).joined(separator: ",")
        let timeout = self.timeout
        let result: Result<MailRoute, DNSError>
        do {
            result = try await self.threadPool.runIfActive {
                Lookup.mailRoute(for: name, servers: servers, timeout: timeout)
            }
        } catch {
            throw DNSError(.resolverFailure, domain: name, detail: "resolver thread pool is not running")
        }
        return try result.get()
    }

    /// Lowercased, without one trailing dot; nil unless 1-253 octets of labels of 1-63
    /// letters, digits, `-` or `_`.
    static func normalized(_ domain: String) -> String? {
        var name = domain.lowercased()
        if name.hasSuffix(".") { name.removeLast() }
        guard !name.isEmpty, name.utf8.count <= 253 else { return nil }
        for label in name.split(separator: ".", omittingEmptySubsequences: false) {
            guard (1...63).contains(label.utf8.count),
                label.utf8.allSatisfy({
                    ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2D || $0 == 0x5F
                })
            else { return nil }
        }
        return name
    }
}

// MARK: - One lookup, on one thread

/// One DNS query and what came back. Lives in `Lookup.queries` until the channel is destroyed,
/// so the unretained pointer given to c-ares stays valid for every callback.
private final class Query {
    enum Kind {
        case mx, a, aaaa

        var type: Int32 {
            switch self {
            case .mx: 15  // T_MX
            case .a: 1  // T_A
            case .aaaa: 28  // T_AAAA
            }
        }
    }

    let kind: Kind
    let name: String
    var done = false
    var status: Int32 = ARES_SUCCESS
    /// `.mx`: (exchange, preference); the root exchange is "".
    var exchangers: [(host: String, preference: Int)] = []
    /// `.a` / `.aaaa`: textual addresses.
    var addresses: [String] = []

    init(kind: Kind, name: String) {
        self.kind = kind
        self.name = name
    }

    /// The c-ares callback: no captures, the `Query` comes back through `arg`.
    static let callback: ares_callback = { arg, status, _, abuf, alen in
        guard let arg else { return }
        let query = Unmanaged<Query>.fromOpaque(arg).takeUnretainedValue()
        query.done = true
        query.status = status
        guard status == ARES_SUCCESS, let abuf else { return }
        query.status = query.parse(abuf, Int32(alen))
    }

    private func parse(_ abuf: UnsafeMutablePointer<UInt8>, _ alen: Int32) -> Int32 {
        switch self.kind {
        case .mx:
            var reply: UnsafeMutablePointer<ares_mx_reply>? = nil
            let status = ares_parse_mx_reply(abuf, alen, &reply)
            guard status == ARES_SUCCESS else { return status }
            defer { ares_free_data(reply) }
            var next = reply
            while let record = next {
                var host = record.pointee.host.map { String(cString: $0) } ?? ""
                host = host.lowercased()
                if host.hasSuffix(".") { host.removeLast() }
                self.exchangers.append((host, Int(record.pointee.priority)))
                next = record.pointee.next
            }
            return ARES_SUCCESS
        case .a:
            var records = [ares_addrttl](repeating: ares_addrttl(), count: 64)
            var count: Int32 = 64
            let status = ares_parse_a_reply(abuf, alen, nil, &records, &count)
            guard status == ARES_SUCCESS else { return status }
            for index in 0..<Int(max(0, count)) {
                var address = records[index].ipaddr
                if let text = Self.text(family: AF_INET, &address, length: Int(INET_ADDRSTRLEN)) {
                    self.addresses.append(text)
                }
            }
            return ARES_SUCCESS
        case .aaaa:
            var records = [ares_addr6ttl](repeating: ares_addr6ttl(), count: 64)
            var count: Int32 = 64
            let status = ares_parse_aaaa_reply(abuf, alen, nil, &records, &count)
            guard status == ARES_SUCCESS else { return status }
            for index in 0..<Int(max(0, count)) {
                var address = records[index].ip6addr
                if let text = Self.text(family: AF_INET6, &address, length: Int(INET6_ADDRSTRLEN)) {
                    self.addresses.append(text)
                }
            }
            return ARES_SUCCESS
        }
    }

    private static func text<T>(family: Int32, _ address: inout T, length: Int) -> String? {
        var buffer = [CChar](repeating: 0, count: length + 1)
        let ok = withUnsafePointer(to: &address) { pointer in
            inet_ntop(family, UnsafeRawPointer(pointer), &buffer, socklen_t(length)) != nil
        }
        guard ok, let end = buffer.firstIndex(of: 0) else { return nil }
        return String(decoding: buffer[..<end].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// A c-ares channel and its queries, used by exactly one thread from creation to destruction.
private final class Lookup {
    let channel: ares_channel
    let deadline: ContinuousClock.Instant
    var queries: [Query] = []

    private init(channel: ares_channel, deadline: ContinuousClock.Instant) {
        self.channel = channel
        self.deadline = deadline
    }

    /// The whole lookup, blocking this thread for at most about `timeout`.
    static func mailRoute(for domain: String, servers: String, timeout: Duration) -> Result<MailRoute, DNSError> {
        guard libraryStatus == ARES_SUCCESS else {
            return .failure(DNSError(.resolverFailure, domain: domain, detail: Self.message(libraryStatus)))
        }
        let deadline = ContinuousClock.now + timeout
        let milliseconds = Int32(clamping: timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
        var options = ares_options()
        // Three tries whose per-try timeouts (doubled each round by c-ares) fit in the overall
        // limit; the deadline below cancels whatever is still outstanding.
        options.timeout = max(100, milliseconds / 4)
        options.tries = 3
        options.flags = ARES_FLAG_NOSEARCH
        var channel: ares_channel? = nil
        let status = ares_init_options(&channel, &options, ARES_OPT_TIMEOUTMS | ARES_OPT_TRIES | ARES_OPT_FLAGS)
        guard status == ARES_SUCCESS, let channel else {
            return .failure(DNSError(.resolverFailure, domain: domain, detail: Self.message(status)))
        }
        let lookup = Lookup(channel: channel, deadline: deadline)
        defer {
            // Any query still outstanding is called back with ARES_EDESTRUCTION here, while
            // `lookup.queries` still holds every `Query`.
            ares_destroy(channel)
            withExtendedLifetime(lookup) {}
        }
        if !servers.isEmpty {
            let status = ares_set_servers_ports_csv(channel, servers)
            guard status == ARES_SUCCESS else {
                return .failure(DNSError(.resolverFailure, domain: domain, detail: "bad server list: \(Self.message(status))"))
            }
        }
        return lookup.run(domain)
    }

    private func run(_ domain: String) -> Result<MailRoute, DNSError> {
        let mx = self.send(.mx, domain)
        self.wait()
        switch mx.status {
        case ARES_SUCCESS:
            let hosts = mx.exchangers.filter { !$0.host.isEmpty }
            guard !hosts.isEmpty else {
                // Only root exchanges: RFC 7505's null MX ("0 .").
                return .success(.nullMX)
            }
            var distinct: [String] = []
            for host in hosts.map(\.host) where !distinct.contains(host) { distinct.append(host) }
            let pairs = distinct.map { (a: self.send(.a, $0), aaaa: self.send(.aaaa, $0)) }
            self.wait()
            var resolved: [MailExchanger] = []
            for host in hosts {
                guard let pair = pairs.first(where: { $0.a.name == host.host }) else { continue }
                let exchanger = MailExchanger(
                    host: host.host, preference: host.preference, ipv4: pair.a.addresses, ipv6: pair.aaaa.addresses)
                if !exchanger.addresses.isEmpty { resolved.append(exchanger) }
            }
            if resolved.isEmpty {
                return .failure(self.addressFailure(domain, pairs.flatMap { [$0.a, $0.aaaa] }, detail: "no MX host has an address"))
            }
            var generator = SystemRandomNumberGenerator()
            return .success(.exchangers(MailExchanger.ordered(resolved, using: &generator)))
        case ARES_ENODATA:
            // No MX record: the implicit MX (RFC 5321 §5.1).
            let a = self.send(.a, domain)
            let aaaa = self.send(.aaaa, domain)
            self.wait()
            let exchanger = MailExchanger(host: domain, preference: 0, ipv4: a.addresses, ipv6: aaaa.addresses)
            if exchanger.addresses.isEmpty {
                return .failure(self.addressFailure(domain, [a, aaaa], detail: "no MX and no A/AAAA record"))
            }
            return .success(.implicit(exchanger))
        default:
            return .failure(Self.error(mx.status, domain: domain))
        }
    }

    /// No address found: temporary if any address query failed temporarily, else permanent.
    private func addressFailure(_ domain: String, _ queries: [Query], detail: String) -> DNSError {
        for query in queries where query.status != ARES_SUCCESS && query.status != ARES_ENODATA {
            let error = Self.error(query.status, domain: query.name)
            if !error.isPermanent { return DNSError(error.code, domain: domain, detail: "\(query.name): \(error.detail)") }
        }
        return DNSError(.noAddresses, domain: domain, detail: detail)
    }

    private func send(_ kind: Query.Kind, _ name: String) -> Query {
        let query = Query(kind: kind, name: name)
        self.queries.append(query)
        ares_query(self.channel, name, 1 /* C_IN */, kind.type, Query.callback, Unmanaged.passUnretained(query).toOpaque())
        return query
    }

    /// Polls the channel until every query is done or the deadline passes (then cancels them).
    private func wait() {
        let maximum = Int(ARES_GETSOCK_MAXNUM)
        var sockets = [ares_socket_t](repeating: ARES_SOCKET_BAD, count: maximum)
        while self.queries.contains(where: { !$0.done }) {
            let now = ContinuousClock.now
            guard now < self.deadline else {
                ares_cancel(self.channel)  // calls back with ARES_ECANCELLED
                return
            }
            let remaining = self.deadline - now
            let remainingMicroseconds = remaining.components.seconds * 1_000_000 + remaining.components.attoseconds / 1_000_000_000_000
            let bits = ares_getsock(self.channel, &sockets, Int32(maximum))
            var descriptors: [pollfd] = []
            for index in 0..<maximum {
                var events: Int16 = 0
                if bits & (1 << index) != 0 { events |= Int16(POLLIN) }
                if bits & (1 << (index + maximum)) != 0 { events |= Int16(POLLOUT) }
                if events != 0 { descriptors.append(pollfd(fd: sockets[index], events: events, revents: 0)) }
            }
            var limit = timeval(tv_sec: Int(remainingMicroseconds / 1_000_000), tv_usec: Int(remainingMicroseconds % 1_000_000))
            var next = timeval()
            let wait = ares_timeout(self.channel, &limit, &next)?.pointee ?? limit
            // Round up so a pending retry is due when poll returns.
            let waitMilliseconds = Int32(clamping: wait.tv_sec * 1000 + (wait.tv_usec + 999) / 1000)
            let ready = poll(&descriptors, nfds_t(descriptors.count), max(1, waitMilliseconds))
            if ready > 0 {
                for descriptor in descriptors where descriptor.revents != 0 {
                    let readable = descriptor.revents & Int16(POLLIN | POLLERR | POLLHUP) != 0
                    let writable = descriptor.revents & Int16(POLLOUT) != 0
                    ares_process_fd(
                        self.channel, readable ? descriptor.fd : ARES_SOCKET_BAD, writable ? descriptor.fd : ARES_SOCKET_BAD)
                }
            } else {
                // Timed out (or interrupted): let c-ares retry or fail the queries that are due.
                ares_process_fd(self.channel, ARES_SOCKET_BAD, ARES_SOCKET_BAD)
            }
        }
    }

    static func message(_ status: Int32) -> String {
        ares_strerror(status).map { String(cString: $0) } ?? "c-ares status \(status)"
    }

    /// A failed query's status as a `DNSError` (ENODATA is handled by the caller).
    static func error(_ status: Int32, domain: String) -> DNSError {
        let code: DNSError.Code
        switch status {
        case ARES_ENOTFOUND: code = .noSuchDomain
        case ARES_ENODATA: code = .noAddresses
        case ARES_EBADNAME: code = .invalidName
        case ARES_ETIMEOUT, ARES_ECANCELLED: code = .timeout
        case ARES_ESERVFAIL, ARES_EREFUSED, ARES_ENOTIMP, ARES_EFORMERR, ARES_EBADRESP: code = .serverFailure
        case ARES_ECONNREFUSED: code = .network
        default: code = .resolverFailure
        }
        let detail = status == ARES_ECANCELLED ? "no answer within the time limit" : Self.message(status)
        return DNSError(code, domain: domain, detail: detail)
    }
}
