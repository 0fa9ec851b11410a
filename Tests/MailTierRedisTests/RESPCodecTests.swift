import MailTierRedis
import NIOCore
import NIOEmbedded
import Testing

/// hiredis as the codec, without a server: every reply type, split at every byte, through
/// the channel handler; and the faults that must close the connection instead of crashing.
@Suite struct RESPCodecTests {
    /// RESP2 on the wire → the reply it decodes to.
    static let fixtures: [(wire: String, reply: RedisReply)] = [
        ("+OK\r\n", .simpleString("OK")),
        ("+\r\n", .simpleString("")),
        ("-ERR wrong number of arguments\r\n", .error("ERR wrong number of arguments")),
        (":0\r\n", .integer(0)),
        (":-7\r\n", .integer(-7)),
        (":9223372036854775807\r\n", .integer(.max)),
        ("$3\r\nfoo\r\n", .bulkString(ByteBuffer(string: "foo"))),
        ("$0\r\n\r\n", .bulkString(ByteBuffer())),
        ("$6\r\na\r\nb\r\n\r\n", .bulkString(ByteBuffer(string: "a\r\nb\r\n"))),  // binary-safe
        ("$-1\r\n", .null),
        ("*-1\r\n", .null),
        ("*0\r\n", .array([])),
        (
            "*4\r\n:1\r\n*2\r\n$1\r\na\r\n*2\r\n$-1\r\n-ERR inner\r\n+x\r\n*0\r\n",
            .array([
                .integer(1), .array([.bulkString(ByteBuffer(string: "a")), .array([.null, .error("ERR inner")])]),
                .simpleString("x"), .array([]),
            ])
        ),
    ]

    static var stream: ByteBuffer { ByteBuffer(string: fixtures.map(\.wire).joined()) }

    @Test func decodesEveryReplyType() throws {
        for fixture in Self.fixtures {
            let decoder = RESPDecoder()
            try decoder.feed(ByteBuffer(string: fixture.wire))
            #expect(try decoder.replies() == [fixture.reply], "\(fixture.wire.debugDescription)")
        }
    }

    @Test func decodesOneByteAtATime() throws {
        let decoder = RESPDecoder()
        var replies: [RedisReply] = []
        for byte in Self.stream.readableBytesView {
            try decoder.feed(ByteBuffer(bytes: [byte]))
            replies += try decoder.replies()
        }
        #expect(replies == Self.fixtures.map(\.reply))
    }

    @Test func encodesCommandsAsArraysOfBulkStrings() {
        #expect(String(buffer: RESPEncoder.encode(["SET", "k", "v"])) == "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n")
        #expect(String(buffer: RESPEncoder.encode(["PING"])) == "*1\r\n$4\r\nPING\r\n")
        // CR LF in a value is data, not a second command.
        #expect(String(buffer: RESPEncoder.encode(["ECHO", "a\r\nDEL x", ""])) == "*3\r\n$4\r\nECHO\r\n$8\r\na\r\nDEL x\r\n$0\r\n\r\n")
    }

    @Test func encodedCommandsDecodeBackToTheirArguments() throws {
        let binary = ByteBuffer(bytes: Array(0...255) + Array(0...255))
        let commands: [[ByteBuffer]] = [
            ["SET", "key", "value"].map { ByteBuffer(string: $0) },
            [ByteBuffer(string: "SET"), ByteBuffer(string: "k"), binary],
            [ByteBuffer(string: "ECHO"), ByteBuffer()],
            [ByteBuffer(string: "ECHO"), ByteBuffer(repeating: 0x78, count: 1 << 20)],
        ]
        for arguments in commands {
            let decoder = RESPDecoder()
            try decoder.feed(RESPEncoder.encode(arguments))
            #expect(try decoder.replies() == [.array(arguments.map { .bulkString($0) })])
        }
    }

