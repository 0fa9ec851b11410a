import NIOCore

/// What the server offers; fixed for the life of a connection.
public struct SMTPServerConfiguration: Sendable, Hashable {
    public var hostname: String
    /// RFC 1870: advertised as `SIZE <n>`, enforced on `SIZE=` and as content arrives.
    public var maxMessageSize: Int
    /// RFC 5321 §4.5.3.1.8; beyond it RCPT gets 452 4.5.3.
    public var maxRecipients: Int
    /// STARTTLS is offered (a certificate is configured).
    public var tlsAvailable: Bool
    /// MAIL needs a successful AUTH first.
    public var authRequired: Bool
    /// RFC 2852 min-by-time, advertised as `DELIVERBY <n>`.
    public var deliverByMinimum: Int
    /// The server asks its delegate before greeting (`connectionOpened`) — for connection limits.
    public var checksConnections: Bool
    /// The server asks its delegate before each command line (`commandReceived`) — for command limits.
    public var checksCommands: Bool

    public init(
        hostname: String, maxMessageSize: Int, maxRecipients: Int, tlsAvailable: Bool, authRequired: Bool,
        deliverByMinimum: Int, checksConnections: Bool = false, checksCommands: Bool = false
    ) {
        self.checksConnections = checksConnections
        self.checksCommands = checksCommands
        self.hostname = hostname
        self.maxMessageSize = maxMessageSize
        self.maxRecipients = maxRecipients
        self.tlsAvailable = tlsAvailable
        self.authRequired = authRequired
        self.deliverByMinimum = deliverByMinimum
    }
}

/// The server side of one SMTP session (RFC 5321 §4.1.4 and the extensions), apart from any I/O.
///
/// Each event is a `mutating func …(…) -> Action`; the channel handler performs the action and
/// reports the outcome of asynchronous ones (`authenticate`, `checkRecipient`, `deliver`, `etrn`,
/// `atrn`) back with the matching `…Completed` event. While one is outstanding `framingMode` is
/// `.paused`: the handler reads no further input, so pipelined commands keep their order.
public struct SMTPServerStateMachine: Sendable {
    public enum Action: Sendable, Equatable {
        /// Write the replies; close afterwards when `thenClose`.
        case send([SMTPReply], thenClose: Bool)
        /// Close without a reply (plaintext injected behind STARTTLS).
        case closeSilently
        /// Write the reply, then start the TLS handshake; report `tlsEstablished()`.
        case startTLS(SMTPReply)
        /// Verify the credentials; report `authenticationCompleted(user:)`.
        case authenticate(login: String, password: String)
        /// Decide on a recipient; report `recipientChecked(rejection:)`.
        case checkRecipient(ForwardPath, Envelope)
        /// Store the message durably; report `deliveryCompleted(queueID:)` or `deliveryFailed(_:)`.
        case deliver(Envelope, ByteBuffer)
        /// Run the queue for a domain; report `etrnCompleted(_:)`.
        case etrn(String)
        /// Turn the connection around for these domains; report `atrnCompleted(_:)`.
        case atrn(domains: [String], user: String)
        case none
    }

    /// How the framing layer must read the next input.
    public enum FramingMode: Sendable, Equatable {
        /// CRLF-terminated lines of at most `maxLength` octets including CRLF.
        case line(maxLength: Int)
        /// A DATA section up to CRLF.CRLF, dot-unstuffed, at most `maxSize` octets kept.
        case data(maxSize: Int)
        /// Exactly `size` octets of a BDAT chunk; `discard` when they are to be thrown away.
        case chunk(size: Int, discard: Bool)
        /// Read nothing: an asynchronous action is outstanding.
        case paused
        case closed
    }

    struct Transaction: Sendable {
        var reversePath: ReversePath
        var parameters: MailParameters
        var recipients: [ForwardPath] = []
        var chunks: ByteBuffer? = nil
    }

    enum AuthStep: Sendable {
        case plain
        case loginUsername
        case loginPassword(username: String)
    }

    enum Pending: Sendable {
        case authentication
        case recipient(Transaction, ForwardPath)
        case delivery
        case queueCommand
    }

