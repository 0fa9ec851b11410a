import NIOCore

/// One command on its way to Redis: its encoded bytes and the promise its reply completes.
public struct RedisRequest: Sendable {
    public var encoded: ByteBuffer
    public var promise: EventLoopPromise<RedisReply>

    public init(encoded: ByteBuffer, promise: EventLoopPromise<RedisReply>) {
        self.encoded = encoded
        self.promise = promise
    }
}

/// Pipelining over one connection: each written `RedisRequest` joins a FIFO of promises,
/// and each whole reply (decoded by hiredis, see `RESPDecoder`) completes the oldest one —
/// Redis answers the commands of one connection in the order it received them.
///
/// Any fault — a reply that is not RESP2, a reply nobody asked for, a command with no reply
/// within `commandTimeout`, an I/O error — fails every outstanding command and closes the
/// connection: after a missed reply the FIFO can no longer be trusted. Commands written
/// after that fail at once. The decoder and its C memory live and die with this handler,
/// on its event loop.
public final class RedisChannelHandler: ChannelDuplexHandler {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundIn = RedisRequest
    public typealias OutboundOut = ByteBuffer

    private struct Outstanding {
        var promise: EventLoopPromise<RedisReply>
        var timeout: Scheduled<Void>?
    }

    private let decoder: RESPDecoder
    private let commandTimeout: TimeAmount?
    private var outstanding = CircularBuffer<Outstanding>()
    /// Set once the connection is unusable.
    private var failure: RedisClientError?

    /// - Parameter commandTimeout: how long a command may wait for its reply; nil waits forever.
    public init(commandTimeout: TimeAmount? = .seconds(1), limits: RESPDecoder.Limits = .init()) {
        self.decoder = RESPDecoder(limits: limits)
        self.commandTimeout = commandTimeout
    }

    public func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let request = unwrapOutboundIn(data)
        if let failure {
            request.promise.fail(failure)
            promise?.fail(failure)
            return
        }
        var entry = Outstanding(promise: request.promise, timeout: nil)
        if let commandTimeout {
            entry.timeout = context.eventLoop.assumeIsolated().scheduleTask(in: commandTimeout) { [self] in
                self.failAll(context: context, RedisClientError(.timeout, "no reply within \(commandTimeout)"))
            }
        }
        outstanding.append(entry)
        context.write(wrapOutboundOut(request.encoded), promise: promise)
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard failure == nil else { return }
        do {
            try decoder.feed(unwrapInboundIn(data))
            while let reply = try decoder.next() {
                guard let entry = outstanding.popFirst() else {
                    throw RedisClientError(.protocolError, "reply without a command: \(reply)")
                }
                entry.timeout?.cancel()
                entry.promise.succeed(reply)
            }
        } catch {
            failAll(context: context, error as? RedisClientError ?? RedisClientError(.protocolError, "\(error)"))
        }
    }

    public func channelInactive(context: ChannelHandlerContext) {
        failAll(context: context, RedisClientError(.connectionClosed, "connection closed by the server"), close: false)
        context.fireChannelInactive()
    }

    public func errorCaught(context: ChannelHandlerContext, error: Error) {
        failAll(context: context, RedisClientError(.connectionClosed, "\(error)"))
    }

    public func handlerRemoved(context: ChannelHandlerContext) {
        failAll(context: context, RedisClientError(.connectionClosed, "handler removed"), close: false)
    }

    /// Marks the connection failed, fails every outstanding command (oldest first) and closes.
    private func failAll(context: ChannelHandlerContext, _ error: RedisClientError, close: Bool = true) {
        if failure == nil { failure = error }
        while let entry = outstanding.popFirst() {
            entry.timeout?.cancel()
            entry.promise.fail(error)
        }
        if close { context.close(promise: nil) }
    }
}
