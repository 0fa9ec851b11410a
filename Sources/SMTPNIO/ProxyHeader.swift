#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore

/// A PROXY protocol header, version 1 (text) or 2 (binary), as a load balancer sends it at the
/// start of a connection to name the client it relays (haproxy's "The PROXY protocol",
/// doc/proxy-protocol.txt, §2.1 and §2.2).
///
/// Pure parsing, no channel: `parse(_:)` is fed whatever bytes have arrived and says "need more",
/// "here is the header" (consuming exactly its bytes) or "this cannot be a valid header" as soon
/// as the bytes so far prove it. Every limit is fixed: a v1 line is at most 107 octets, a v2
/// header at most `maximumV2Length` octets after its 16-octet prefix.
public struct ProxyHeader: Sendable, Hashable {
    public enum Version: Sendable, Hashable {
        case v1
        case v2
    }

    /// One end of the relayed connection: a textual address (canonical `inet_ntop` form) and a port.
    public struct Endpoint: Sendable, Hashable, CustomStringConvertible {
        public var address: String
        public var port: Int

        public init(address: String, port: Int) {
            self.address = address
            self.port = port
        }

        public var description: String { address.contains(":") ? "[\(address)]:\(port)" : "\(address):\(port)" }
    }

    public var version: Version
    /// A v2 LOCAL header (§2.2): the proxy's own connection, e.g. a health check, not a relayed one.
    public var isLocal: Bool
    /// The client the proxy relays. nil when the header names none — v1 `UNKNOWN`, v2 LOCAL, v2
    /// PROXY with AF_UNSPEC: then the connection's own peer address stands (§2.1, §2.2).
    public var source: Endpoint?
    /// The address the client connected to on the proxy; nil when `source` is nil.
    public var destination: Endpoint?

    public init(version: Version, isLocal: Bool = false, source: Endpoint? = nil, destination: Endpoint? = nil) {
        self.version = version
        self.isLocal = isLocal
        self.source = source
        self.destination = destination
    }

    // MARK: Limits and signatures

    /// §2.1: "a receiver … must not try to read more than 107 characters": the worst case is
    /// `PROXY TCP6 ffff:…:ffff ffff:…:ffff 65535 65535\r\n`.
    public static let maximumV1Length = 107
    /// A bound of ours on the v2 length field (addresses plus TLVs). The spec allows up to 65535;
    /// the largest address block is 216 octets (AF_UNIX) and the TLVs that proxies add (authority,
    /// unique id, SSL facts, AWS/Azure/GCP ids, padding) stay far below this.
    public static let maximumV2Length = 2048
    /// §2.1: the v1 header starts with these six octets.
    public static let v1Prefix: [UInt8] = Array("PROXY ".utf8)
    /// §2.2: the v2 header starts with these twelve octets.
    public static let v2Signature: [UInt8] = [0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A]

    // MARK: Parsing

    /// Parses a header at the start of `buffer`'s readable bytes. Returns nil when those bytes are
    /// a proper prefix of a valid header (read more); on success the header's bytes are consumed
    /// and whatever follows stays readable. Throws as soon as the bytes cannot begin a valid header.
    public static func parse(_ buffer: inout ByteBuffer) throws(ProxyHeaderError) -> ProxyHeader? {
        let view = buffer.readableBytesView
        guard let first = view.first else { return nil }
        let result: (header: ProxyHeader, length: Int)?
        if first == v1Prefix[0] {
            result = try parseV1(Array(view.prefix(maximumV1Length)))
        } else if first == v2Signature[0] {
            result = try parseV2(Array(view.prefix(16 + maximumV2Length)))
        } else {
            throw .notAHeader
        }
        guard let result else { return nil }
        buffer.moveReaderIndex(forwardBy: result.length)
        return result.header
    }

    /// Whether a stream that should *not* carry a header starts with one (for peers that are not
    /// trusted proxies): `.header` once its bytes begin with `PROXY ` or the v2 signature,
    /// `.notHeader` as soon as they cannot, `.undecided` while they are a proper prefix of either.
    public static func detect(_ buffer: ByteBuffer) -> Detection {
        let view = buffer.readableBytesView
        var undecided = false
        for signature in [v1Prefix, v2Signature] {
            let count = min(view.count, signature.count)
            guard view.prefix(count).elementsEqual(signature.prefix(count)) else { continue }
            if count == signature.count { return .header }
            undecided = true
        }
        return undecided ? .undecided : .notHeader
    }

    public enum Detection: Sendable, Hashable {
        case header
        case notHeader
        case undecided
    }

    // MARK: Version 1 (§2.1)

    private static let space = UInt8(ascii: " ")
    private static let cr = UInt8(ascii: "\r")
    private static let lf = UInt8(ascii: "\n")

