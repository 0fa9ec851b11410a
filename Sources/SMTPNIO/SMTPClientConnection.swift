import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import SMTPProtocol

/// RFC 5321 §4.5.3.2 timeouts for the client side, settable so tests can shorten them.
public struct SMTPClientTimeouts: Sendable, Hashable {
    /// Opening the TCP connection (not in the RFC; a dead host must not hold a worker).
    public var connect: TimeAmount
    /// §4.5.3.2.1: the 220 greeting, 5 minutes.
    public var greeting: TimeAmount
    /// EHLO, HELO, STARTTLS, RSET, NOOP, QUIT (the RFC names none; as MAIL).
    public var command: TimeAmount
    /// §4.5.3.2.2: MAIL, 5 minutes.
    public var mail: TimeAmount
    /// §4.5.3.2.3: RCPT, 5 minutes.
    public var rcpt: TimeAmount
    /// §4.5.3.2.4: the 354 to DATA (and BDAT's reply wait per chunk), 2 minutes.
    public var dataInitiation: TimeAmount
    /// §4.5.3.2.5: each write of the content, 3 minutes.
    public var dataBlock: TimeAmount
    /// §4.5.3.2.6: the reply after the final dot (or the LAST chunk), 10 minutes.
    public var finalDot: TimeAmount

    public init(
        connect: TimeAmount = .seconds(30), greeting: TimeAmount = .minutes(5), command: TimeAmount = .minutes(5),
        mail: TimeAmount = .minutes(5), rcpt: TimeAmount = .minutes(5), dataInitiation: TimeAmount = .minutes(2),
        dataBlock: TimeAmount = .minutes(3), finalDot: TimeAmount = .minutes(10)
    ) {
        self.connect = connect
        self.greeting = greeting
        self.command = command
        self.mail = mail
        self.rcpt = rcpt
        self.dataInitiation = dataInitiation
        self.dataBlock = dataBlock
        self.finalDot = finalDot
    }

    /// Every limit set to `value` (tests).
    public static func all(_ value: TimeAmount) -> SMTPClientTimeouts {
        SMTPClientTimeouts(
            connect: value, greeting: value, command: value, mail: value, rcpt: value, dataInitiation: value,
            dataBlock: value, finalDot: value)
    }
}

/// Why a client connection or session failed. `kind` tells delivery how to classify it.
public struct SMTPClientError: Error, Sendable, CustomStringConvertible {
    public enum Kind: Sendable, Hashable {
        /// The TCP connection could not be opened.
        case connect
        /// No reply within the step's time limit (the connection was closed).
        case timeout
        /// The server closed the connection, or it broke.
        case connectionLost
        /// The server's reply could not be read, or it sent plaintext behind STARTTLS.
        case protocolViolation
        /// The greeting, EHLO/HELO or STARTTLS was refused with this reply.
        case rejected(SMTPReply)
        /// The TLS handshake failed.
        case tls
        /// TLS is required and the server does not offer STARTTLS (or refused it).
        case tlsRequired
    }

    public var kind: Kind
    public var description: String

    public init(_ kind: Kind, _ description: String) {
        self.kind = kind
        self.description = description
    }
}

/// One SMTP client connection on a channel: writes commands, reads replies in order.
///
/// Replies are framed and parsed by `SMTPClientHandler` on the event loop and handed out one
/// per `readReply` in the order they came (replies that arrive before anyone asks are kept), so
/// pipelined commands are written in one flush and their replies read afterwards (RFC 2920).
/// Every read has a time limit; when it passes the connection is closed and unusable.
///
/// `connect` opens a TCP connection; `init(channel:)` takes over a channel someone else opened
/// (ATRN, RFC 2645: the server side of an inbound connection turns into the client), which
/// must then start with `readReply` for the peer's 220 greeting.
public final class SMTPClientConnection: Sendable {
    public let channel: any Channel
    private let handler: NIOLoopBound<SMTPClientHandler>

    private init(channel: any Channel, handler: NIOLoopBound<SMTPClientHandler>) {
        self.channel = channel
        self.handler = handler
    }

    /// Adds the reply reader to an open channel whose next input is the peer's first reply
    /// (input that arrives before this call is lost: keep reading paused until then).
    public static func attach(to channel: any Channel) async throws -> SMTPClientConnection {
        let handler = try await channel.eventLoop.submit {
            guard channel.isActive else { throw SMTPClientError(.connectionLost, "the connection is closed") }
            let handler = SMTPClientHandler()
            try channel.pipeline.syncOperations.addHandler(handler)
            return NIOLoopBound(handler, eventLoop: channel.eventLoop)
        }.get()
        return SMTPClientConnection(channel: channel, handler: handler)
    }

