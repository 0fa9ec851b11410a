import NIOCore
import Testing

@testable import SMTPNIO

/// A v2 header: signature, version/command, family/protocol, length (the body's unless given), body.
func proxyV2(
    version: UInt8 = 2, command: UInt8 = 1, family: UInt8, transport: UInt8, body: [UInt8] = [], length: Int? = nil
) -> [UInt8] {
    let length = length ?? body.count
    return ProxyHeader.v2Signature + [version << 4 | command, family << 4 | transport, UInt8(length >> 8), UInt8(length & 0xFF)]
        + body
}

/// The v2 address block for TCP over IPv4.
func proxyV2Inet(_ source: [UInt8], _ destination: [UInt8], _ sourcePort: Int, _ destinationPort: Int) -> [UInt8] {
    source + destination + [UInt8(sourcePort >> 8), UInt8(sourcePort & 0xFF), UInt8(destinationPort >> 8), UInt8(destinationPort & 0xFF)]
}

/// The outcome of feeding `input` to the parser in pieces cut at `cuts`, re-parsing after each piece
/// as a handler does: the header and the bytes left after it, or the error.
private enum Fed: Equatable {
    case header(ProxyHeader, leftover: [UInt8])
    case needMore
    case error(ProxyHeaderError)
}

private func feed(_ input: [UInt8], cuts: [Int]) -> Fed {
    var buffer = ByteBuffer()
    var offset = 0
    for end in cuts.filter({ $0 > 0 && $0 < input.count }).sorted() + [input.count] {
        buffer.writeBytes(input[offset..<end])
        offset = end
        do {
            if let header = try ProxyHeader.parse(&buffer) {
                // The header must be found only once all its bytes are there, and then the rest of
                // the input belongs to the SMTP session.
                buffer.writeBytes(input[offset...])
                return .header(header, leftover: Array(buffer.readableBytesView))
            }
        } catch {
            return .error(error)
        }
    }
    return .needMore
}

/// Parses `input` whole, cut in two at every position, and one byte at a time; all must agree.
private func parseEverySplit(_ input: [UInt8], sourceLocation: SourceLocation = #_sourceLocation) -> Fed {
    let whole = feed(input, cuts: [])
    for cut in 1..<max(1, input.count) {
        #expect(feed(input, cuts: [cut]) == whole, "cut at \(cut)", sourceLocation: sourceLocation)
    }
    #expect(feed(input, cuts: Array(0..<input.count)) == whole, "byte by byte", sourceLocation: sourceLocation)
    return whole
}

private func parseEverySplit(_ text: String, sourceLocation: SourceLocation = #_sourceLocation) -> Fed {
    parseEverySplit(Array(text.utf8), sourceLocation: sourceLocation)
}

private let ehlo = Array("EHLO client.test\r\n".utf8)
private let longest = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"

