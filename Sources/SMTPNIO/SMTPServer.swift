import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import SMTPProtocol
import ServiceLifecycle

/// The SMTP listener as a `Service`: accepts connections, caps their number, and on graceful
/// shutdown stops accepting, sends 421 to idle sessions, lets open transactions finish within
/// `shutdownGrace`, then closes what is left.
public final class SMTPServer: Service, Sendable {
    public struct Configuration: Sendable {
        public var host: String
        public var port: Int
        public var maxConnections: Int
        public var idleTimeout: TimeAmount
        public var shutdownGrace: TimeAmount
        /// Proxies whose connections must open with a PROXY header (v1 or v2): the session's client
        /// is the header's source. A PROXY header from any other address closes the connection.
        public var trustedProxies: [CIDR]
        /// How long a trusted proxy's connection may take to send its header before it is closed.
        public var proxyHeaderTimeout: TimeAmount
        public var session: SMTPServerConfiguration

        public init(
            host: String, port: Int, maxConnections: Int, idleTimeout: TimeAmount, shutdownGrace: TimeAmount,
            trustedProxies: [CIDR] = [], proxyHeaderTimeout: TimeAmount = .seconds(5), session: SMTPServerConfiguration
        ) {
            self.host = host
            self.port = port
            self.maxConnections = maxConnections
            self.idleTimeout = idleTimeout
            self.shutdownGrace = shutdownGrace
            self.trustedProxies = trustedProxies
            self.proxyHeaderTimeout = proxyHeaderTimeout
            self.session = session
        }
    }

    private let configuration: Configuration
    private let delegate: any SMTPServerDelegate
    private let tlsContext: NIOSSLContext?
    private let group: any EventLoopGroup
    private let logger: Logger
    private let connections = NIOLockedValueBox<[ObjectIdentifier: any Channel]>([:])
    private let acceptedConnections = NIOLockedValueBox(0)
    private let refusedConnections = NIOLockedValueBox(0)
    private let boundAddress = NIOLockedValueBox<SocketAddress?>(nil)

    public init(
        configuration: Configuration, delegate: any SMTPServerDelegate, tlsContext: NIOSSLContext?,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, logger: Logger
    ) {
        self.configuration = configuration
        self.delegate = delegate
        self.tlsContext = tlsContext
        self.group = group
        self.logger = logger
    }

    /// The address the listener is bound to, once `run()` has bound it.
    public var localAddress: SocketAddress? { boundAddress.withLockedValue { $0 } }

    /// Connections open right now.
    public var activeConnections: Int { connections.withLockedValue { $0.count } }

    /// Connections accepted since `run()` started, including those refused for being too many.
    public var totalConnections: Int { acceptedConnections.withLockedValue { $0 } }

    /// Connections refused since `run()` started for being over `maxConnections`.
    public var refusedForLimit: Int { refusedConnections.withLockedValue { $0 } }

    public func run() async throws {
        let serverChannel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 512)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [self] channel in
                channel.eventLoop.makeCompletedFuture { try self.initialize(channel) }
            }
            .bind(host: configuration.host, port: configuration.port)
            .get()
        boundAddress.withLockedValue { $0 = serverChannel.localAddress }
        logger.info("SMTP listening", metadata: ["address": "\(serverChannel.localAddress.map { "\($0)" } ?? "?")"])

        try await withGracefulShutdownHandler {
            try await serverChannel.closeFuture.get()
        } onGracefulShutdown: { [self] in
            logger.info("SMTP shutting down: no new connections")
            serverChannel.close(promise: nil)
            for channel in connections.withLockedValue({ Array($0.values) }) {
                channel.pipeline.fireUserInboundEventTriggered(SMTPServerShutdownEvent())
            }
        }
        await drain()
    }

    /// Waits for open sessions to finish, up to the grace period, then closes the rest.
    private func drain() async {
        let deadline = NIODeadline.now() + configuration.shutdownGrace
        while activeConnections > 0 && NIODeadline.now() < deadline {
            try? await Task.sleep(for: .milliseconds(50))
        }
        let remaining = connections.withLockedValue { Array($0.values) }
        if !remaining.isEmpty { logger.warning("closing sessions still open after the grace period", metadata: ["count": "\(remaining.count)"]) }
        for channel in remaining { channel.close(promise: nil) }
    }

    private func initialize(_ channel: any Channel) throws {
        let id = ObjectIdentifier(channel)
        acceptedConnections.withLockedValue { $0 += 1 }
        let admitted = connections.withLockedValue { open -> Bool in
            guard open.count < configuration.maxConnections else { return false }
            open[id] = channel
            return true
        }
        guard admitted else {
            refusedConnections.withLockedValue { $0 += 1 }
            logger.warning("too many connections", metadata: ["client": "\(channel.remoteAddress?.ipAddress ?? "?")"])
            try channel.pipeline.syncOperations.addHandler(RefuseConnectionHandler(reply: .tooManyConnections(configuration.session.hostname)))
            return
        }
        channel.closeFuture.whenComplete { [connections] _ in
            _ = connections.withLockedValue { $0.removeValue(forKey: id) }
        }
        guard let peer = channel.remoteAddress?.ipAddress else {
            // The peer was gone before it was accepted (getpeername failed: a proxy's health check
            // that connected and reset at once). Nothing to trust, greet or log above debug.
            logger.debug("connection closed before it was accepted")
            try channel.pipeline.syncOperations.addHandler(CloseOnActiveHandler())
            return
        }
        if configuration.trustedProxies.containsAddress(peer) {
            // A trusted proxy: nothing is said until its PROXY header names the client.
            try channel.pipeline.syncOperations.addHandler(
                ProxyHeaderHandler(timeLimit: configuration.proxyHeaderTimeout, logger: logger) { [self] header in
                    sessionHandlers(proxyHeader: header)
                })
        } else {
            try channel.pipeline.syncOperations.addHandlers(sessionHandlers(proxyHeader: nil))
        }
    }

    /// The handlers of one SMTP session: the idle timeout, then the session itself.
    private func sessionHandlers(proxyHeader: ProxyHeader?) -> [any ChannelHandler] {
        [
            IdleStateHandler(readTimeout: configuration.idleTimeout),
            SMTPServerHandler(
                configuration: configuration.session, delegate: delegate, tlsContext: tlsContext, logger: logger,
                proxyHeader: proxyHeader),
        ]
    }
}

/// Answers a connection over the limit with 421 and closes it.
final class RefuseConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    private let reply: SMTPReply

    init(reply: SMTPReply) { self.reply = reply }

    func channelActive(context: ChannelHandlerContext) {
        var buffer = context.channel.allocator.buffer(capacity: 96)
        reply.write(into: &buffer)
        let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in loopBound.value.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}

/// Closes a connection as soon as it is active, saying nothing.
final class CloseOnActiveHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { context.close(promise: nil) }
    }

    func channelActive(context: ChannelHandlerContext) {
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}

    func errorCaught(context: ChannelHandlerContext, error: any Error) {}
}