    /// The reader is in the pipeline before the channel is active, so the greeting cannot
    /// arrive ahead of it.
    private static func bootstrap(group: any EventLoopGroup, timeout: TimeAmount) -> ClientBootstrap {
        ClientBootstrap(group: group).connectTimeout(timeout).channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(SMTPClientHandler()) }
        }
    }

    private static func opened(_ channel: any Channel) async throws -> SMTPClientConnection {
        let handler = try await channel.eventLoop.submit {
            NIOLoopBound(try channel.pipeline.syncOperations.handler(type: SMTPClientHandler.self), eventLoop: channel.eventLoop)
        }.get()
        return SMTPClientConnection(channel: channel, handler: handler)
    }

    /// Opens a TCP connection to `address`.
    public static func connect(
        to address: SocketAddress, timeout: TimeAmount, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) async throws(SMTPClientError) -> SMTPClientConnection {
        do {
            let channel = try await bootstrap(group: group, timeout: timeout).connect(to: address).get()
            return try await opened(channel)
        } catch {
            throw SMTPClientError(.connect, "cannot connect to \(address.ipAddress ?? "?") port \(address.port ?? 0): \(error)")
        }
    }

    /// Opens a TCP connection to `host` (a name is resolved by the system resolver).
    public static func connect(
        host: String, port: Int, timeout: TimeAmount, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) async throws(SMTPClientError) -> SMTPClientConnection {
        do {
            let channel = try await bootstrap(group: group, timeout: timeout).connect(host: host, port: port).get()
            return try await opened(channel)
        } catch {
            throw SMTPClientError(.connect, "cannot connect to \(host) port \(port): \(error)")
        }
    }

    /// The next reply, waiting at most `timeout` (then the connection is closed).
    public func readReply(timeout: TimeAmount, waitingFor step: String) async throws(SMTPClientError) -> SMTPReply {
        let handler = self.handler
        let channel = self.channel
        do {
            return try await channel.eventLoop.flatSubmit {
                handler.value.nextReply(timeout: timeout, step: step)
            }.get()
        } catch let error as SMTPClientError {
            throw error
        } catch {
            throw SMTPClientError(.connectionLost, "connection lost waiting for the reply to \(step): \(error)")
        }
    }

    /// Writes `commands` in one flush and reads one reply per command, each within its own
    /// `timeout`. Without pipelining, call it with one command at a time.
    public func send(
        _ commands: [(command: SMTPClientCommand, timeout: TimeAmount)]
    ) async throws(SMTPClientError) -> [SMTPReply] {
        var buffer = channel.allocator.buffer(capacity: 64 * commands.count)
        for (command, _) in commands {
            do {
                try command.validate()
            } catch {
                throw SMTPClientError(.protocolViolation, error.description)
            }
            command.write(into: &buffer)
        }
        try await write(buffer, timeout: commands.map(\.timeout).max() ?? .minutes(5))
        var replies: [SMTPReply] = []
        for (command, timeout) in commands {
            replies.append(try await readReply(timeout: timeout, waitingFor: Self.verb(command)))
        }
        return replies
    }

    public func send(_ command: SMTPClientCommand, timeout: TimeAmount) async throws(SMTPClientError) -> SMTPReply {
        try await send([(command, timeout)])[0]
    }

    /// Writes raw octets (message content) and waits until they are written, at most `timeout`.
    public func write(_ buffer: ByteBuffer, timeout: TimeAmount) async throws(SMTPClientError) {
        let channel = self.channel
        do {
            // The time limit is kept on the event loop, so a busy caller cannot make it fire.
            try await channel.eventLoop.flatSubmit {
                let written = channel.writeAndFlush(buffer)
                let closer = channel.eventLoop.scheduleTask(in: timeout) { channel.close(promise: nil) }
                written.whenComplete { _ in closer.cancel() }
                return written
            }.get()
        } catch {
            throw SMTPClientError(.connectionLost, "cannot write to the server: \(error)")
        }
    }

    /// After the server's 220 to STARTTLS: refuses plaintext the server sent behind its reply
    /// (the STARTTLS injection defence, RFC 3207 §4.2 / CVE-2011-0411), puts a TLS client in
    /// front of the pipeline and waits for the handshake.
    public func startTLS(context: NIOSSLContext, serverHostname: String?, timeout: TimeAmount) async throws(SMTPClientError) {
        let handler = self.handler
        let channel = self.channel
        do {
            try await channel.eventLoop.flatSubmit { () -> EventLoopFuture<Void> in
                handler.value.startTLS(context: context, serverHostname: serverHostname, timeout: timeout)
            }.get()
        } catch let error as SMTPClientError {
            throw error
        } catch {
            throw SMTPClientError(.tls, "TLS handshake failed: \(error)")
        }
    }

    /// True once the connection failed or closed (it cannot be used again).
    public var isClosed: Bool {
        get async {
            let handler = self.handler
            return (try? await channel.eventLoop.submit { handler.value.failure != nil }.get()) ?? true
        }
    }

    /// Closes the connection (no QUIT; see `SMTPClientSession.quit`).
    public func close() async {
        try? await channel.close()
    }

    static func verb(_ command: SMTPClientCommand) -> String {
        String(command.line.prefix(while: { $0 != " " && $0 != ":" }))
    }
}

