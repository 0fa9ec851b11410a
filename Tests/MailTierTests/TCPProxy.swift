import NIOCore
import NIOPosix
import Synchronization

/// A TCP forwarder on 127.0.0.1 that a test can stop and start again on the same port: a way
/// to take a shared service (the test PostgreSQL) away from one client without stopping it.
/// `stop()` closes the listener and every forwarded connection; until `start()` runs again, a
/// connection to the port is refused.
final class TCPProxy: Sendable {
    let upstreamHost: String
    let upstreamPort: Int
    private let state = Mutex<(port: Int, listener: (any Channel)?, connections: [any Channel], generation: Int)>((0, nil, [], 0))

    init(to host: String, port: Int) {
        upstreamHost = host
        upstreamPort = port
    }

    /// The port it listens on (0 before the first `start()`).
    var port: Int { state.withLock { $0.port } }

    /// Listens (on a free port the first time, then on the same port again).
    func start() async throws {
        let (host, upstreamPort) = (upstreamHost, self.upstreamPort)
        let generation = state.withLock { $0.generation }
        let listener = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { [self] inbound in
                // The accepted channel is registered (and read) only once this future succeeds;
                // when it fails, NIO closes it.
                ClientBootstrap(group: inbound.eventLoop).connect(host: host, port: upstreamPort).flatMap { outbound in
                    // A `stop()` that ran while this connection was being made has not seen it.
                    let current = self.state.withLock { state -> Bool in
                        guard state.generation == generation else { return false }
                        state.connections += [inbound, outbound]
                        return true
                    }
                    guard current else {
                        outbound.close(promise: nil)
                        return inbound.eventLoop.makeFailedFuture(ChannelError.ioOnClosedChannel)
                    }
                    return outbound.pipeline.addHandler(Relay(to: inbound)).flatMap {
                        inbound.pipeline.addHandler(Relay(to: outbound, closesWithoutPartner: true))
                    }.flatMapThrowing {
                        // The upstream went away before its relay was there to notice.
                        guard outbound.isActive else { throw ChannelError.ioOnClosedChannel }
                    }
                }
            }
            .bind(host: "127.0.0.1", port: port).get()
        state.withLock {
            $0.listener = listener
            $0.port = listener.localAddress?.port ?? 0
        }
    }

    /// Stops listening and cuts every forwarded connection.
    func stop() async {
        let (listener, connections) = state.withLock { state in
            defer {
                state.listener = nil
                state.connections = []
                state.generation += 1
            }
            return (state.listener, state.connections)
        }
        try? await listener?.close()
        for connection in connections { try? await connection.close() }
    }

    /// Writes what one side reads to the other; closes the other when one closes.
    private final class Relay: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let partner: any Channel
        /// The accepted side: active (registered) only after the upstream connected, so an
        /// inactive partner then means it is gone.
        let closesWithoutPartner: Bool

        init(to partner: any Channel, closesWithoutPartner: Bool = false) {
            self.partner = partner
            self.closesWithoutPartner = closesWithoutPartner
        }

        func channelActive(context: ChannelHandlerContext) {
            // Registered after its partner closed (stopped meanwhile): nothing to relay to. (The
            // upstream side gets channelActive after its relay is added, before the accepted
            // side is registered: it does not check.)
            if closesWithoutPartner, !partner.isActive { context.close(promise: nil) }
            context.fireChannelActive()
        }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            partner.writeAndFlush(unwrapInboundIn(data), promise: nil)
        }

        func channelInactive(context: ChannelHandlerContext) {
            partner.close(promise: nil)
            context.fireChannelInactive()
        }

        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            context.close(promise: nil)
        }
    }
}
