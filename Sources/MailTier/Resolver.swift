#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

// The DNS port for remote delivery (issue 5): where mail for a domain goes.
// The adapter is `MailTierDNS` (libc-ares); delivery talks only to `MailExchangeResolver`.

/// One host that accepts mail for a domain, with its addresses.
public struct MailExchanger: Sendable, Hashable {
    /// The exchange's host name, lowercased, without a trailing dot.
    public var host: String
    /// The MX preference (lower is tried first); 0 for the implicit MX.
    public var preference: Int
    /// Textual IPv4 addresses (`192.0.2.1`), in the order the server gave them.
    public var ipv4: [String]
    /// Textual IPv6 addresses (`2001:db8::1`, as `inet_ntop` writes them).
    public var ipv6: [String]

    public init(host: String, preference: Int, ipv4: [String] = [], ipv6: [String] = []) {
        self.host = host
        self.preference = preference
        self.ipv4 = ipv4
        self.ipv6 = ipv6
    }

    /// Every address, IPv6 first (RFC 6724's default preference), then IPv4.
    public var addresses: [String] { self.ipv6 + self.ipv4 }

    /// Sorted by preference; hosts of equal preference are shuffled with `generator`, as
    /// RFC 5321 §5.1 requires ("MUST randomize them to spread the load").
    public static func ordered<G: RandomNumberGenerator>(_ exchangers: [MailExchanger], using generator: inout G) -> [MailExchanger] {
        var result: [MailExchanger] = []
        let preferences = Set(exchangers.map(\.preference)).sorted()
        for preference in preferences {
            result += exchangers.filter { $0.preference == preference }.shuffled(using: &generator)
        }
        return result
    }
}

/// Where mail for a domain goes (RFC 5321 §5.1, RFC 7505).
public enum MailRoute: Sendable, Hashable {
    /// The domain's MX hosts that have at least one address, by preference (ties shuffled,
    /// see `MailExchanger.ordered`). Never empty.
    case exchangers([MailExchanger])
    /// No MX record: the domain itself is the only host, with its own A/AAAA addresses
    /// (RFC 5321 §5.1, "implicit MX", preference 0).
    case implicit(MailExchanger)
    /// A single MX of preference 0 and exchange "." (RFC 7505): the domain accepts no mail.
    /// Delivery must not be tried; bounce at once (`556 5.1.10`, RFC 7505 §4.1 / RFC 7504).
    case nullMX

    /// The hosts to try, in order (empty for a null MX).
    public var hosts: [MailExchanger] {
        switch self {
        case .exchangers(let hosts): hosts
        case .implicit(let host): [host]
        case .nullMX: []
        }
    }
}

/// A failed lookup. `isPermanent` is what delivery needs: bounce (permanent) or retry later.
public struct DNSError: Error, Sendable, Hashable, CustomStringConvertible {
    public enum Code: String, Sendable, Hashable, CaseIterable {
        // Permanent: the answer is authoritative and says there is nowhere to deliver.
        /// NXDOMAIN: the domain does not exist.
        case noSuchDomain
        /// No MX and no A/AAAA for the domain, or no MX host has an address.
        case noAddresses
        /// The name is not a domain that can be looked up (empty, too long, bad label).
        case invalidName
        // Temporary: try again later.
        /// No answer within the time limit.
        case timeout
        /// SERVFAIL, REFUSED, NOTIMP, FORMERR, or a malformed answer.
        case serverFailure
        /// The resolver could not be reached (connection refused, no route, no servers).
        case network
        /// The resolver could not start (memory, bad server list) or was shut down.
        case resolverFailure
    }

    public var code: Code
    /// The name being looked up when it failed.
    public var domain: String
    /// Short detail from the resolver (e.g. c-ares's `ares_strerror`), never secret.
    public var detail: String

    public init(_ code: Code, domain: String, detail: String = "") {
        self.code = code
        self.domain = domain
        self.detail = detail
    }

