import Crypto
import Logging
import MailTier
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import ServiceLifecycle

/// A Redis client on one pipelined connection: NIO owns the socket, hiredis is the codec
/// (`RedisChannelHandler`). Safe to share: any number of tasks may send at once, and their
/// commands are pipelined on the one connection.
///
/// Never hangs a caller: connecting is bounded by `connectTimeout` (plus the handshake,
/// bounded by `commandTimeout`) and each command by `commandTimeout`. The connection is made
/// on the first command and again on the first command after it was lost; after a failed
/// attempt, commands fail at once with `.unavailable` until a backoff (doubling from
/// `minimumBackoff` to `maximumBackoff`) has passed. Commands are never retried by the
/// client (an `INCR` must not count twice): the caller sees the error.
///
/// On connecting it sends `AUTH [user] password` when the endpoint has a password,
/// `SELECT db` when the database is not 0, and `PING`, pipelined.
///
/// A `Service`: `run()` waits for graceful shutdown, then shuts the client down. Or call
/// `shutdown()` yourself.
public final class RedisClient: Sendable, Service {
    public struct Configuration: Sendable {
        public var endpoint: RedisEndpoint
        public var connectTimeout: TimeAmount
        public var commandTimeout: TimeAmount
        public var minimumBackoff: TimeAmount
        public var maximumBackoff: TimeAmount
        public var limits: RESPDecoder.Limits

        public init(
            endpoint: RedisEndpoint, connectTimeout: TimeAmount = .seconds(1), commandTimeout: TimeAmount = .seconds(1),
            minimumBackoff: TimeAmount = .milliseconds(100), maximumBackoff: TimeAmount = .seconds(2),
            limits: RESPDecoder.Limits = .init()
        ) {
            self.endpoint = endpoint
            self.connectTimeout = connectTimeout
            self.commandTimeout = commandTimeout
            self.minimumBackoff = minimumBackoff
            self.maximumBackoff = maximumBackoff
            self.limits = limits
        }
    }

    private enum State {
        /// No connection; the next command may try to connect from `retryAt` on.
        case idle(retryAt: NIODeadline, backoff: TimeAmount, lastError: RedisClientError?)
        case connecting(EventLoopFuture<Channel>, backoff: TimeAmount)
        case connected(Channel)
        case shutDown
    }

    private enum Step {
        case use(Channel)
        case wait(EventLoopFuture<Channel>)
        case connect(EventLoopPromise<Channel>, backoff: TimeAmount)
        case fail(RedisClientError)
    }

    public let configuration: Configuration
    private let eventLoop: any EventLoop
    private let logger: Logger
    private let state: NIOLockedValueBox<State>

    public init(configuration: Configuration, eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, logger: Logger) {
        self.configuration = configuration
        self.eventLoop = eventLoopGroup.next()
        self.logger = logger
        self.state = NIOLockedValueBox(.idle(retryAt: .uptimeNanoseconds(0), backoff: configuration.minimumBackoff, lastError: nil))
    }

    /// Sends one command and returns its reply; an error reply is returned as `.error`
    /// (use `.checked()` to throw it). Throws `RedisClientError` when there is no reply.
    public func send(_ arguments: [ByteBuffer]) async throws(RedisClientError) -> RedisReply {
        let channel = try await self.channel()
        return try await Self.send(RESPEncoder.encode(arguments), on: channel)
    }

    /// `send` with UTF-8 arguments.
    public func send(_ arguments: [String]) async throws(RedisClientError) -> RedisReply {
        try await send(arguments.map { ByteBuffer(string: $0) })
    }

    /// `send` with UTF-8 arguments.
    public func send(_ arguments: String...) async throws(RedisClientError) -> RedisReply {
        try await send(arguments)
    }

    /// Runs `script` with `EVALSHA`, and with `EVAL` when the server does not have it cached
    /// (`NOSCRIPT`: a new or restarted server). An error reply is returned as `.error`.
    public func evaluate(_ script: RedisScript, keys: [String], arguments: [String]) async throws(RedisClientError) -> RedisReply {
        let tail = [String(keys.count)] + keys + arguments
        let reply = try await send(["EVALSHA", script.sha1] + tail)
        if case .error(let message) = reply, message.hasPrefix("NOSCRIPT") {
            return try await send(["EVAL", script.source] + tail)
        }
        return reply
    }

    /// Closes the connection; every later command fails with `.shutDown`.
    public func shutdown() async {
        let previous = state.withLockedValue { state in
            defer { state = .shutDown }
            return state
        }
        switch previous {
        case .connected(let channel):
            try? await channel.close()
        case .connecting(let future, _):
            if let channel = try? await future.get() { try? await channel.close() }
        case .idle, .shutDown:
            break
        }
    }

    /// Waits for graceful shutdown, then shuts down: list it before the services that use it
    /// in a `ServiceGroup`, so that it stops after them.
    public func run() async throws {
        try? await gracefulShutdown()
        await shutdown()
    }

    // MARK: Connection

    private func channel() async throws(RedisClientError) -> Channel {
        let step: Step = state.withLockedValue { state in
            switch state {
            case .connected(let channel):
                return .use(channel)
            case .connecting(let future, _):
                return .wait(future)
            case .shutDown:
                return .fail(RedisClientError(.shutDown))
            case .idle(let retryAt, let backoff, let lastError):
                if NIODeadline.now() < retryAt {
                    return .fail(RedisClientError(.unavailable, "reconnecting after: \(lastError?.description ?? "an error")"))
                }
                let promise = eventLoop.makePromise(of: Channel.self)
                state = .connecting(promise.futureResult, backoff: backoff)
                return .connect(promise, backoff: backoff)
            }
        }
        switch step {
        case .use(let channel):
            return channel
        case .fail(let error):
            throw error
        case .wait(let future):
            return try await Self.wait(future)
        case .connect(let promise, let backoff):
            connect(promise, backoff: backoff)
            return try await Self.wait(promise.futureResult)
        }
    }

