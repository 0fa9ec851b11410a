import NIOCore

// The client side of SMTP (RFC 5321 §3, §4), pure: reading the server's replies, its EHLO
// capabilities, building commands, dot-stuffing, and planning one transaction from what the
// server offers. No I/O; `SMTPNIO.SMTPClientConnection` runs it on a channel.

/// Why a server's reply cannot be read (RFC 5321 §4.2): the connection is unusable after it.
public struct SMTPReplyError: Error, Sendable, Hashable, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// Reads replies line by line (RFC 5321 §4.2.1): `code-text` for every line but the last,
/// `code text` (or `code` alone) for the last; every line of one reply carries the same code.
/// The enhanced status code (RFC 2034) is taken from the first line when its class matches the
/// reply's, and removed from the text of every line that carries it.
public struct SMTPReplyParser: Sendable {
    /// RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; real servers exceed it a little.
    public static let maxLineLength = 2048
    /// A bound on one reply's lines (an EHLO reply has one per extension).
    public static let maxLines = 200

    private var code: Int?
    private var lines: [String] = []

    public init() {}

    /// True while a multiline reply has started and not ended.
    public var isInsideReply: Bool { code != nil }

    /// Feeds one line without its line end. Returns the reply once its last line came.
    public mutating func feed(line: String) throws(SMTPReplyError) -> SMTPReply? {
        let bytes = Array(line.utf8)
        guard bytes.count <= Self.maxLineLength else { throw SMTPReplyError("reply line longer than \(Self.maxLineLength) octets") }
        guard bytes.count >= 3, bytes[0...2].allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }),
            let code = Int(String(decoding: bytes[0...2], as: UTF8.self)), (200...599).contains(code)
        else {
            throw SMTPReplyError("malformed reply line: \(Self.printable(line))")
        }
        let separator: UInt8? = bytes.count > 3 ? bytes[3] : nil
        guard separator == nil || separator == UInt8(ascii: " ") || separator == UInt8(ascii: "-") else {
            throw SMTPReplyError("malformed reply line: \(Self.printable(line))")
        }
        if let expected = self.code, expected != code {
            throw SMTPReplyError("reply code changed from \(expected) to \(code) inside a multiline reply")
        }
        self.code = code
        lines.append(bytes.count > 4 ? String(decoding: bytes[4...], as: UTF8.self) : "")
        guard lines.count <= Self.maxLines else { throw SMTPReplyError("reply of more than \(Self.maxLines) lines") }
        guard separator != UInt8(ascii: "-") else { return nil }
        defer {
            self.code = nil
            self.lines = []
        }
        return Self.reply(code: code, lines: lines)
    }

    /// Splits off the enhanced status code when the first line starts with one of the reply's class.
    static func reply(code: Int, lines: [String]) -> SMTPReply {
        guard let enhanced = EnhancedStatusCode(prefixOf: lines[0]), Int(enhanced.klass) == code / 100 else {
            return SMTPReply(code, nil, lines)
        }
        let prefix = enhanced.description
        let texts = lines.map { line -> String in
            guard line.hasPrefix(prefix) else { return line }
            return String(line.dropFirst(prefix.count).drop(while: { $0 == " " }))
        }
        return SMTPReply(code, enhanced, texts)
    }

    static func printable(_ text: String) -> String {
        String(text.prefix(80).map { $0.isASCII && ($0.asciiValue ?? 0) >= 0x20 ? $0 : "?" })
    }
}

extension EnhancedStatusCode {
    /// Parses `class.subject.detail` (RFC 3463 §2: class 2, 4 or 5, subject and detail of 1-3
    /// digits) at the start of `text`, followed by a space or the end.
    public init?(prefixOf text: String) {
        let head = text.prefix(while: { $0 != " " })
        self.init(String(head))
    }

    /// Parses exactly `class.subject.detail`.
    public init?(_ text: String) {
        let parts = text.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, parts.allSatisfy({ (1...3).contains($0.count) && $0.allSatisfy(\.isASCIIDigit) }),
            let klass = UInt8(parts[0]), [2, 4, 5].contains(klass), let subject = UInt16(parts[1]),
            let detail = UInt16(parts[2])
        else { return nil }
        self.init(klass, subject, detail)
    }
}