/// Frames the server's bytes into lines, parses them into replies and hands them to waiters in
/// order. Lives on the channel's event loop only.
final class SMTPClientHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private var buffer = ByteBuffer()
    private var parser = SMTPReplyParser()
    private var replies = CircularBuffer<SMTPReply>()
    private var waiters = CircularBuffer<EventLoopPromise<SMTPReply>>()
    private var handshake: EventLoopPromise<Void>?
    private(set) var failure: SMTPClientError?
    private var channel: (any Channel)?

    func handlerAdded(context: ChannelHandlerContext) {
        channel = context.channel
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        buffer.writeBuffer(&bytes)
        while failure == nil, let lf = buffer.readableBytesView.firstIndex(of: 0x0A) {
            let length = lf - buffer.readerIndex
            var line = buffer.readString(length: length) ?? ""
            buffer.moveReaderIndex(forwardBy: 1)
            if line.hasSuffix("\r") { line.removeLast() }
            do {
                if let reply = try parser.feed(line: line) { deliver(reply) }
            } catch {
                fail(SMTPClientError(.protocolViolation, error.description))
                context.close(promise: nil)
            }
        }
        if buffer.readableBytes > SMTPReplyParser.maxLineLength {
            fail(SMTPClientError(.protocolViolation, "reply line longer than \(SMTPReplyParser.maxLineLength) octets"))
            context.close(promise: nil)
        }
        buffer.discardReadBytes()
    }

    func channelInactive(context: ChannelHandlerContext) {
        fail(SMTPClientError(.connectionLost, "the server closed the connection"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let kind: SMTPClientError.Kind = handshake != nil ? .tls : .connectionLost
        fail(SMTPClientError(kind, "\(kind == .tls ? "TLS handshake failed" : "connection error"): \(error)"))
        context.close(promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let tls = event as? TLSUserEvent, case .handshakeCompleted = tls, let handshake {
            self.handshake = nil
            handshake.succeed()
        }
        context.fireUserInboundEventTriggered(event)
    }

    private func deliver(_ reply: SMTPReply) {
        if let waiter = waiters.popFirst() {
            waiter.succeed(reply)
        } else {
            replies.append(reply)
        }
    }

    private func fail(_ error: SMTPClientError) {
        guard failure == nil else { return }
        failure = error
        while let waiter = waiters.popFirst() { waiter.fail(error) }
        if let handshake {
            self.handshake = nil
            handshake.fail(error)
        }
    }

    func nextReply(timeout: TimeAmount, step: String) -> EventLoopFuture<SMTPReply> {
        guard let channel else { preconditionFailure("handler not added") }
        if let reply = replies.popFirst() { return channel.eventLoop.makeSucceededFuture(reply) }
        if let failure { return channel.eventLoop.makeFailedFuture(failure) }
        let promise = channel.eventLoop.makePromise(of: SMTPReply.self)
        waiters.append(promise)
        let loopBound = NIOLoopBound(self, eventLoop: channel.eventLoop)
        let seconds = timeout.nanoseconds / 1_000_000_000
        let timer = channel.eventLoop.scheduleTask(in: timeout) {
            loopBound.value.fail(SMTPClientError(.timeout, "no reply to \(step) within \(seconds) s"))
            channel.close(promise: nil)
        }
        promise.futureResult.whenComplete { _ in timer.cancel() }
        return promise.futureResult
    }

    func startTLS(context tlsContext: NIOSSLContext, serverHostname: String?, timeout: TimeAmount) -> EventLoopFuture<Void> {
        guard let channel else { preconditionFailure("handler not added") }
        if let failure { return channel.eventLoop.makeFailedFuture(failure) }
        guard buffer.readableBytes == 0, replies.isEmpty, !parser.isInsideReply else {
            let error = SMTPClientError(.protocolViolation, "the server sent plaintext behind its STARTTLS reply")
            fail(error)
            channel.close(promise: nil)
            return channel.eventLoop.makeFailedFuture(error)
        }
        let promise = channel.eventLoop.makePromise(of: Void.self)
        handshake = promise
        do {
            // SNI only for names; certificate checks are the caller's choice in `tlsContext`.
            let name = serverHostname.flatMap { $0.contains(":") || $0.allSatisfy({ $0.isNumber || $0 == "." }) ? nil : $0 }
            try channel.pipeline.syncOperations.addHandler(
                NIOSSLClientHandler(context: tlsContext, serverHostname: name), position: .first)
        } catch {
            let failure = SMTPClientError(.tls, "cannot start TLS: \(error)")
            fail(failure)
            channel.close(promise: nil)
            return channel.eventLoop.makeFailedFuture(failure)
        }
        let loopBound = NIOLoopBound(self, eventLoop: channel.eventLoop)
        let timer = channel.eventLoop.scheduleTask(in: timeout) {
            loopBound.value.fail(SMTPClientError(.timeout, "TLS handshake did not finish in time"))
            channel.close(promise: nil)
        }
        promise.futureResult.whenComplete { _ in timer.cancel() }
        return promise.futureResult
    }
}