    private static func wait(_ future: EventLoopFuture<Channel>) async throws(RedisClientError) -> Channel {
        do {
            return try await future.get()
        } catch {
            throw error as? RedisClientError ?? RedisClientError(.connectionFailed, "\(error)")
        }
    }

    private func connect(_ promise: EventLoopPromise<Channel>, backoff: TimeAmount) {
        let configuration = self.configuration
        let endpoint = configuration.endpoint
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(configuration.connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        RedisChannelHandler(commandTimeout: configuration.commandTimeout, limits: configuration.limits))
                }
            }
        let connected = bootstrap.connect(host: endpoint.host, port: endpoint.port)
            .flatMapErrorThrowing { error in
                throw RedisClientError(.connectionFailed, "\(endpoint.host):\(endpoint.port): \(error)")
            }
            .flatMap { channel in
                self.handshake(on: channel).map { channel }.flatMapError { error in
                    channel.close(promise: nil)
                    return channel.eventLoop.makeFailedFuture(error)
                }
            }
        connected.whenComplete { result in
            switch result {
            case .success(let channel):
                let accepted = self.state.withLockedValue { state in
                    guard case .connecting(let future, _) = state, future == promise.futureResult else { return false }
                    state = .connected(channel)
                    return true
                }
                guard accepted else {  // shut down meanwhile
                    channel.close(promise: nil)
                    promise.fail(RedisClientError(.shutDown))
                    return
                }
                channel.closeFuture.whenComplete { _ in self.connectionClosed(channel) }
                self.logger.debug("redis connected", metadata: ["redis": "\(endpoint.host):\(endpoint.port)"])
                promise.succeed(channel)
            case .failure(let failure):
                let error = failure as? RedisClientError ?? RedisClientError(.connectionFailed, "\(failure)")
                self.state.withLockedValue { state in
                    guard case .connecting(let future, _) = state, future == promise.futureResult else { return }
                    let next = TimeAmount.nanoseconds(min(backoff.nanoseconds * 2, configuration.maximumBackoff.nanoseconds))
                    state = .idle(retryAt: .now() + backoff, backoff: next, lastError: error)
                }
                self.logger.debug("redis connection failed", metadata: ["error": "\(error)"])
                promise.fail(error)
            }
        }
    }

    /// A connection that was up is gone: the next command reconnects at once.
    private func connectionClosed(_ channel: Channel) {
        state.withLockedValue { state in
            guard case .connected(let current) = state, current === channel else { return }
            state = .idle(retryAt: .uptimeNanoseconds(0), backoff: configuration.minimumBackoff, lastError: nil)
        }
        logger.debug("redis connection closed")
    }

    private func handshake(on channel: Channel) -> EventLoopFuture<Void> {
        let endpoint = configuration.endpoint
        var commands: [(name: String, arguments: [String])] = []
        if let password = endpoint.password {
            commands.append(("AUTH", endpoint.username.map { ["AUTH", $0, password] } ?? ["AUTH", password]))
        }
        if endpoint.database != 0 { commands.append(("SELECT", ["SELECT", String(endpoint.database)])) }
        commands.append(("PING", ["PING"]))
        let replies = commands.map { command in
            let promise = channel.eventLoop.makePromise(of: RedisReply.self)
            channel.write(
                RedisRequest(encoded: RESPEncoder.encode(command.arguments), promise: promise),
                promise: Self.failing(promise, on: channel))
            return promise.futureResult
        }
        channel.flush()
        let names = commands.map(\.name)
        return EventLoopFuture.whenAllComplete(replies, on: channel.eventLoop).flatMapThrowing { results in
            // The first refusal explains the rest (after a failed AUTH, everything is NOAUTH).
            for (name, result) in zip(names, results) {
                let reply = try result.get()
                guard case .error(let message) = reply else { continue }
                let code: RedisClientError.Code =
                    name == "AUTH" || message.hasPrefix("NOAUTH") || message.hasPrefix("WRONGPASS")
                    ? .authenticationFailed : .handshakeFailed
                throw RedisClientError(code, "\(name) refused: \(message)")
            }
        }
    }

    /// A write promise that fails `reply` when the write fails: a closed channel no longer
    /// reaches the handler, so nothing else would complete it. (A second completion of a
    /// promise is ignored by NIO.)
    private static func failing(_ reply: EventLoopPromise<RedisReply>, on channel: Channel) -> EventLoopPromise<Void> {
        let written = channel.eventLoop.makePromise(of: Void.self)
        written.futureResult.whenFailure { error in
            reply.fail(RedisClientError(.connectionClosed, "\(error)"))
        }
        return written
    }

    private static func send(_ encoded: ByteBuffer, on channel: Channel) async throws(RedisClientError) -> RedisReply {
        let promise = channel.eventLoop.makePromise(of: RedisReply.self)
        channel.writeAndFlush(RedisRequest(encoded: encoded, promise: promise), promise: Self.failing(promise, on: channel))
        do {
            return try await promise.futureResult.get()
        } catch {
            throw error as? RedisClientError ?? RedisClientError(.connectionClosed, "\(error)")
        }
    }
}

/// A Lua script and the SHA1 that `EVALSHA` knows it by.
public struct RedisScript: Sendable, Hashable {
    public let source: String
    public let sha1: String

    public init(_ source: String) {
        self.source = source
        self.sha1 = Insecure.SHA1.hash(data: Array(source.utf8)).map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
    }
}