    enum State: Sendable {
        /// Before HELO/EHLO.
        case connected
        /// Greeted, no transaction.
        case ready
        /// After MAIL (and any RCPTs).
        case mail(Transaction)
        /// Between 354 and CRLF.CRLF.
        case data(Transaction)
        /// Reading a BDAT chunk; `transaction` nil or `rejection` set when the chunk is to be discarded.
        case chunk(Transaction?, size: Int, last: Bool, rejection: SMTPReply?)
        /// Inside an AUTH exchange.
        case authenticating(AuthStep)
        case waiting(Pending)
        case closed
    }

    public let configuration: SMTPServerConfiguration
    private(set) var state: State = .connected
    public private(set) var heloName: String?
    public private(set) var usedEHLO = false
    public private(set) var authenticatedUser: String?
    public private(set) var tlsActive = false
    private var shutdownRequested = false

    public init(configuration: SMTPServerConfiguration) {
        self.configuration = configuration
    }

    public var framingMode: FramingMode {
        switch state {
        case .connected, .ready, .mail, .authenticating:
            return .line(maxLength: SMTPDefaults.maxAuthLineLength)
        case .data:
            return .data(maxSize: configuration.maxMessageSize)
        case .chunk(let transaction, let size, _, let rejection):
            return .chunk(size: size, discard: transaction == nil || rejection != nil)
        case .waiting:
            return .paused
        case .closed:
            return .closed
        }
    }

    /// True while a message is on its way in: shutdown waits for it.
    public var isInTransaction: Bool {
        switch state {
        case .mail, .data, .chunk, .waiting(.delivery), .waiting(.recipient): return true
        case .connected, .ready, .authenticating, .waiting, .closed: return false
        }
    }

    // MARK: Connection events

    public mutating func connectionEstablished() -> Action {
        .send([.greeting(configuration.hostname)], thenClose: false)
    }

    public mutating func idleTimeoutReached() -> Action {
        if case .waiting = state { return .none }
        if case .closed = state { return .none }
        state = .closed
        return .send([.timeout(configuration.hostname)], thenClose: true)
    }

    /// Graceful shutdown: an idle session is closed now with 421; one in a transaction may finish it.
    public mutating func shutdownWasRequested() -> Action {
        shutdownRequested = true
        switch state {
        case .connected, .ready, .authenticating:
            state = .closed
            return .send([.shuttingDown(configuration.hostname)], thenClose: true)
        case .mail, .data, .chunk, .waiting, .closed:
            return .none
        }
    }

    public mutating func tlsEstablished() {
        tlsActive = true
        heloName = nil
        usedEHLO = false
        authenticatedUser = nil
        state = .connected
    }

    // MARK: Framing events

    public mutating func lineTooLongReceived() -> Action {
        if case .authenticating = state {
            state = .ready
            return reply(.invalidAuthData)
        }
        return reply(.lineTooLong)
    }

    public mutating func bareLineFeedReceived() -> Action {
        if case .authenticating = state {
            state = .ready
            return reply(.invalidAuthData)
        }
        return reply(.bareLineFeed)
    }

    /// One line, without its CRLF.
    public mutating func lineReceived(_ line: ByteBuffer) -> Action {
        if case .authenticating(let step) = state {
            return authenticationLineReceived(line, step: step)
        }
        let bytes = line.readableBytesView
        if bytes.count > SMTPDefaults.maxCommandLineLength - 2 {
            let isAuth = bytes.count >= 5 && String(decoding: bytes.prefix(5), as: UTF8.self).uppercased() == "AUTH "
            guard isAuth else { return reply(.lineTooLong) }
        }
        switch SMTPCommand.parse(bytes) {
        case .success(let command):
            return commandReceived(command)
        case .failure(let error):
            if error.mustClose {
                state = .closed
                return .send([error.reply], thenClose: true)
            }
            return reply(error.reply)
        }
    }

    public mutating func dataSectionReceived(_ section: DataSection) -> Action {
        guard case .data(let transaction) = state else { preconditionFailure("DATA content outside DATA") }
        if section.exceededSize { return finishTransaction(.messageTooBig) }
        if section.hadBareCROrLF { return finishTransaction(.bareCROrLF) }
        if section.hadLongLine { return finishTransaction(.lineTooLong) }
        state = .waiting(.delivery)
        return .deliver(envelope(transaction, chunked: false), section.content)
    }