extension SMTPReply {
    /// One line for logs, the queue's `last_error` and a DSN's `Diagnostic-Code` after `smtp; `:
    /// `550 5.1.1 no such user` (the lines of a multiline reply joined by spaces).
    public var summary: String {
        let text = lines.filter { !$0.isEmpty }.joined(separator: " ")
        let head = enhancedCode.map { "\(code) \($0)" } ?? "\(code)"
        return text.isEmpty ? head : "\(head) \(SMTPReplyParser.printable(text, limit: 400))"
    }

    /// The RFC 3463 status this reply stands for: its own enhanced code, else `X.0.0` of its class.
    public var status: EnhancedStatusCode {
        enhancedCode ?? EnhancedStatusCode(UInt8(code / 100), 0, 0)
    }
}

extension SMTPReplyParser {
    static func printable(_ text: String, limit: Int) -> String {
        String(text.prefix(limit).map { ($0.asciiValue.map { $0 < 0x20 || $0 == 0x7F } ?? false) ? "?" : $0 })
    }
}

/// The extensions a server listed in its EHLO reply (RFC 5321 §4.1.1.1: one keyword and its
/// parameters per line after the first).
public struct SMTPCapabilities: Sendable, Hashable {
    /// Keyword (upper case) → its parameters.
    public var extensions: [String: [String]]

    public init(extensions: [String: [String]] = [:]) {
        self.extensions = extensions
    }

    /// From an EHLO reply; the first line (the server's name and greeting) is skipped.
    public init(ehloReply reply: SMTPReply) {
        var extensions: [String: [String]] = [:]
        for line in reply.lines.dropFirst() {
            let words = line.split(separator: " ").map(String.init)
            guard let keyword = words.first?.uppercased(), !keyword.isEmpty else { continue }
            extensions[keyword] = Array(words.dropFirst())
        }
        self.extensions = extensions
    }

    public func offers(_ keyword: String) -> Bool { extensions[keyword.uppercased()] != nil }

    /// RFC 2920.
    public var pipelining: Bool { offers("PIPELINING") }
    /// RFC 3207.
    public var startTLS: Bool { offers("STARTTLS") }
    /// RFC 6531.
    public var smtputf8: Bool { offers("SMTPUTF8") }
    /// RFC 6152.
    public var eightBitMIME: Bool { offers("8BITMIME") }
    /// RFC 3030.
    public var chunking: Bool { offers("CHUNKING") }
    /// RFC 3030 §3.
    public var binaryMIME: Bool { offers("BINARYMIME") }
    /// RFC 1870: whether SIZE is offered, and its limit (nil or 0: no fixed limit).
    public var size: (offered: Bool, limit: Int?) {
        guard let parameters = extensions["SIZE"] else { return (false, nil) }
        return (true, parameters.first.flatMap { Int($0) }.flatMap { $0 > 0 ? $0 : nil })
    }
}

/// A command the client sends. Values are checked before they reach the wire: no CR, LF or
/// NUL can get in (the command-injection defence); `write(into:)` adds the CRLF.
public enum SMTPClientCommand: Sendable, Hashable {
    case ehlo(String)
    case helo(String)
    case startTLS
    /// `MAIL FROM:<path> parameters` (an empty path is the null sender `<>`).
    case mail(from: String, parameters: [String])
    case rcpt(to: String)
    case data
    /// `BDAT size [LAST]` (RFC 3030); the chunk's octets follow the command line.
    case bdat(size: Int, last: Bool)
    case rset
    case noop
    case quit

    /// The command line without CRLF.
    public var line: String {
        switch self {
        case .ehlo(let name): "EHLO \(name)"
        case .helo(let name): "HELO \(name)"
        case .startTLS: "STARTTLS"
        case .mail(let from, let parameters): (["MAIL FROM:<\(from)>"] + parameters).joined(separator: " ")
        case .rcpt(let to): "RCPT TO:<\(to)>"
        case .data: "DATA"
        case .bdat(let size, let last): last ? "BDAT \(size) LAST" : "BDAT \(size)"
        case .rset: "RSET"
        case .noop: "NOOP"
        case .quit: "QUIT"
        }
    }