    /// `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`, `PROXY TCP6 …`, `PROXY UNKNOWN[ <anything>]\r\n`;
    /// single spaces, no other whitespace, CRLF within 107 octets.
    private static func parseV1(_ bytes: [UInt8]) throws(ProxyHeaderError) -> (ProxyHeader, Int)? {
        let prefixCount = min(bytes.count, v1Prefix.count)
        guard bytes.prefix(prefixCount).elementsEqual(v1Prefix.prefix(prefixCount)) else { throw .notAHeader }
        // The line ends at the first CR, which must be followed by LF; a bare LF or a control
        // character before it is malformed.
        guard let end = bytes.firstIndex(where: { $0 == cr || $0 == lf }) else {
            if bytes.count >= maximumV1Length { throw .v1LineTooLong }
            if bytes.contains(where: { $0 < 0x20 || $0 > 0x7E }) { throw .v1Malformed }
            return nil
        }
        guard bytes[end] == cr else { throw .v1Malformed }
        guard end + 1 < bytes.count else {
            if end + 1 >= maximumV1Length { throw .v1LineTooLong }
            return nil
        }
        guard bytes[end + 1] == lf else { throw .v1Malformed }
        let line = bytes[..<end]
        guard line.allSatisfy({ $0 >= 0x20 && $0 <= 0x7E }) else { throw .v1Malformed }
        let fields = line.split(separator: space, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        let length = end + 2
        guard fields.count >= 2, fields[0] == "PROXY" else { throw .v1Malformed }
        switch fields[1] {
        case "UNKNOWN":
            // §2.1: whatever follows UNKNOWN up to CRLF is ignored.
            return (ProxyHeader(version: .v1), length)
        case "TCP4", "TCP6":
            guard fields.count == 6, !fields.contains(where: \.isEmpty) else { throw .v1Malformed }
            let family = fields[1] == "TCP4" ? AF_INET : AF_INET6
            guard let source = canonicalAddress(fields[2], family: family),
                let destination = canonicalAddress(fields[3], family: family)
            else { throw .v1BadAddress }
            guard let sourcePort = port(fields[4]), let destinationPort = port(fields[5]) else { throw .v1BadPort }
            return (
                ProxyHeader(
                    version: .v1, source: Endpoint(address: source, port: sourcePort),
                    destination: Endpoint(address: destination, port: destinationPort)),
                length
            )
        case "":
            throw .v1Malformed
        default:
            throw .v1UnknownProtocol
        }
    }

    /// A decimal port 0…65535 without sign or leading zeros.
    private static func port(_ text: String) -> Int? {
        let digits = Array(text.utf8)
        guard (1...5).contains(digits.count), digits.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
            digits.count == 1 || digits[0] != UInt8(ascii: "0"), let value = Int(text), value <= 65535
        else { return nil }
        return value
    }

    /// The canonical text of `text` when it is an address of `family`, else nil (so `TCP4` with an
    /// IPv6 address, or `TCP6` with a dotted quad, is refused).
    private static func canonicalAddress(_ text: String, family: Int32) -> String? {
        if family == AF_INET {
            var address = in_addr()
            guard inet_pton(AF_INET, text, &address) == 1 else { return nil }
            return withUnsafeBytes(of: &address) { addressText(Array($0)) }
        }
        var address = in6_addr()
        guard inet_pton(AF_INET6, text, &address) == 1 else { return nil }
        return withUnsafeBytes(of: &address) { addressText(Array($0)) }
    }

    /// `inet_ntop` of 4 or 16 network-order octets.
    static func addressText(_ bytes: [UInt8]) -> String {
        var text = [CChar](repeating: 0, count: 64)
        let family = bytes.count == 4 ? AF_INET : AF_INET6
        _ = bytes.withUnsafeBytes { inet_ntop(family, $0.baseAddress, &text, socklen_t(text.count)) }
        return String(decoding: text.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    // MARK: Version 2 (§2.2)

    /// The 16-octet prefix (signature, version and command, family and protocol, length), then
    /// `length` octets: the address block for the family, then TLVs (checked for shape, skipped).
    private static func parseV2(_ bytes: [UInt8]) throws(ProxyHeaderError) -> (ProxyHeader, Int)? {
        let signatureCount = min(bytes.count, v2Signature.count)
        guard bytes.prefix(signatureCount).elementsEqual(v2Signature.prefix(signatureCount)) else { throw .notAHeader }
        guard bytes.count > 12 else { return nil }
        guard bytes[12] >> 4 == 2 else { throw .v2UnsupportedVersion }
        let command = bytes[12] & 0x0F
        guard command <= 1 else { throw .v2UnknownCommand }
        guard bytes.count > 13 else { return nil }
        let family = bytes[13] >> 4
        let transport = bytes[13] & 0x0F
        // §2.2: families 0 (UNSPEC), 1 (INET), 2 (INET6), 3 (UNIX); protocols 0 (UNSPEC),
        // 1 (STREAM), 2 (DGRAM). Anything else is not a v2 header.
        guard family <= 3, transport <= 2 else { throw .v2UnsupportedAddressFamily }
        let addressLength: Int
        switch (command, family, transport) {
        case (0, _, _), (_, 0, _): addressLength = 0
        case (_, 1, 1): addressLength = 12
        case (_, 2, 1): addressLength = 36
        default:
            // PROXY over AF_UNIX, over DGRAM, or INET/INET6 without STREAM: not a TCP client we can name.
            throw .v2UnsupportedAddressFamily
        }
        guard bytes.count >= 16 else { return nil }
        let length = Int(bytes[14]) << 8 | Int(bytes[15])
        guard length <= maximumV2Length else { throw .v2LengthTooLarge }
        guard length >= addressLength else { throw .v2AddressBlockTooShort }
        guard bytes.count >= 16 + length else { return nil }
        let block = Array(bytes[16..<(16 + length)])
        let total = 16 + length

        // LOCAL (§2.2): "the receiver must accept this connection as valid and must use the real
        // connection endpoints and discard the protocol block including the family".
        if command == 0 { return (ProxyHeader(version: .v2, isLocal: true), total) }

        // PROXY with AF_UNSPEC: the proxy does not know the source; the real endpoints stand.
        if addressLength == 0 {
            try checkTLVs(block[...])
            return (ProxyHeader(version: .v2), total)
        }
        try checkTLVs(block[addressLength...])
        let size = addressLength == 12 ? 4 : 16
        let source = addressText(Array(block[0..<size]))
        let destination = addressText(Array(block[size..<(2 * size)]))
        let sourcePort = Int(block[2 * size]) << 8 | Int(block[2 * size + 1])
        let destinationPort = Int(block[2 * size + 2]) << 8 | Int(block[2 * size + 3])
        return (
            ProxyHeader(
                version: .v2, source: Endpoint(address: source, port: sourcePort),
                destination: Endpoint(address: destination, port: destinationPort)),
            total
        )
    }

    /// §2.2.x: after the addresses, type (1 octet), length (2 octets), value — back to back up to
    /// the end of the block. Their contents are not used.
    private static func checkTLVs(_ tlvs: ArraySlice<UInt8>) throws(ProxyHeaderError) {
        var index = tlvs.startIndex
        while index < tlvs.endIndex {
            guard tlvs.endIndex - index >= 3 else { throw .v2MalformedTLV }
            let valueLength = Int(tlvs[index + 1]) << 8 | Int(tlvs[index + 2])
            index += 3 + valueLength
            guard index <= tlvs.endIndex else { throw .v2MalformedTLV }
        }
    }
}

/// Why bytes at the start of a connection are not a valid PROXY header. The description names the
/// rule broken, never the bytes.
public enum ProxyHeaderError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Starts with neither `PROXY ` nor the v2 signature.
    case notAHeader
    /// No CRLF within 107 octets.
    case v1LineTooLong
    /// Not `PROXY <protocol> …` with single spaces, printable ASCII and CRLF.
    case v1Malformed
    /// Neither TCP4, TCP6 nor UNKNOWN.
    case v1UnknownProtocol
    /// An address that is not of the announced family.
    case v1BadAddress
    /// A port that is not a decimal 0…65535 without leading zeros.
    case v1BadPort
    /// A version nibble other than 2.
    case v2UnsupportedVersion
    /// A command other than LOCAL (0) or PROXY (1).
    case v2UnknownCommand
    /// PROXY over AF_UNIX, over DGRAM, or family/protocol values the spec does not define.
    case v2UnsupportedAddressFamily
    /// A length field above `ProxyHeader.maximumV2Length`.
    case v2LengthTooLarge
    /// A length too short for the addresses of the announced family.
    case v2AddressBlockTooShort
    /// TLVs that do not end exactly at the end of the header.
    case v2MalformedTLV

    public var description: String {
        switch self {
        case .notAHeader: "not a PROXY protocol header"
        case .v1LineTooLong: "PROXY v1 line longer than 107 octets"
        case .v1Malformed: "malformed PROXY v1 line"
        case .v1UnknownProtocol: "PROXY v1 protocol is not TCP4, TCP6 or UNKNOWN"
        case .v1BadAddress: "PROXY v1 address invalid or not of the announced family"
        case .v1BadPort: "PROXY v1 port invalid"
        case .v2UnsupportedVersion: "PROXY v2 header with a version other than 2"
        case .v2UnknownCommand: "PROXY v2 command is neither LOCAL nor PROXY"
        case .v2UnsupportedAddressFamily: "PROXY v2 address family or protocol not supported"
        case .v2LengthTooLarge: "PROXY v2 header longer than \(ProxyHeader.maximumV2Length) octets"
        case .v2AddressBlockTooShort: "PROXY v2 address block too short for its family"
        case .v2MalformedTLV: "PROXY v2 TLVs malformed"
        }
    }
}