    /// A whole BDAT chunk (empty when it was discarded).
    public mutating func chunkReceived(_ chunk: ByteBuffer) -> Action {
        guard case .chunk(let transaction, let size, let last, let rejection) = state else {
            preconditionFailure("BDAT content outside BDAT")
        }
        if let rejection {
            if transaction == nil {
                state = heloName == nil ? .connected : .ready
                return reply(rejection)
            }
            return finishTransaction(rejection)
        }
        guard var transaction else { preconditionFailure("BDAT chunk without transaction") }
        var buffer = transaction.chunks ?? ByteBuffer()
        var chunk = chunk
        buffer.writeBuffer(&chunk)
        transaction.chunks = buffer
        if last {
            state = .waiting(.delivery)
            return .deliver(envelope(transaction, chunked: true), buffer)
        }
        state = .mail(transaction)
        return reply(.chunkReceived(size))
    }

    // MARK: Outcomes of asynchronous actions

    /// `user` is the account's login on success, nil when the credentials were wrong.
    public mutating func authenticationCompleted(user: String?) -> Action {
        guard case .waiting(.authentication) = state else { preconditionFailure("unexpected authentication result") }
        state = .ready
        guard let user else { return reply(.authFailed) }
        authenticatedUser = user
        return reply(.authSucceeded)
    }

    /// AUTH could not be decided now (`reply` is a 454, e.g. a temporary failure or a lockout).
    public mutating func authenticationFailedTemporarily(_ reply: SMTPReply = .authTemporaryFailure) -> Action {
        guard case .waiting(.authentication) = state else { preconditionFailure("unexpected authentication result") }
        state = .ready
        return self.reply(reply)
    }

    /// nil accepts the recipient.
    public mutating func recipientChecked(rejection: SMTPReply?) -> Action {
        guard case .waiting(.recipient(var transaction, let recipient)) = state else {
            preconditionFailure("unexpected recipient result")
        }
        if let rejection {
            state = .mail(transaction)
            return reply(rejection)
        }
        transaction.recipients.append(recipient)
        state = .mail(transaction)
        return reply(.recipientOk)
    }

    public mutating func deliveryCompleted(queueID: String) -> Action {
        guard case .waiting(.delivery) = state else { preconditionFailure("unexpected delivery result") }
        state = .ready
        return finish(.queued(queueID))
    }

    public mutating func deliveryFailed(_ reply: SMTPReply) -> Action {
        guard case .waiting(.delivery) = state else { preconditionFailure("unexpected delivery result") }
        state = .ready
        return finish(reply)
    }

    public mutating func etrnCompleted(_ reply: SMTPReply) -> Action {
        queueCommandCompleted(reply)
    }

    public mutating func atrnCompleted(_ reply: SMTPReply) -> Action {
        queueCommandCompleted(reply)
    }

    private mutating func queueCommandCompleted(_ reply: SMTPReply) -> Action {
        guard case .waiting(.queueCommand) = state else { preconditionFailure("unexpected queue command result") }
        state = .ready
        return finish(reply)
    }

    // MARK: Commands

    mutating func commandReceived(_ command: SMTPCommand) -> Action {
        switch command {
        case .helo(let domain), .ehlo(let domain):
            heloName = domain
            let isEHLO: Bool
            if case .ehlo = command { isEHLO = true } else { isEHLO = false }
            usedEHLO = isEHLO
            state = .ready
            return reply(isEHLO ? ehloReply() : SMTPReply(250, nil, configuration.hostname))
        case .mail(let path, let parameters):
            return mailReceived(path, parameters)
        case .rcpt(let path, let parameters):
            return rcptReceived(path, parameters)
        case .data:
            switch state {
            case .mail(let transaction):
                if transaction.chunks != nil { return reply(.dataAfterBDAT) }
                if transaction.recipients.isEmpty { return reply(.noValidRecipients) }
                state = .data(transaction)
                return reply(.startMailInput)
            case .connected, .ready:
                return reply(.needMail)
            case .data, .chunk, .authenticating, .waiting, .closed:
                preconditionFailure("command in state \(state)")
            }
        case .bdat(let size, let last):
            switch state {
            case .mail(let transaction):
                if transaction.recipients.isEmpty {
                    state = .chunk(transaction, size: size, last: last, rejection: .noValidRecipients)
                } else if (transaction.chunks?.readableBytes ?? 0) + size > configuration.maxMessageSize {
                    state = .chunk(transaction, size: size, last: last, rejection: .messageTooBig)
                } else {
                    state = .chunk(transaction, size: size, last: last, rejection: nil)
                }
            case .connected, .ready:
                state = .chunk(nil, size: size, last: last, rejection: .needMail)
            case .data, .chunk, .authenticating, .waiting, .closed:
                preconditionFailure("command in state \(state)")
            }
            return .none
        case .rset:
            if case .connected = state { return reply(.ok) }
            state = .ready
            return finish(.ok)
        case .noop:
            return reply(.ok)
        case .quit:
            state = .closed
            return .send([.bye], thenClose: true)
        case .vrfy:
            return reply(.vrfy)
        case .help:
            return reply(.help)
        case .startTLS:
            guard configuration.tlsAvailable else { return reply(.tlsNotAvailable) }
            guard !tlsActive else { return reply(.tlsAlreadyActive) }
            return .startTLS(.readyToStartTLS)
        case .auth(let mechanism, let initialResponse):
            return authReceived(mechanism: mechanism, initialResponse: initialResponse)
        case .etrn(let domain):
            switch state {
            case .connected: return reply(.sendHELOFirst)
            case .mail: return reply(.etrnDuringTransaction)
            default: break
            }
            state = .waiting(.queueCommand)
            return .etrn(domain.hasPrefix("@") ? String(domain.dropFirst()) : domain)
        case .atrn(let domains):
            guard let user = authenticatedUser else { return reply(.authenticationRequired) }
            if case .mail = state { return reply(.atrnDuringTransaction) }
            state = .waiting(.queueCommand)
            return .atrn(domains: domains, user: user)
        case .notImplemented:
            return reply(.notImplemented)
        }
    }

