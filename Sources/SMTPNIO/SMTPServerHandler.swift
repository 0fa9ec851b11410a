import Logging
import NIOCore
import NIOSSL
import NIOTLS
import SMTPProtocol

/// Sent through a connection's pipeline when the server shuts down gracefully.
public struct SMTPServerShutdownEvent: Sendable {
    public init() {}
}

/// The server side of one connection: frames input, feeds the state machine, and runs its actions.
/// Only `run(_:context:)` touches the channel. While an asynchronous action is outstanding it stops
/// reading (back-pressure) and frames nothing, so pipelined commands are answered in order.
final class SMTPServerHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = Never
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var machine: SMTPServerStateMachine
    private var framer = SMTPFramingParser()
    private let delegate: any SMTPServerDelegate
    private let tlsContext: NIOSSLContext?
    private var logger: Logger
    private var session: SMTPSessionInfo
    private var isProcessing = false
    private var needsFlush = false
    private var closed = false
    private var readPending = false
    /// Waiting for the delegate's admission of the connection or of a command line: frame nothing.
    private var awaitingCheck = false
    private let configuration: SMTPServerConfiguration
    /// The PROXY header a trusted proxy sent before this session, if any.
    private let proxyHeader: ProxyHeader?
    /// The session started (greeting or admission check): once, from `handlerAdded` or `channelActive`.
    private var started = false
    /// The first octets of the stream, until they show whether they begin a PROXY header
    /// (`ProxyHeader.detect`): a header here, where none is trusted, closes the connection.
    private var screening: ByteBuffer? = ByteBuffer()
    /// Reads the cipher suite off the ServerHello while a STARTTLS handshake runs.
    private var cipherSniffer: TLSServerHelloSniffer?
    /// A message whose content has arrived and whose final reply is not sent yet: when its content
    /// ended, and its size (`SMTPMessageReceipt`).
    private var messageInFlight: (ended: ContinuousClock.Instant, sizeBytes: Int)?

    /// `proxyHeader`: the header a trusted proxy opened the connection with; its source, when it
    /// names one, is the session's client instead of the socket's peer. Without one (v2 LOCAL, the
    /// proxy's own health check; v1 UNKNOWN; v2 AF_UNSPEC) the session's client is the proxy itself.
    init(
        configuration: SMTPServerConfiguration, delegate: any SMTPServerDelegate, tlsContext: NIOSSLContext?,
        logger: Logger, proxyHeader: ProxyHeader? = nil
    ) {
        self.machine = SMTPServerStateMachine(configuration: configuration)
        self.configuration = configuration
        self.delegate = delegate
        self.tlsContext = tlsContext
        self.logger = logger
        self.proxyHeader = proxyHeader
        self.session = SMTPSessionInfo(clientAddress: "unknown", clientPort: 0)
    }

    /// Added behind a `ProxyHeaderHandler` once the header arrived, the channel is already active
    /// and `channelActive` will not come: the session starts here.
    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { startSession(context: context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        startSession(context: context)
        context.fireChannelActive()
    }

    /// Names the client, then greets — or first asks the delegate to admit the connection.
    private func startSession(context: ChannelHandlerContext) {
        guard !started else { return }
        started = true
        if let remote = context.channel.remoteAddress {
            session.clientAddress = remote.ipAddress ?? "unknown"
            session.clientPort = remote.port ?? 0
        }
        if let proxyHeader {
            logger[metadataKey: "proxy"] = "\(session.clientAddress):\(session.clientPort)"
            if let source = proxyHeader.source {
                session.clientAddress = source.address
                session.clientPort = source.port
            }
        }
        logger[metadataKey: "client"] = "\(session.clientAddress):\(session.clientPort)"
        logger.debug("connection opened", metadata: proxyHeader.map { ["proxy_header": "\($0.version)\($0.isLocal ? " LOCAL" : "")"] })
        if configuration.checksConnections {
            awaitingCheck = true
            let delegate = self.delegate
            let session = self.session
            perform(context: context) {
                await delegate.connectionOpened(session: session)
            } then: { handler, refusal in
                handler.awaitingCheck = false
                guard let refusal else { return handler.machine.connectionEstablished() }
                handler.logger.info("connection refused", metadata: ["reply": "\(refusal.code) \(refusal.lines[0])"])
                return .send([refusal], thenClose: true)
            }
        } else {
            run(machine.connectionEstablished(), context: context)
            flushIfNeeded(context: context)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        logger.debug("connection closed")
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closed else { return }
        var bytes = unwrapInboundIn(data)
        if var screened = screening {
            screened.writeBuffer(&bytes)
            switch ProxyHeader.detect(screened) {
            case .undecided:
                screening = screened
                return
            case .header:
                // DESIGN.md: PROXY headers only from trusted CIDRs. No reply: it is not SMTP.
                logger.warning("PROXY header from an untrusted address, closing")
                screening = nil
                run(.closeSilently, context: context)
                return
            case .notHeader:
                screening = nil
                bytes = screened
            }
        }
        framer.append(bytes)
        processInput(context: context)
    }

    func read(context: ChannelHandlerContext) {
        // Back-pressure: no reads while an asynchronous action is outstanding.
        if machine.framingMode == .paused || awaitingCheck {
            readPending = true
        } else {
            context.read()
        }
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .read {
            run(machine.idleTimeoutReached(), context: context)
            flushIfNeeded(context: context)
        } else if event is SMTPServerShutdownEvent {
            run(machine.shutdownWasRequested(), context: context)
            flushIfNeeded(context: context)
        } else if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls {
            tlsHandshakeCompleted(context: context)
            context.fireUserInboundEventTriggered(event)
        } else {
            context.fireUserInboundEventTriggered(event)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        logger.debug("connection error", metadata: ["error": "\(error)"])
        closed = true
        context.close(promise: nil)
    }

    // MARK: Input

    private func processInput(context: ChannelHandlerContext) {
        guard !isProcessing else { return }
        isProcessing = true
        defer { isProcessing = false }
        while !closed, !awaitingCheck, let frame = framer.nextFrame(mode: machine.framingMode) {
            let action: SMTPServerStateMachine.Action
            switch frame {
            case .line(let line) where configuration.checksCommands:
                checkCommand(line, context: context)
                continue
            case .line(let line): action = machine.lineReceived(line)
            case .lineTooLong: action = machine.lineTooLongReceived()
            case .bareLineFeed: action = machine.bareLineFeedReceived()
            case .dataSection(let section):
                let ended = ContinuousClock.now
                action = machine.dataSectionReceived(section)
                logIfRejected(action)
                messageEnded(at: ended, action: action)
            case .chunk(let chunk):
                let ended = ContinuousClock.now
                action = machine.chunkReceived(chunk)
                logIfRejected(action)
                messageEnded(at: ended, action: action)
            }
            run(action, context: context)
        }
        flushIfNeeded(context: context)
        if readPending && machine.framingMode != .paused && !awaitingCheck && !closed {
            readPending = false
            context.read()
        }
    }

    /// Asks the delegate whether `line` may run; refused, it gets the delegate's reply instead.
    private func checkCommand(_ line: ByteBuffer, context: ChannelHandlerContext) {
        awaitingCheck = true
        let delegate = self.delegate
        let session = self.session
        perform(context: context) {
            await delegate.commandReceived(session: session)
        } then: { handler, refusal in
            handler.awaitingCheck = false
            guard let refusal else { return handler.machine.lineReceived(line) }
            handler.logger.info("command refused", metadata: ["reply": "\(refusal.code) \(refusal.lines[0])"])
            return .send([refusal], thenClose: refusal.code == 421)
        }
    }

    /// One log line for a message refused at the end of its content (size, bare CR/LF, long line).
    private func logIfRejected(_ action: SMTPServerStateMachine.Action) {
        guard case .send(let replies, _) = action, let reply = replies.first, !reply.isPositive else { return }
        logger.info("message rejected", metadata: ["reply": "\(reply.code) \(reply.enhancedCode.map { "\($0)" } ?? "") \(reply.lines[0])"])
    }

    /// After a DATA section or a BDAT chunk: a delivery to wait for, or a refusal that ends the
    /// message now (a 250 to a non-last chunk ends nothing).
    private func messageEnded(at ended: ContinuousClock.Instant, action: SMTPServerStateMachine.Action) {
        switch action {
        case .deliver(_, let content):
            messageInFlight = (ended, content.readableBytes)
        case .send(let replies, _) where replies.first.map({ !$0.isPositive }) ?? false:
            delegate.messageReceived(SMTPMessageReceipt(sizeBytes: nil, accepted: false, processing: .now - ended))
        default:
            break
        }
    }

    /// The delivery of the message in flight ended with its final reply.
    private func messageAnswered(accepted: Bool) {
        guard let (ended, sizeBytes) = messageInFlight else { return }
        messageInFlight = nil
        delegate.messageReceived(SMTPMessageReceipt(sizeBytes: sizeBytes, accepted: accepted, processing: .now - ended))
    }

    private func flushIfNeeded(context: ChannelHandlerContext) {
        if needsFlush {
            needsFlush = false
            context.flush()
        }
    }

    // MARK: Actions

    private func run(_ action: SMTPServerStateMachine.Action, context: ChannelHandlerContext) {
        switch action {
        case .none:
            break
        case .send(let replies, let thenClose):
            var buffer = context.channel.allocator.buffer(capacity: 128)
            for reply in replies { reply.write(into: &buffer) }
            if thenClose {
                closed = true
                let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
                context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in loopBound.value.close(promise: nil) }
            } else {
                context.write(wrapOutboundOut(buffer), promise: nil)
                needsFlush = true
            }
        case .closeSilently:
            closed = true
            context.close(promise: nil)
        case .startTLS(let reply):
            startTLS(reply, context: context)
        case .authenticate(let login, let password):
            let delegate = self.delegate
            let session = self.session
            perform(context: context) { () async -> Result<String?, any Error> in
                do {
                    return .success(try await delegate.authenticate(login: login, password: password, session: session))
                } catch {
                    return .failure(error)
                }
            } then: { handler, result in
                switch result {
                case .success(let user):
                    if user == nil { handler.logger.info("authentication failed") }
                    return handler.machine.authenticationCompleted(user: user)
                case .failure(let refusal as SMTPRefusal):
                    handler.logger.info("authentication refused", metadata: ["reply": "\(refusal.reply.code) \(refusal.reply.lines[0])"])
                    return handler.machine.authenticationFailedTemporarily(refusal.reply)
                case .failure(let error):
                    handler.logger.error("authentication unavailable", metadata: ["error": "\(error)"])
                    return handler.machine.authenticationFailedTemporarily()
                }
            }
        case .checkRecipient(let recipient, let envelope):
            let delegate = self.delegate
            let session = self.session
            perform(context: context) {
                await delegate.checkRecipient(recipient, envelope: envelope, session: session)
            } then: { handler, rejection in
                handler.machine.recipientChecked(rejection: rejection)
            }
        case .deliver(let envelope, let content):
            let delegate = self.delegate
            let session = self.session
            perform(context: context) {
                await delegate.deliver(envelope, content: content, session: session)
            } then: { handler, outcome in
                switch outcome {
                case .queued(let id):
                    handler.messageAnswered(accepted: true)
                    return handler.machine.deliveryCompleted(queueID: id)
                case .rejected(let reply):
                    handler.logger.info("message rejected", metadata: ["reply": "\(reply.code) \(reply.lines[0])"])
                    handler.messageAnswered(accepted: false)
                    return handler.machine.deliveryFailed(reply)
                }
            }
        case .etrn(let domain):
            let delegate = self.delegate
            let session = self.session
            perform(context: context) {
                await delegate.etrn(domain: domain, session: session)
            } then: { handler, reply in
                handler.machine.etrnCompleted(reply)
            }
        case .atrn(let domains, let user):
            let delegate = self.delegate
            let session = self.session
            flushIfNeeded(context: context)
            let promise = context.eventLoop.makePromise(of: SMTPATRNDecision.self)
            promise.completeWithTask { await delegate.atrn(domains: domains, user: user, session: session) }
            promise.futureResult.assumeIsolated().whenSuccess { decision in
                guard !self.closed else { return }
                switch decision {
                case .reply(let reply):
                    self.run(self.machine.atrnCompleted(reply), context: context)
                    self.processInput(context: context)
                case .turnAround(let reply, let client):
                    self.turnAround(reply, client: client, context: context)
                }
            }
        }
    }

    /// RFC 2645 §4: after the 250 the peer is the server. Input is paused (this handler held
    /// back reads while ATRN ran, and autoRead goes off before it leaves), so the peer's greeting
    /// waits in the socket for the client that `run` attaches.
    private func turnAround(_ reply: SMTPReply, client: @escaping @Sendable (any Channel) async -> Void, context: ChannelHandlerContext) {
        if framer.bufferedByteCount > 0 {
            // The peer may not speak before our 250: whatever it pipelined is not for the client.
            logger.warning("input pipelined behind ATRN, closing")
            run(.send([.atrnUnavailable], thenClose: true), context: context)
            flushIfNeeded(context: context)
            return
        }
        closed = true
        logger.info("ATRN: turning the connection around")
        var buffer = context.channel.allocator.buffer(capacity: 64)
        reply.write(into: &buffer)
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        let channel = context.channel
        do {
            try channel.syncOptions?.setOption(.autoRead, value: false)
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        } catch {
            logger.error("cannot turn the connection around", metadata: ["error": "\(error)"])
            context.close(promise: nil)
            return
        }
        Task { await client(channel) }
    }

    /// Runs `work` off the event loop; back on it, feeds the result to the machine and resumes input.
    private func perform<Value: Sendable>(
        context: ChannelHandlerContext,
        _ work: @escaping @Sendable () async -> Value,
        then: @escaping (SMTPServerHandler, Value) -> SMTPServerStateMachine.Action
    ) {
        flushIfNeeded(context: context)
        let promise = context.eventLoop.makePromise(of: Value.self)
        promise.completeWithTask(work)
        promise.futureResult.assumeIsolated().whenSuccess { result in
            guard !self.closed else { return }
            self.run(then(self, result), context: context)
            self.processInput(context: context)
        }
    }

    /// RFC 3207 §4.2 and the STARTTLS injection defence: anything the client sent after the
    /// STARTTLS line was sent in plaintext and must not be read as if it came over TLS.
    private func startTLS(_ reply: SMTPReply, context: ChannelHandlerContext) {
        guard let tlsContext else {
            run(.send([.tlsNotAvailable], thenClose: false), context: context)
            return
        }
        if framer.bufferedByteCount > 0 {
            logger.warning("plaintext pipelined behind STARTTLS, closing")
            run(.closeSilently, context: context)
            return
        }
        var buffer = context.channel.allocator.buffer(capacity: 64)
        reply.write(into: &buffer)
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        do {
            let sniffer = TLSServerHelloSniffer()
            try context.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tlsContext), position: .first)
            try context.pipeline.syncOperations.addHandler(sniffer, position: .first)
            cipherSniffer = sniffer
            machine.tlsEstablished()
            session.tlsActive = true
        } catch {
            logger.error("cannot start TLS", metadata: ["error": "\(error)"])
            closed = true
            context.close(promise: nil)
        }
    }
}

extension SMTPServerHandler {
    /// The handshake after STARTTLS finished: the session (and so every later delegate call, and
    /// the Received field) names the TLS version and cipher suite.
    private func tlsHandshakeCompleted(context: ChannelHandlerContext) {
        let version = try? context.pipeline.syncOperations.nioSSL_tlsVersion()
        session.tlsVersion = version.map(Self.name(of:))
        if let sniffer = cipherSniffer {
            session.tlsCipher = sniffer.cipherSuite.flatMap(TLSServerHello.name(ofCipherSuite:))
            cipherSniffer = nil
            context.pipeline.syncOperations.removeHandler(sniffer, promise: nil)
        }
        logger.debug("TLS established", metadata: ["version": "\(session.tlsVersion ?? "?")", "cipher": "\(session.tlsCipher ?? "?")"])
    }

    /// The names OpenSSL and Postfix use in Received fields: "TLSv1.2", "TLSv1.3".
    static func name(of version: TLSVersion) -> String {
        switch version {
        case .tlsv1: "TLSv1"
        case .tlsv11: "TLSv1.1"
        case .tlsv12: "TLSv1.2"
        case .tlsv13: "TLSv1.3"
        }
    }
}