    @Test func largeBulkStringThroughTheHandler() throws {
        let payload = ByteBuffer(bytes: (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        var wire = ByteBuffer(string: "$\(payload.readableBytes)\r\n")
        wire.writeImmutableBuffer(payload)
        wire.writeString("\r\n")
        let connection = try Connection()
        let reply = try connection.request()
        while wire.readableBytes > 0 {
            try connection.channel.writeInbound(wire.readSlice(length: min(65_536, wire.readableBytes))!)
        }
        #expect(try Self.result(reply)?.get() == .bulkString(payload))
    }

    /// The whole stream split in two at every byte, through a fresh handler each time; the
    /// replies complete the commands in the order they were written.
    @Test func handlerSplitAtEveryByte() throws {
        let stream = Self.stream
        for split in 0...stream.readableBytes {
            let connection = try Connection()
            let replies = try (0..<Self.fixtures.count).map { _ in try connection.request() }
            try connection.channel.writeInbound(stream.getSlice(at: 0, length: split)!)
            try connection.channel.writeInbound(stream.getSlice(at: split, length: stream.readableBytes - split)!)
            let results = try replies.map { try Self.result($0)?.get() }
            #expect(results == Self.fixtures.map(\.reply), "split at \(split)")
            #expect(connection.channel.isActive)
        }
    }

    @Test func handlerWritesTheEncodedCommand() throws {
        let connection = try Connection()
        _ = try connection.request(["GET", "key"])
        #expect(try connection.channel.readOutbound(as: ByteBuffer.self).map { String(buffer: $0) } == "*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n")
    }

    // MARK: Faults close the connection and fail every outstanding command

    static let garbage: [(name: String, wire: String, limits: RESPDecoder.Limits)] = [
        ("unknown type byte", "?what\r\n", .init()),
        ("bad integer", ":12x\r\n", .init()),
        ("bad bulk length", "$abc\r\n", .init()),
        ("negative array length", "*-5\r\n", .init()),
        ("array over the element limit", "*5\r\n", .init(maxArrayElements: 4)),
        ("array announcing 2^31-1 elements", "*2147483647\r\n", .init()),
        ("nesting deeper than hiredis's 7", String(repeating: "*1\r\n", count: 9) + ":1\r\n", .init()),
        ("bulk over the size limit", "$200\r\n" + String(repeating: "x", count: 150), .init(maxReplyBytes: 100)),
    ]

    @Test(arguments: 0..<garbage.count) func garbageFailsOutstandingCommandsAndCloses(index: Int) throws {
        let fixture = Self.garbage[index]
        let connection = try Connection(limits: fixture.limits)
        let first = try connection.request()
        let second = try connection.request()
        try connection.channel.writeInbound(ByteBuffer(string: fixture.wire))
        for reply in [first, second] {
            #expect(throws: RedisClientError.self, "\(fixture.name)") { try Self.result(reply)?.get() }
            #expect((Self.error(reply))?.code == .protocolError, "\(fixture.name)")
        }
        #expect(!connection.channel.isActive, "\(fixture.name)")
        // A command written afterwards fails at once.
        let later = try connection.request()
        #expect(Self.result(later) != nil)
        #expect(throws: RedisClientError.self) { try Self.result(later)?.get() }
    }

    @Test func arrayAtTheElementLimitIsFine() throws {
        let connection = try Connection(limits: .init(maxArrayElements: 4))
        let reply = try connection.request()
        try connection.channel.writeInbound(ByteBuffer(string: "*4\r\n:1\r\n:2\r\n:3\r\n:4\r\n"))
        #expect(try Self.result(reply)?.get() == .array([.integer(1), .integer(2), .integer(3), .integer(4)]))
    }

    @Test func replyNobodyAskedForCloses() throws {
        let connection = try Connection()
        let reply = try connection.request()
        try connection.channel.writeInbound(ByteBuffer(string: "+OK\r\n+SURPRISE\r\n"))
        #expect(try Self.result(reply)?.get() == .simpleString("OK"))
        #expect(!connection.channel.isActive)
    }

    @Test func commandTimeoutFailsEverythingAndCloses() throws {
        let connection = try Connection(commandTimeout: .milliseconds(500))
        let first = try connection.request()
        connection.channel.embeddedEventLoop.advanceTime(by: .milliseconds(300))
        let second = try connection.request()
        #expect(Self.result(first) == nil)
        connection.channel.embeddedEventLoop.advanceTime(by: .milliseconds(250))
        #expect(Self.error(first)?.code == .timeout)
        #expect(Self.error(second)?.code == .timeout)
        #expect(!connection.channel.isActive)
    }

    @Test func answeredCommandsDoNotTimeOut() throws {
        let connection = try Connection(commandTimeout: .milliseconds(500))
        let reply = try connection.request()
        try connection.channel.writeInbound(ByteBuffer(string: ":1\r\n"))
        connection.channel.embeddedEventLoop.advanceTime(by: .seconds(5))
        #expect(try Self.result(reply)?.get() == .integer(1))
        #expect(connection.channel.isActive)
    }

    @Test func closeFailsOutstandingCommands() throws {
        let connection = try Connection()
        let reply = try connection.request()
        try connection.channel.close().wait()
        #expect(Self.error(reply)?.code == .connectionClosed)
    }

    @Test func checkedThrowsErrorReplies() {
        #expect(throws: RedisClientError(.serverError, "ERR nope")) { try RedisReply.error("ERR nope").checked() }
        #expect(throws: Never.self) { try RedisReply.null.checked() }
    }

    // MARK: Helpers

    /// An `EmbeddedChannel` with a `RedisChannelHandler`.
    struct Connection {
        let channel: EmbeddedChannel

        init(commandTimeout: TimeAmount? = nil, limits: RESPDecoder.Limits = .init()) throws {
            channel = EmbeddedChannel(handler: RedisChannelHandler(commandTimeout: commandTimeout, limits: limits))
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 6379)).wait()
        }

        func request(_ arguments: [String] = ["PING"]) throws -> EventLoopFuture<RedisReply> {
            let promise = channel.eventLoop.makePromise(of: RedisReply.self)
            channel.writeAndFlush(RedisRequest(encoded: RESPEncoder.encode(arguments), promise: promise), promise: nil)
            return promise.futureResult
        }
    }

    /// The result of a future on the embedded loop, nil while it is pending.
    static func result(_ future: EventLoopFuture<RedisReply>) -> Result<RedisReply, any Error>? {
        var result: Result<RedisReply, any Error>?
        future.assumeIsolated().whenComplete { result = $0 }
        return result
    }

    static func error(_ future: EventLoopFuture<RedisReply>) -> RedisClientError? {
        guard case .failure(let error) = result(future) else { return nil }
        return error as? RedisClientError
    }
}

extension RedisReply {
    /// Readable `#expect` failures.
    static func bulk(_ text: String) -> RedisReply { .bulkString(ByteBuffer(string: text)) }
}