    private func ehloReply() -> SMTPReply {
        var lines = [configuration.hostname, "PIPELINING", "SIZE \(configuration.maxMessageSize)", "ETRN"]
        if configuration.tlsAvailable && !tlsActive { lines.append("STARTTLS") }
        if !configuration.tlsAvailable || tlsActive { lines.append("AUTH PLAIN LOGIN") }
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "CHUNKING", "DELIVERBY \(configuration.deliverByMinimum)", "ATRN"]
        return SMTPReply(250, nil, lines)
    }

    private mutating func mailReceived(_ path: ReversePath, _ parameters: [ESMTPParameter]) -> Action {
        switch state {
        case .connected: return reply(.sendHELOFirst)
        case .mail: return reply(.senderAlreadySpecified)
        default: break
        }
        if configuration.authRequired && authenticatedUser == nil { return reply(.authenticationRequired) }
        var mailParameters = MailParameters()
        for parameter in parameters {
            switch parameter.keyword {
            case "SIZE":
                guard let value = parameter.value, value.count <= 18, value.allSatisfy(\.isASCIIDigit), let size = Int(value) else {
                    return reply(.invalidParameter("SIZE"))
                }
                if size > configuration.maxMessageSize { return reply(.messageTooBig) }
                mailParameters.declaredSize = size
            case "BODY":
                guard let value = parameter.value, let body = BodyType(rawValue: value.uppercased()) else {
                    return reply(.invalidParameter("BODY"))
                }
                mailParameters.body = body
            case "SMTPUTF8":
                guard parameter.value == nil else { return reply(.invalidParameter("SMTPUTF8")) }
                mailParameters.smtputf8 = true
            case "BY":
                guard let value = parameter.value, let deliverBy = DeliverBy(parameterValue: value) else {
                    return reply(.invalidParameter("BY"))
                }
                if deliverBy.mode == .returnMessage && deliverBy.seconds < configuration.deliverByMinimum {
                    return reply(.deliverByBelowMinimum(configuration.deliverByMinimum))
                }
                mailParameters.deliverBy = deliverBy
            case "AUTH":
                // RFC 4954 §5: the original submitter; accepted and not used.
                break
            default:
                return reply(.unsupportedParameter(parameter.keyword))
            }
        }
        if let mailbox = path.mailbox, !mailbox.isASCII, !mailParameters.smtputf8 { return reply(.smtputf8Required) }
        state = .mail(Transaction(reversePath: path, parameters: mailParameters))
        return reply(.senderOk)
    }

    private mutating func rcptReceived(_ path: ForwardPath, _ parameters: [ESMTPParameter]) -> Action {
        guard case .mail(let transaction) = state else { return reply(.needMail) }
        if let parameter = parameters.first { return reply(.unsupportedParameter(parameter.keyword)) }
        if case .mailbox(let mailbox) = path, !mailbox.isASCII, !transaction.parameters.smtputf8 {
            return reply(.smtputf8Required)
        }
        if transaction.recipients.contains(path) { return reply(.recipientOk) }
        if transaction.recipients.count >= configuration.maxRecipients { return reply(.tooManyRecipients) }
        state = .waiting(.recipient(transaction, path))
        return .checkRecipient(path, envelope(transaction, chunked: false))
    }

    private mutating func authReceived(mechanism: String, initialResponse: String?) -> Action {
        switch state {
        case .connected: return reply(.sendEHLOFirst)
        case .mail: return reply(.authDuringTransaction)
        default: break
        }
        if configuration.tlsAvailable && !tlsActive { return reply(.encryptionRequired) }
        if authenticatedUser != nil { return reply(.alreadyAuthenticated) }
        switch mechanism {
        case "PLAIN":
            guard let initialResponse else {
                state = .authenticating(.plain)
                return .send([.authChallenge("")], thenClose: false)
            }
            return plainResponseReceived(Array(initialResponse.utf8))
        case "LOGIN":
            guard let initialResponse else {
                state = .authenticating(.loginUsername)
                return .send([.authChallenge("VXNlcm5hbWU6")], thenClose: false)
            }
            return loginUsernameReceived(Array(initialResponse.utf8))
        default:
            return reply(.unknownMechanism)
        }
    }

    private mutating func authenticationLineReceived(_ line: ByteBuffer, step: AuthStep) -> Action {
        let bytes = Array(line.readableBytesView)
        if bytes == [UInt8(ascii: "*")] {
            state = .ready
            return reply(.authCancelled)
        }
        switch step {
        case .plain:
            return plainResponseReceived(bytes)
        case .loginUsername:
            return loginUsernameReceived(bytes)
        case .loginPassword(let username):
            guard let password = Self.decodeText(bytes) else {
                state = .ready
                return reply(.invalidAuthData)
            }
            state = .waiting(.authentication)
            return .authenticate(login: username, password: password)
        }
    }

    /// RFC 4616: `[authzid] NUL authcid NUL passwd`; `=` is an empty initial response (RFC 4954 §4).
    private mutating func plainResponseReceived(_ encoded: [UInt8]) -> Action {
        guard let decoded = encoded == [UInt8(ascii: "=")] ? [] : Base64.decode(encoded) else {
            state = .ready
            return reply(.invalidAuthData)
        }
        let parts = decoded.split(separator: 0, omittingEmptySubsequences: false)
        guard parts.count == 3,
            let authzid = String(validating: parts[0], as: UTF8.self),
            let login = String(validating: parts[1], as: UTF8.self),
            let password = String(validating: parts[2], as: UTF8.self),
            !login.isEmpty, authzid.isEmpty || authzid == login
        else {
            state = .ready
            return reply(.invalidAuthData)
        }
        state = .waiting(.authentication)
        return .authenticate(login: login, password: password)
    }

    private mutating func loginUsernameReceived(_ encoded: [UInt8]) -> Action {
        guard let username = Self.decodeText(encoded), !username.isEmpty else {
            state = .ready
            return reply(.invalidAuthData)
        }
        state = .authenticating(.loginPassword(username: username))
        return .send([.authChallenge("UGFzc3dvcmQ6")], thenClose: false)
    }

    private static func decodeText(_ encoded: [UInt8]) -> String? {
        guard let decoded = Base64.decode(encoded), !decoded.contains(0) else { return nil }
        return String(validating: decoded, as: UTF8.self)
    }

    // MARK: Helpers

    private func envelope(_ transaction: Transaction, chunked: Bool) -> Envelope {
        Envelope(
            reversePath: transaction.reversePath, recipients: transaction.recipients, parameters: transaction.parameters,
            heloName: heloName ?? "", usedEHLO: usedEHLO, authenticatedUser: authenticatedUser, tlsActive: tlsActive,
            chunked: chunked)
    }

    private func reply(_ reply: SMTPReply) -> Action {
        .send([reply], thenClose: false)
    }

    /// Ends the transaction with `reply`.
    private mutating func finishTransaction(_ reply: SMTPReply) -> Action {
        state = .ready
        return finish(reply)
    }

    /// Sends `reply`; when shutdown was requested and the session is now idle, closes with 421 after it.
    private mutating func finish(_ reply: SMTPReply) -> Action {
        guard shutdownRequested else { return .send([reply], thenClose: false) }
        state = .closed
        return .send([reply, .shuttingDown(configuration.hostname)], thenClose: true)
    }
}
