import NIOCore
import SMTPProtocol

/// Facts about the connection, for policy decisions, logs and trace headers.
public struct SMTPSessionInfo: Sendable {
    /// The client's address (after a trusted PROXY header, the real client).
    public var clientAddress: String
    public var clientPort: Int
    /// Negotiated TLS, e.g. "TLSv1.3", once STARTTLS completed.
    public var tlsVersion: String?
    /// Negotiated cipher suite, e.g. "TLS_AES_256_GCM_SHA384", once STARTTLS completed.
    public var tlsCipher: String?
    public var tlsActive: Bool

    public init(
        clientAddress: String, clientPort: Int, tlsVersion: String? = nil, tlsCipher: String? = nil, tlsActive: Bool = false
    ) {
        self.clientAddress = clientAddress
        self.clientPort = clientPort
        self.tlsVersion = tlsVersion
        self.tlsCipher = tlsCipher
        self.tlsActive = tlsActive
    }
}

/// How a message hand-off ended.
public enum SMTPDeliveryOutcome: Sendable {
    /// Durably queued under this id: the server may now say 250.
    case queued(String)
    /// Not queued; the reply says why (4yz: try later; 5yz: don't).
    case rejected(SMTPReply)
}

/// One message whose content arrived (the end of DATA, BDAT LAST, or a BDAT chunk refused), told
/// to the delegate as its final reply goes out: for counting, never for policy.
public struct SMTPMessageReceipt: Sendable, Equatable {
    /// The content's octets, when it arrived whole and went to `deliver`; nil when the server
    /// refused it itself (over SIZE, a bare CR or LF, a line too long, a BDAT chunk refused),
    /// having dropped what it did not keep.
    public var sizeBytes: Int?
    /// The final reply was 250: the message is queued.
    public var accepted: Bool
    /// From the end of the content to the final reply.
    public var processing: Duration

    public init(sizeBytes: Int?, accepted: Bool, processing: Duration) {
        self.sizeBytes = sizeBytes
        self.accepted = accepted
        self.processing = processing
    }
}

/// Thrown by a delegate to answer with `reply` instead of the generic one (e.g. an AUTH lockout).
public struct SMTPRefusal: Error, Sendable {
    public var reply: SMTPReply

    public init(_ reply: SMTPReply) {
        self.reply = reply
    }
}

/// What the SMTP server asks of the mail system. Implemented by the ingress service.
/// Every method runs off the event loop; none may throw: a failure is a reply.
public protocol SMTPServerDelegate: Sendable {
    /// Asked before the greeting when `checksConnections`: nil greets; a reply (421) is sent and the
    /// connection closed.
    func connectionOpened(session: SMTPSessionInfo) async -> SMTPReply?
    /// Asked before each command line when `checksCommands`: nil runs the command; a reply refuses it
    /// (a 421 also closes the connection).
    func commandReceived(session: SMTPSessionInfo) async -> SMTPReply?
    /// The account's canonical login when the credentials are right, nil when not.
    /// Throws only for a temporary failure (the client gets 454 4.7.0, or the reply of an `SMTPRefusal`).
    func authenticate(login: String, password: String, session: SMTPSessionInfo) async throws -> String?
    /// nil accepts the recipient; otherwise the rejection.
    func checkRecipient(_ recipient: ForwardPath, envelope: Envelope, session: SMTPSessionInfo) async -> SMTPReply?
    /// Stores the message durably before returning `.queued`.
    func deliver(_ envelope: Envelope, content: ByteBuffer, session: SMTPSessionInfo) async -> SMTPDeliveryOutcome
    func etrn(domain: String, session: SMTPSessionInfo) async -> SMTPReply
    /// RFC 2645: `.reply` answers and the session goes on; `.turnAround` sends its 250 and hands
    /// the connection over, the server's part in it done.
    func atrn(domains: [String], user: String, session: SMTPSessionInfo) async -> SMTPATRNDecision
    /// A message got its final reply. Called on the event loop: it must not block.
    func messageReceived(_ receipt: SMTPMessageReceipt)
}

/// What an ATRN request comes to.
public enum SMTPATRNDecision: Sendable {
    /// Answer (453 no mail, 450 refused, 451 try later) and stay the server.
    case reply(SMTPReply)
    /// Send `reply` (a 250), then give the channel to `run`: the peer now greets as the server
    /// (RFC 2645 §4) and `run` is the client. The SMTP server's handler is gone from the
    /// pipeline and reading is paused (autoRead off) until `run` sets autoRead again, so nothing
    /// the peer sends is lost in between. `run` closes the channel when done.
    case turnAround(SMTPReply, run: @Sendable (any Channel) async -> Void)

    /// The reply the client gets, either way.
    public var reply: SMTPReply {
        switch self {
        case .reply(let reply), .turnAround(let reply, _): reply
        }
    }
}

extension SMTPServerDelegate {
    public func connectionOpened(session: SMTPSessionInfo) async -> SMTPReply? { nil }
    public func commandReceived(session: SMTPSessionInfo) async -> SMTPReply? { nil }
    public func messageReceived(_ receipt: SMTPMessageReceipt) {}
}