@Suite("PROXY header: version 1")
struct ProxyHeaderV1Tests {
    @Test("TCP4: addresses and ports; what follows the CRLF is left for SMTP")
    func tcp4() {
        let header = ProxyHeader(
            version: .v1, source: .init(address: "203.0.113.7", port: 56324), destination: .init(address: "192.0.2.1", port: 25))
        #expect(parseEverySplit("PROXY TCP4 203.0.113.7 192.0.2.1 56324 25\r\nEHLO client.test\r\n") == .header(header, leftover: ehlo))
        #expect(parseEverySplit("PROXY TCP4 203.0.113.7 192.0.2.1 56324 25\r\n") == .header(header, leftover: []))
        #expect(
            parseEverySplit("PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n")
                == .header(
                    ProxyHeader(
                        version: .v1, source: .init(address: "0.0.0.0", port: 0),
                        destination: .init(address: "255.255.255.255", port: 65535)), leftover: []))
    }

    @Test("TCP6: addresses in canonical form; the longest line (104 octets) passes")
    func tcp6() {
        let header = ProxyHeader(
            version: .v1, source: .init(address: "2001:db8::7", port: 1024), destination: .init(address: "2001:db8::1", port: 25))
        #expect(parseEverySplit("PROXY TCP6 2001:DB8:0::7 2001:db8::1 1024 25\r\nEHLO client.test\r\n") == .header(header, leftover: ehlo))
        let line = "PROXY TCP6 \(longest) \(longest) 65535 65535\r\n"
        guard case .header(let parsed, let leftover) = parseEverySplit(line) else {
            Issue.record("not parsed")
            return
        }
        #expect(parsed.source == .init(address: longest, port: 65535))
        #expect(leftover.isEmpty)
        // An IPv4-mapped IPv6 address is an IPv6 address.
        guard case .header(let mapped, _) = parseEverySplit("PROXY TCP6 ::ffff:203.0.113.7 ::1 1 2\r\n") else {
            Issue.record("not parsed")
            return
        }
        #expect(mapped.source?.address == "::ffff:203.0.113.7")
    }

    @Test("UNKNOWN: no source; anything after it up to CRLF is ignored; 107 octets is the limit")
    func unknown() {
        #expect(parseEverySplit("PROXY UNKNOWN\r\nEHLO client.test\r\n") == .header(ProxyHeader(version: .v1), leftover: ehlo))
        #expect(parseEverySplit("PROXY UNKNOWN 1.2.3.4 what ever\r\n") == .header(ProxyHeader(version: .v1), leftover: []))
        let longestLine = "PROXY UNKNOWN \(longest) \(longest) 65535 65535\r\n"
        #expect(longestLine.utf8.count == 107)
        #expect(parseEverySplit(longestLine) == .header(ProxyHeader(version: .v1), leftover: []))
    }

    static let malformed: [(String, ProxyHeaderError)] = [
        ("PROXY TCP4 203.0.113.7 192.0.2.1 56324 25\n", .v1Malformed),  // bare LF
        ("PROXY TCP4 203.0.113.7 192.0.2.1 56324 25\rX", .v1Malformed),  // CR without LF
        ("PROXY TCP4  203.0.113.7 192.0.2.1 56324 25\r\n", .v1Malformed),  // two spaces
        ("PROXY TCP4 203.0.113.7 192.0.2.1 56324 25 \r\n", .v1Malformed),  // trailing space
        ("PROXY TCP4 203.0.113.7 192.0.2.1 56324\r\n", .v1Malformed),  // a field missing
        ("PROXY TCP4\t203.0.113.7 192.0.2.1 56324 25\r\n", .v1Malformed),  // tab
        ("PROXY TCP4 203.0.113.7 192.0.2.1 5632\u{0}4 25\r\n", .v1Malformed),  // NUL
        ("PROXY  \r\n", .v1Malformed),
        ("PROXY \r\n", .v1Malformed),
        ("PROXY TCP5 203.0.113.7 192.0.2.1 56324 25\r\n", .v1UnknownProtocol),
        ("PROXY tcp4 203.0.113.7 192.0.2.1 56324 25\r\n", .v1UnknownProtocol),
        ("PROXY UNKNOWNX\r\n", .v1UnknownProtocol),
        ("PROXY TCP4 203.0.113.256 192.0.2.1 56324 25\r\n", .v1BadAddress),
        ("PROXY TCP4 203.0.113 192.0.2.1 56324 25\r\n", .v1BadAddress),
        ("PROXY TCP4 203.0.113.07 192.0.2.1 56324 25\r\n", .v1BadAddress),
        ("PROXY TCP4 2001:db8::7 192.0.2.1 56324 25\r\n", .v1BadAddress),  // family mismatch
        ("PROXY TCP6 203.0.113.7 2001:db8::1 56324 25\r\n", .v1BadAddress),  // family mismatch
        ("PROXY TCP6 2001:db8::7 2001:db8::g 56324 25\r\n", .v1BadAddress),
        ("PROXY TCP4 host.example 192.0.2.1 56324 25\r\n", .v1BadAddress),
        ("PROXY TCP4 203.0.113.7 192.0.2.1 65536 25\r\n", .v1BadPort),
        ("PROXY TCP4 203.0.113.7 192.0.2.1 056324 25\r\n", .v1BadPort),
        ("PROXY TCP4 203.0.113.7 192.0.2.1 0025 25\r\n", .v1BadPort),
        ("PROXY TCP4 203.0.113.7 192.0.2.1 -1 25\r\n", .v1BadPort),
        ("PROXY TCP4 203.0.113.7 192.0.2.1 +25 25\r\n", .v1BadPort),
        ("PROXY TCP4 203.0.113.7 192.0.2.1 25 99999999999999999999\r\n", .v1BadPort),
        ("PROXY TCP4 203.0.113.7 192.0.2.1 25 x\r\n", .v1BadPort),
        ("PROXY UNKNOWN \(longest) \(longest) 65535 655350\r\n", .v1LineTooLong),  // 108 octets
        ("PROXY UNKNOWN " + String(repeating: "a", count: 200), .v1LineTooLong),  // no CRLF at all
        ("proxy TCP4 203.0.113.7 192.0.2.1 56324 25\r\n", .notAHeader),
        ("PROXYTCP4 203.0.113.7 192.0.2.1 56324 25\r\n", .notAHeader),
        ("EHLO client.test\r\n", .notAHeader),
    ]

    @Test("malformed lines are refused, whatever the pieces they arrive in", arguments: malformed)
    func refused(line: String, error: ProxyHeaderError) {
        #expect(parseEverySplit(line) == .error(error), "\(line.debugDescription)")
    }

    @Test("an incomplete line waits for more (truncated: the connection's close or timeout ends it)")
    func truncated() {
        let line = Array("PROXY TCP4 203.0.113.7 192.0.2.1 56324 25\r\n".utf8)
        for count in 0..<line.count {
            #expect(feed(Array(line.prefix(count)), cuts: []) == .needMore, "\(count) octets")
        }
    }

    @Test("a line without CRLF is refused at octet 107, not later")
    func boundedRead() {
        var buffer = ByteBuffer(string: "PROXY UNKNOWN " + String(repeating: "a", count: 92))  // 106 octets
        #expect((try? ProxyHeader.parse(&buffer)) == .some(nil))
        buffer.writeString("a")
        #expect(throws: ProxyHeaderError.v1LineTooLong) { try ProxyHeader.parse(&buffer) }
    }
}