    /// Throws when a value holds a character that would end or break the command line, or the
    /// line is longer than RFC 5321 §4.5.3.1.4 allows.
    public func validate() throws(SMTPReplyError) {
        let line = self.line
        guard !line.utf8.contains(where: { $0 == 0x0D || $0 == 0x0A || $0 == 0 }) else {
            throw SMTPReplyError("refusing to send a command with CR, LF or NUL in it")
        }
        guard line.utf8.count + 2 <= SMTPDefaults.maxCommandLineLength else {
            throw SMTPReplyError("command line longer than \(SMTPDefaults.maxCommandLineLength) octets")
        }
    }

    /// Appends the command and CRLF (after `validate()`).
    public func write(into buffer: inout ByteBuffer) {
        buffer.writeString(line)
        buffer.writeStaticString("\r\n")
    }
}

/// RFC 5321 §4.5.2 transparency for DATA.
public enum DotStuffing {
    /// `content` as DATA sends it: a "." doubled at the start of every line, CRLF added when the
    /// content does not end with one, then the terminating `.` CRLF.
    public static func encode(_ content: ByteBuffer) -> ByteBuffer {
        var output = ByteBufferAllocator().buffer(capacity: content.readableBytes + content.readableBytes / 64 + 8)
        var atLineStart = true
        var previous: UInt8 = 0
        content.withUnsafeReadableBytes { bytes in
            var runStart = 0
            for index in 0..<bytes.count {
                let byte = bytes[index]
                if atLineStart && byte == UInt8(ascii: ".") {
                    output.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[runStart..<index]))
                    output.writeInteger(UInt8(ascii: "."))
                    runStart = index
                }
                atLineStart = byte == 0x0A && previous == 0x0D
                previous = byte
            }
            output.writeBytes(UnsafeRawBufferPointer(rebasing: bytes[runStart..<bytes.count]))
        }
        if content.readableBytes > 0 && !atLineStart { output.writeStaticString("\r\n") }
        output.writeStaticString(".\r\n")
        return output
    }
}

/// What one message needs from the server, and what the server offers: the plan for one
/// transaction, or why it cannot be sent there at all.
public struct SMTPTransactionPlan: Sendable, Hashable {
    /// The MAIL FROM parameters to send.
    public var mailParameters: [String]
    /// MAIL, every RCPT and DATA in one flush (RFC 2920).
    public var pipelining: Bool
    /// BDAT instead of DATA (RFC 3030).
    public var chunking: Bool

    public init(mailParameters: [String], pipelining: Bool, chunking: Bool) {
        self.mailParameters = mailParameters
        self.pipelining = pipelining
        self.chunking = chunking
    }

    /// A reason the server cannot take the message, permanent for this server (`reply` is the
    /// local equivalent of what the server would answer).
    public struct Refusal: Error, Sendable, Hashable, CustomStringConvertible {
        public var status: EnhancedStatusCode
        public var description: String
    }

    /// `size`: octets to be sent; `smtputf8`: the envelope or headers need RFC 6531; `body`:
    /// `7BIT`, `8BITMIME`, `BINARYMIME` or nil. `capabilities` nil means the server took HELO only.
    public static func make(
        capabilities: SMTPCapabilities?, size: Int, smtputf8: Bool, body: String?
    ) -> Result<SMTPTransactionPlan, Refusal> {
        let offered = capabilities ?? SMTPCapabilities()
        var parameters: [String] = []
        let (sizeOffered, limit) = offered.size
        if let limit, size > limit {
            return .failure(Refusal(status: .init(5, 3, 4), description: "message of \(size) octets exceeds the server's limit of \(limit)"))
        }
        if sizeOffered { parameters.append("SIZE=\(size)") }
        switch body?.uppercased() {
        case "8BITMIME":
            // RFC 6152 §3 would have the message downgraded; like most MTAs we send it as it is.
            if offered.eightBitMIME { parameters.append("BODY=8BITMIME") }
        case "BINARYMIME":
            guard offered.binaryMIME && offered.chunking else {
                return .failure(Refusal(status: .init(5, 6, 3), description: "the server does not accept BINARYMIME"))
            }
            parameters.append("BODY=BINARYMIME")
        default:
            break
        }
        if smtputf8 {
            guard offered.smtputf8 else {
                return .failure(Refusal(status: .init(5, 6, 7), description: "the server does not support SMTPUTF8 (RFC 6531), which the message needs"))
            }
            parameters.append("SMTPUTF8")
        }
        return .success(SMTPTransactionPlan(mailParameters: parameters, pipelining: offered.pipelining, chunking: offered.chunking))
    }
}