    /// True when retrying cannot help (bounce); false for temporary failures (retry).
    public var isPermanent: Bool {
        switch self.code {
        case .noSuchDomain, .noAddresses, .invalidName: true
        case .timeout, .serverFailure, .network, .resolverFailure: false
        }
    }

    public var description: String {
        let kind = self.isPermanent ? "permanent" : "temporary"
        let suffix = self.detail.isEmpty ? "" : " (\(self.detail))"
        return "DNS \(kind) failure for \(self.domain): \(self.code.rawValue)\(suffix)"
    }
}

/// Finds where mail for a domain goes. Implementations run their blocking or polling work
/// off the caller's executor and bound every lookup by a time limit.
public protocol MailExchangeResolver: Sendable {
    /// MX lookup with A/AAAA resolution of every exchange; the implicit MX when the domain has
    /// no MX record (RFC 5321 §5.1); `.nullMX` for RFC 7505. Throws `DNSError`, whose
    /// `isPermanent` separates bounces from retries.
    func mailExchangers(for domain: String) async throws(DNSError) -> MailRoute
}

/// One DNS server from `SMTP_DNS_SERVERS`: an IPv4 or IPv6 address and an optional port
/// (53 when nil).
public struct DNSServer: Sendable, Hashable, CustomStringConvertible {
    public var address: String
    public var port: Int?

    public init(address: String, port: Int? = nil) {
        self.address = address
        self.port = port
    }

    /// Parses `ip`, `ip:port` (IPv4), `ipv6` or `[ipv6]:port`; nil when invalid.
    public init?(_ text: String) {
        if HostPort.isIPv6(text) {
            self.init(address: text)
            return
        }
        guard let parts = HostPort(text) else { return nil }
        if parts.bracketed {
            guard parts.port != nil, HostPort.isIPv6(parts.host) else { return nil }
        } else {
            guard HostPort.isIPv4(parts.host) else { return nil }
        }
        self.init(address: parts.host, port: parts.port)
    }

    /// With its port (53 when none was given), as c-ares's `ares_set_servers_ports_csv` takes
    /// it: `192.0.2.53:53`, `[2001:db8::53]:5353`.
    public var description: String {
        let port = self.port ?? 53
        return self.address.contains(":") ? "[\(self.address)]:\(port)" : "\(self.address):\(port)"
    }
}

/// `host`, `host:port`, `[literal]` or `[literal]:port`, split (the host's own validity is the
/// caller's to check): how `SMTP_DNS_SERVERS` and `SMTP_RELAY_HOST` name a host and a port.
struct HostPort {
    var host: String
    /// The host was in brackets (an IPv6 literal, RFC 3986 style).
    var bracketed: Bool
    var port: Int?

    /// Nil for an unclosed bracket, text after `]` that is not `:port`, or a port that is not
    /// 1-65535 in at most five digits.
    init?(_ text: String) {
        var portText: Substring?
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]") else { return nil }
            host = String(text[text.index(after: text.startIndex)..<close])
            bracketed = true
            let rest = text[text.index(after: close)...]
            if !rest.isEmpty {
                guard rest.hasPrefix(":") else { return nil }
                portText = rest.dropFirst()
            }
        } else if let colon = text.firstIndex(of: ":") {
            host = String(text[..<colon])
            bracketed = false
            portText = text[text.index(after: colon)...]
        } else {
            host = text
            bracketed = false
        }
        if let portText {
            guard !portText.isEmpty, portText.count <= 5, portText.utf8.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
                let number = Int(portText), (1...65535).contains(number)
            else { return nil }
            port = number
        }
    }

    static func isIPv4(_ text: String) -> Bool {
        var v4 = in_addr()
        return inet_pton(AF_INET, text, &v4) == 1
    }

    static func isIPv6(_ text: String) -> Bool {
        var v6 = in6_addr()
        return inet_pton(AF_INET6, text, &v6) == 1
    }
}
