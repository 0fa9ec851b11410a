import NIOCore

/// RFC 6152 / RFC 3030 `BODY=` values.
public enum BodyType: String, Sendable, Hashable {
    case sevenBit = "7BIT"
    case eightBitMIME = "8BITMIME"
}

/// RFC 2852 `BY=<by-time>;<by-mode>[T]`.
public struct DeliverBy: Sendable, Hashable {
    public enum Mode: String, Sendable, Hashable {
        /// `R`: return the message (DSN) if it cannot be delivered in time.
        case returnMessage = "R"
        /// `N`: notify (delayed DSN) but keep trying.
        case notify = "N"
    }

    public var seconds: Int
    public var mode: Mode
    public var trace: Bool

    public init(seconds: Int, mode: Mode, trace: Bool = false) {
        self.seconds = seconds
        self.mode = mode
        self.trace = trace
    }

    /// Parses the value of the `BY` parameter: `by-time ";" by-mode [ "T" ]`, by-time a signed decimal.
    public init?(parameterValue value: String) {
        let parts = value.split(separator: ";", omittingEmptySubsequences: false)
        guard parts.count == 2 else { return nil }
        let time = parts[0]
        let digits = time.first == "-" || time.first == "+" ? time.dropFirst() : time[...]
        guard !digits.isEmpty, digits.count <= 9, digits.allSatisfy(\.isASCIIDigit), let seconds = Int(time) else { return nil }
        var modeText = parts[1].uppercased()
        var trace = false
        if modeText.count == 2, modeText.hasSuffix("T") {
            trace = true
            modeText.removeLast()
        }
        guard let mode = Mode(rawValue: modeText) else { return nil }
        self.init(seconds: seconds, mode: mode, trace: trace)
    }

    public var parameterValue: String { "\(seconds);\(mode.rawValue)\(trace ? "T" : "")" }
}

/// What MAIL FROM asked for, once its parameters are understood.
public struct MailParameters: Sendable, Hashable {
    /// RFC 1870 `SIZE=`.
    public var declaredSize: Int?
    /// RFC 6152 `BODY=`.
    public var body: BodyType?
    /// RFC 6531 `SMTPUTF8`.
    public var smtputf8: Bool
    /// RFC 2852 `BY=`.
    public var deliverBy: DeliverBy?

    public init(declaredSize: Int? = nil, body: BodyType? = nil, smtputf8: Bool = false, deliverBy: DeliverBy? = nil) {
        self.declaredSize = declaredSize
        self.body = body
        self.smtputf8 = smtputf8
        self.deliverBy = deliverBy
    }
}

/// Everything known about one accepted message besides its content.
public struct Envelope: Sendable, Hashable {
    public var reversePath: ReversePath
    public var recipients: [ForwardPath]
    public var parameters: MailParameters
    /// The HELO/EHLO argument.
    public var heloName: String
    public var usedEHLO: Bool
    /// The login of the authenticated client, if any.
    public var authenticatedUser: String?
    public var tlsActive: Bool
    /// True when the content came by BDAT.
    public var chunked: Bool

    public init(
        reversePath: ReversePath, recipients: [ForwardPath], parameters: MailParameters, heloName: String,
        usedEHLO: Bool, authenticatedUser: String?, tlsActive: Bool, chunked: Bool
    ) {
        self.reversePath = reversePath
        self.recipients = recipients
        self.parameters = parameters
        self.heloName = heloName
        self.usedEHLO = usedEHLO
        self.authenticatedUser = authenticatedUser
        self.tlsActive = tlsActive
        self.chunked = chunked
    }
}

/// The content of a DATA section as the framing layer delivers it: dot-unstuffed, and with
/// what it found wrong while reading it. Anything wrong refuses the whole message.
public struct DataSection: Sendable {
    public var content: ByteBuffer
    /// More octets than the size limit arrived (the excess was read and dropped).
    public var exceededSize: Bool
    /// A CR or LF that was not part of a CRLF pair (RFC 5321 §2.3.8; SMTP smuggling).
    public var hadBareCROrLF: Bool
    /// A text line longer than 1000 octets including CRLF (RFC 5321 §4.5.3.1.6).
    public var hadLongLine: Bool

    public init(content: ByteBuffer, exceededSize: Bool = false, hadBareCROrLF: Bool = false, hadLongLine: Bool = false) {
        self.content = content
        self.exceededSize = exceededSize
        self.hadBareCROrLF = hadBareCROrLF
        self.hadLongLine = hadLongLine
    }
}