@Suite("PROXY header: version 2")
struct ProxyHeaderV2Tests {
    static let source: [UInt8] = [203, 0, 113, 7]
    static let destination: [UInt8] = [192, 0, 2, 1]
    static let inet = proxyV2Inet(source, destination, 56324, 25)
    static let tcp4 = ProxyHeader(
        version: .v2, source: .init(address: "203.0.113.7", port: 56324), destination: .init(address: "192.0.2.1", port: 25))

    @Test("PROXY over TCP/IPv4; what follows is left for SMTP")
    func tcp4() {
        #expect(parseEverySplit(proxyV2(family: 1, transport: 1, body: Self.inet) + ehlo) == .header(Self.tcp4, leftover: ehlo))
    }

    @Test("PROXY over TCP/IPv6")
    func tcp6() {
        let source: [UInt8] = [0x20, 0x01, 0x0d, 0xb8] + Array(repeating: 0, count: 11) + [7]
        let destination: [UInt8] = [0x20, 0x01, 0x0d, 0xb8] + Array(repeating: 0, count: 11) + [1]
        let body = source + destination + [0xFF, 0xFF, 0x00, 0x19]
        #expect(
            parseEverySplit(proxyV2(family: 2, transport: 1, body: body) + ehlo)
                == .header(
                    ProxyHeader(
                        version: .v2, source: .init(address: "2001:db8::7", port: 65535),
                        destination: .init(address: "2001:db8::1", port: 25)), leftover: ehlo))
    }

    @Test("TLVs after the addresses are skipped (authority, unique id, NOOP padding, an empty one)")
    func tlvs() {
        let authority = Array("mail.example.test".utf8)
        let tlvs: [UInt8] = [0x02, 0x00, UInt8(authority.count)] + authority + [0x05, 0x00, 0x04, 1, 2, 3, 4] + [0x04, 0x00, 0x00]
        #expect(parseEverySplit(proxyV2(family: 1, transport: 1, body: Self.inet + tlvs) + ehlo) == .header(Self.tcp4, leftover: ehlo))
    }

    @Test("LOCAL: the proxy's own connection (health checks); any family, its block discarded")
    func local() {
        let local = ProxyHeader(version: .v2, isLocal: true)
        #expect(parseEverySplit(proxyV2(command: 0, family: 0, transport: 0)) == .header(local, leftover: []))
        #expect(parseEverySplit(proxyV2(command: 0, family: 0, transport: 0) + ehlo) == .header(local, leftover: ehlo))
        #expect(parseEverySplit(proxyV2(command: 0, family: 1, transport: 1, body: Self.inet)) == .header(local, leftover: []))
        // Even an AF_UNIX block: LOCAL discards it (§2.2).
        #expect(parseEverySplit(proxyV2(command: 0, family: 3, transport: 1, body: Array(repeating: 0, count: 216))) == .header(local, leftover: []))
    }

    @Test("PROXY with AF_UNSPEC: no source, the connection's own address stands")
    func unspecified() {
        #expect(parseEverySplit(proxyV2(family: 0, transport: 0) + ehlo) == .header(ProxyHeader(version: .v2), leftover: ehlo))
        #expect(parseEverySplit(proxyV2(family: 0, transport: 1, body: [0x04, 0x00, 0x01, 0])) == .header(ProxyHeader(version: .v2), leftover: []))
    }

    static let malformed: [([UInt8], ProxyHeaderError)] = [
        // The signature with one octet wrong, at its start, middle and end.
        ([0x0D, 0x0A, 0x0D, 0x0A, 0x01] + Array(ProxyHeader.v2Signature.dropFirst(5)) + [0x21, 0x11, 0x00, 0x0C] + inet, .notAHeader),
        (Array(ProxyHeader.v2Signature.dropLast()) + [0x0D, 0x21, 0x11, 0x00, 0x0C] + inet, .notAHeader),
        ([0x0D, 0x0D] + Array(ProxyHeader.v2Signature.dropFirst(2)) + [0x21, 0x11, 0x00, 0x0C] + inet, .notAHeader),
        (Array("\r\n\r\nEHLO client.test\r\n".utf8), .notAHeader),
        (proxyV2(version: 1, family: 1, transport: 1, body: inet), .v2UnsupportedVersion),
        (proxyV2(version: 3, family: 1, transport: 1, body: inet), .v2UnsupportedVersion),
        (proxyV2(version: 0, family: 1, transport: 1, body: inet), .v2UnsupportedVersion),
        (proxyV2(command: 2, family: 1, transport: 1, body: inet), .v2UnknownCommand),
        (proxyV2(command: 0xF, family: 1, transport: 1, body: inet), .v2UnknownCommand),
        (proxyV2(family: 3, transport: 1, body: Array(repeating: 0, count: 216)), .v2UnsupportedAddressFamily),  // AF_UNIX
        (proxyV2(family: 1, transport: 2, body: inet), .v2UnsupportedAddressFamily),  // DGRAM
        (proxyV2(family: 1, transport: 0, body: inet), .v2UnsupportedAddressFamily),  // INET, UNSPEC protocol
        (proxyV2(family: 4, transport: 1, body: inet), .v2UnsupportedAddressFamily),
        (proxyV2(family: 1, transport: 3, body: inet), .v2UnsupportedAddressFamily),
        (proxyV2(command: 0, family: 4, transport: 1, body: inet), .v2UnsupportedAddressFamily),  // undefined even for LOCAL
        (proxyV2(family: 1, transport: 1, body: Array(inet.prefix(11))), .v2AddressBlockTooShort),
        (proxyV2(family: 2, transport: 1, body: inet), .v2AddressBlockTooShort),  // 12 octets for IPv6
        (proxyV2(family: 1, transport: 1, body: inet + [0x02, 0x00, 0x05, 0x61]), .v2MalformedTLV),  // value cut short
        (proxyV2(family: 1, transport: 1, body: inet + [0x02, 0x00]), .v2MalformedTLV),  // header cut short
        // Length overflow: refused as soon as the 16-octet prefix is read, without waiting for the body.
        (proxyV2(family: 1, transport: 1, length: ProxyHeader.maximumV2Length + 1), .v2LengthTooLarge),
        (proxyV2(family: 1, transport: 1, length: 0xFFFF), .v2LengthTooLarge),
    ]

    @Test("malformed headers are refused, whatever the pieces they arrive in", arguments: malformed)
    func refused(bytes: [UInt8], error: ProxyHeaderError) {
        #expect(parseEverySplit(bytes) == .error(error))
    }

    @Test("an incomplete header waits for more; the longest allowed one is read")
    func truncatedAndLongest() {
        let full = proxyV2(family: 1, transport: 1, body: Self.inet + [0x04, 0x00, 0x02, 0, 0])
        for count in 0..<full.count {
            #expect(feed(Array(full.prefix(count)), cuts: []) == .needMore, "\(count) octets")
        }
        let padding = ProxyHeader.maximumV2Length - Self.inet.count - 3
        let longest = proxyV2(family: 1, transport: 1, body: Self.inet + [0x04, UInt8(padding >> 8), UInt8(padding & 0xFF)] + Array(repeating: 0, count: padding))
        #expect(feed(longest + ehlo, cuts: [1, 16, 100]) == .header(Self.tcp4, leftover: ehlo))
    }
}

