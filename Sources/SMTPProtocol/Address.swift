/// An RFC 5321 §4.1.2 `Mailbox`: `Local-part "@" ( Domain / address-literal )`,
/// with the RFC 6531 extension to UTF-8 local parts and domains.
public struct Mailbox: Sendable, Hashable, CustomStringConvertible {
    /// As sent, including quotes when the local part is a `Quoted-string`.
    public var localPart: String
    /// As sent; an address literal keeps its brackets.
    public var domain: String

    public init(localPart: String, domain: String) {
        self.localPart = localPart
        self.domain = domain
    }

    /// True when every octet is ASCII; otherwise the transaction needs SMTPUTF8 (RFC 6531 §3.2).
    public var isASCII: Bool { localPart.utf8.allSatisfy { $0 < 0x80 } && domain.utf8.allSatisfy { $0 < 0x80 } }

    /// The domain in lower case, for routing decisions.
    public var normalizedDomain: String { domain.lowercased() }

    public var description: String { "\(localPart)@\(domain)" }
}

/// `Reverse-path` (RFC 5321 §4.1.2): a mailbox, or `<>` for notifications.
public enum ReversePath: Sendable, Hashable, CustomStringConvertible {
    case null
    case mailbox(Mailbox)

    public var mailbox: Mailbox? {
        if case .mailbox(let mailbox) = self { return mailbox }
        return nil
    }

    /// The path as it appears between the angle brackets.
    public var description: String { mailbox?.description ?? "" }
}

/// `Forward-path` (RFC 5321 §4.1.1.3): a mailbox, or the special `<Postmaster>`.
public enum ForwardPath: Sendable, Hashable, CustomStringConvertible {
    case postmaster
    case mailbox(Mailbox)

    public var description: String {
        switch self {
        case .postmaster: return "Postmaster"
        case .mailbox(let mailbox): return mailbox.description
        }
    }
}

/// Parses the grammar of RFC 5321 §4.1.2 from octets; UTF-8 is accepted everywhere RFC 6531
/// allows it, and `Mailbox.isASCII` tells the caller whether SMTPUTF8 was needed.
enum AddressParser {
    static func isAtext(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        case UInt8(ascii: "!"), UInt8(ascii: "#"), UInt8(ascii: "$"), UInt8(ascii: "%"), UInt8(ascii: "&"), UInt8(ascii: "'"),
            UInt8(ascii: "*"), UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: "/"), UInt8(ascii: "="), UInt8(ascii: "?"),
            UInt8(ascii: "^"), UInt8(ascii: "_"), UInt8(ascii: "`"), UInt8(ascii: "{"), UInt8(ascii: "|"), UInt8(ascii: "}"),
            UInt8(ascii: "~"):
            return true
        default:
            return byte >= 0x80
        }
    }

    static func isLetDig(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
            return true
        default:
            return byte >= 0x80
        }
    }

    /// `Domain = sub-domain *("." sub-domain)`; `sub-domain = Let-dig [Ldh-str]`.
    static func isValidDomain<Bytes: Collection>(_ bytes: Bytes) -> Bool where Bytes.Element == UInt8 {
        guard !bytes.isEmpty, bytes.count <= SMTPDefaults.maxDomainLength else { return false }
        var labelLength = 0
        var previous: UInt8 = UInt8(ascii: ".")
        for byte in bytes {
            if byte == UInt8(ascii: ".") {
                guard labelLength > 0, previous != UInt8(ascii: "-") else { return false }
                labelLength = 0
            } else if isLetDig(byte) {
                labelLength += 1
            } else if byte == UInt8(ascii: "-") {
                guard labelLength > 0 else { return false }
                labelLength += 1
            } else {
                return false
            }
            guard labelLength <= 63 else { return false }
            previous = byte
        }
        return labelLength > 0 && previous != UInt8(ascii: "-")
    }

    /// `address-literal = "[" ( IPv4-address-literal / IPv6-address-literal / General-address-literal ) "]"`,
    /// checked for its outer form only.
    static func isValidAddressLiteral(_ bytes: ArraySlice<UInt8>) -> Bool {
        guard bytes.count >= 3, bytes.first == UInt8(ascii: "["), bytes.last == UInt8(ascii: "]") else { return false }
        return bytes.dropFirst().dropLast().allSatisfy { (33...126).contains($0) && $0 != UInt8(ascii: "[") && $0 != UInt8(ascii: "]") && $0 != UInt8(ascii: "\\") }
    }

    /// Parses `Mailbox` (no angle brackets). Nil when it is not one.
    static func parseMailbox(_ bytes: ArraySlice<UInt8>) -> Mailbox? {
        guard let at = bytes.lastIndex(of: UInt8(ascii: "@")) else { return nil }
        let local = bytes[bytes.startIndex..<at]
        let domain = bytes[(at + 1)...]
        guard !local.isEmpty, local.count <= SMTPDefaults.maxLocalPartLength else { return nil }
        guard isValidLocalPart(local) else { return nil }
        guard domain.first == UInt8(ascii: "[") ? isValidAddressLiteral(domain) : isValidDomain(domain) else { return nil }
        guard let localString = String(validating: local, as: UTF8.self),
            let domainString = String(validating: domain, as: UTF8.self)
        else { return nil }
        return Mailbox(localPart: localString, domain: domainString)
    }

    /// `Local-part = Dot-string / Quoted-string`.
    static func isValidLocalPart(_ bytes: ArraySlice<UInt8>) -> Bool {
        if bytes.first == UInt8(ascii: "\"") {
            guard bytes.count >= 2, bytes.last == UInt8(ascii: "\"") else { return false }
            var escaped = false
            for byte in bytes.dropFirst().dropLast() {
                if escaped {
                    guard (32...126).contains(byte) else { return false }
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else {
                    guard byte >= 0x80 || ((32...126).contains(byte) && byte != UInt8(ascii: "\"")) else { return false }
                }
            }
            return !escaped
        }
        var previousWasDot = true
        for byte in bytes {
            if byte == UInt8(ascii: ".") {
                guard !previousWasDot else { return false }
                previousWasDot = true
            } else {
                guard isAtext(byte) else { return false }
                previousWasDot = false
            }
        }
        return !previousWasDot
    }

    /// Parses `"<" [ A-d-l ":" ] Mailbox ">"` or `<>` (when `allowNull`). The source route,
    /// if any, is ignored as RFC 5321 §4.1.1.3 requires.
    static func parsePath(_ bytes: ArraySlice<UInt8>, allowNull: Bool) -> Mailbox?? {
        guard bytes.count >= 2, bytes.count <= SMTPDefaults.maxPathLength,
            bytes.first == UInt8(ascii: "<"), bytes.last == UInt8(ascii: ">")
        else { return nil }
        var inner = bytes.dropFirst().dropLast()
        if inner.isEmpty { return allowNull ? .some(nil) : nil }
        if inner.first == UInt8(ascii: "@"), let colon = inner.firstIndex(of: UInt8(ascii: ":")) {
            inner = inner[(colon + 1)...]
        }
        guard let mailbox = parseMailbox(inner) else { return nil }
        return .some(mailbox)
    }
}
