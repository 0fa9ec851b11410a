import Logging
import NIOCore

/// The first handler of a connection from a trusted proxy: reads the PROXY header (v1 or v2) that
/// must open the stream, then puts the session's handlers behind itself — built by
/// `makeSessionHandlers` with the header, so the session sees the real client — hands them the
/// bytes that followed the header, and leaves the pipeline.
///
/// Nothing is sent before the header is complete: a malformed header, or none within `timeLimit`,
/// closes the connection without a banner. A proxy's health check that closes before or right
/// after its header (haproxy sends a v2 LOCAL header, then closes) logs only at debug level.
final class ProxyHeaderHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    private enum State {
        case waiting
        case done
    }

    private var state = State.waiting
    private var buffer = ByteBuffer()
    private var timer: Scheduled<Void>?
    private let timeLimit: TimeAmount
    private let logger: Logger
    private let makeSessionHandlers: (ProxyHeader) -> [any ChannelHandler]

    init(timeLimit: TimeAmount, logger: Logger, makeSessionHandlers: @escaping (ProxyHeader) -> [any ChannelHandler]) {
        self.timeLimit = timeLimit
        self.logger = logger
        self.makeSessionHandlers = makeSessionHandlers
    }

    func handlerAdded(context: ChannelHandlerContext) {
        if context.channel.isActive { startTimer(context: context) }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        startTimer(context: context)
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        if case .waiting = state {
            state = .done
            timer?.cancel()
            logger.debug(
                "connection closed before its PROXY header was complete",
                metadata: ["proxy": "\(context.channel.remoteAddress.map { "\($0)" } ?? "?")", "octets": "\(buffer.readableBytes)"])
        }
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .waiting = state else { return }
        var bytes = unwrapInboundIn(data)
        buffer.writeBuffer(&bytes)
        let header: ProxyHeader
        do {
            guard let parsed = try ProxyHeader.parse(&buffer) else { return }
            header = parsed
        } catch {
            refuse("malformed PROXY header, closing", reason: "\(error)", context: context)
            return
        }
        state = .done
        timer?.cancel()
        timer = nil
        do {
            try context.pipeline.syncOperations.addHandlers(makeSessionHandlers(header), position: .after(self))
        } catch {
            logger.error("cannot start the session", metadata: ["error": "\(error)"])
            context.close(promise: nil)
            return
        }
        if buffer.readableBytes > 0 {
            let leftover = buffer
            buffer = ByteBuffer()
            context.fireChannelRead(wrapInboundOut(leftover))
        }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if case .waiting = state, event is SMTPServerShutdownEvent {
            // No session yet: nothing to finish, nothing to say.
            state = .done
            context.close(promise: nil)
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        guard case .waiting = state else {
            context.fireErrorCaught(error)
            return
        }
        // A proxy's health check may reset the connection instead of closing it.
        logger.debug("connection error before the PROXY header", metadata: ["error": "\(error)"])
        state = .done
        context.close(promise: nil)
    }

    private func startTimer(context: ChannelHandlerContext) {
        guard timer == nil, case .waiting = state else { return }
        timer = context.eventLoop.assumeIsolated().scheduleTask(in: timeLimit) { [self] in
            guard case .waiting = state else { return }
            refuse("no PROXY header in time, closing", reason: "\(timeLimit.nanoseconds / 1_000_000) ms", context: context)
        }
    }

    private func refuse(_ message: Logger.Message, reason: String, context: ChannelHandlerContext) {
        state = .done
        timer?.cancel()
        timer = nil
        logger.warning(message, metadata: ["proxy": "\(context.channel.remoteAddress.map { "\($0)" } ?? "?")", "reason": "\(reason)"])
        context.close(promise: nil)
    }
}