@Suite("PROXY header: detection on connections that may not send one")
struct ProxyHeaderDetectionTests {
    static let cases: [([UInt8], ProxyHeader.Detection)] = [
        ([], .undecided),
        (Array("P".utf8), .undecided),
        (Array("PROXY".utf8), .undecided),
        (Array("PROXY ".utf8), .header),
        (Array("PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".utf8), .header),
        (Array("PROXY UNKNOWN\r\n".utf8), .header),
        (Array(ProxyHeader.v2Signature.prefix(2)), .undecided),
        (Array(ProxyHeader.v2Signature.prefix(11)), .undecided),
        (ProxyHeader.v2Signature, .header),
        (proxyV2(command: 0, family: 0, transport: 0), .header),
        (Array("EHLO client.test\r\n".utf8), .notHeader),
        (Array("PROXYX".utf8), .notHeader),
        (Array("proxy ".utf8), .notHeader),
        (Array("\r\nEHLO client.test\r\n".utf8), .notHeader),
        (Array("Q".utf8), .notHeader),
    ]

    @Test("PROXY or the v2 signature at the start is a header; a prefix of either is undecided", arguments: cases)
    func detect(bytes: [UInt8], expected: ProxyHeader.Detection) {
        #expect(ProxyHeader.detect(ByteBuffer(bytes: bytes)) == expected)
    }
}
