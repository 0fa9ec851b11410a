import CHiredis
import NIOCore

#if canImport(Glibc)
import Glibc
#endif

// MARK: - Replies

/// One RESP2 reply (the only protocol hiredis 0.14 speaks; `HELLO 3` is not used).
public enum RedisReply: Sendable, Hashable {
    /// `+OK` — a status line.
    case simpleString(String)
    /// `-ERR …` — an error reply; the command failed, the connection is fine.
    case error(String)
    /// `:42`
    case integer(Int64)
    /// `$3 foo` — binary-safe.
    case bulkString(ByteBuffer)
    /// `*2 …` — may nest.
    case array([RedisReply])
    /// `$-1` or `*-1`: no value.
    case null

    /// The text of a simple or bulk string (bulk decoded as UTF-8).
    public var string: String? {
        switch self {
        case .simpleString(let text): text
        case .bulkString(let bytes): String(buffer: bytes)
        case .error, .integer, .array, .null: nil
        }
    }

    /// The value of an integer reply, or of a bulk string holding a decimal integer.
    public var integer: Int64? {
        switch self {
        case .integer(let value): value
        case .bulkString(let bytes): Int64(String(buffer: bytes))
        case .simpleString, .error, .array, .null: nil
        }
    }

    /// The elements of an array reply.
    public var array: [RedisReply]? {
        if case .array(let elements) = self { return elements }
        return nil
    }

    /// This reply, or `RedisClientError.serverError` carrying the message of an error reply.
    public func checked() throws(RedisClientError) -> RedisReply {
        if case .error(let message) = self { throw RedisClientError(.serverError, message) }
        return self
    }
}

extension RedisReply: CustomStringConvertible {
    public var description: String {
        switch self {
        case .simpleString(let text): "+\(text)"
        case .error(let text): "-\(text)"
        case .integer(let value): ":\(value)"
        case .bulkString(let bytes): "$\(bytes.readableBytes)"
        case .array(let elements): "*[\(elements.map(\.description).joined(separator: ", "))]"
        case .null: "(nil)"
        }
    }
}

// MARK: - Errors

/// What went wrong talking to Redis. The description never contains a password or command
/// arguments: only what Redis said and what the client did.
public struct RedisClientError: Error, Sendable, Hashable, CustomStringConvertible {
    public struct Code: Sendable, Hashable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }
        public var description: String { name }

        /// TCP connect failed or timed out.
        public static let connectionFailed = Code("connection failed")
        /// The connection closed with commands outstanding.
        public static let connectionClosed = Code("connection closed")
        /// No reply within the command timeout; the connection is closed.
        public static let timeout = Code("timeout")
        /// The bytes from the server are not RESP2 (or a reply is over the size limits);
        /// the connection is closed.
        public static let protocolError = Code("protocol error")
        /// `AUTH` was refused, or the server wants `AUTH` and no password was configured.
        public static let authenticationFailed = Code("authentication failed")
        /// `SELECT` (or the first `PING`) was refused.
        public static let handshakeFailed = Code("handshake failed")
        /// Reconnecting is backed off after a recent failure; no attempt was made.
        public static let unavailable = Code("unavailable")
        /// `shutdown()` was called.
        public static let shutDown = Code("shut down")
        /// The server answered the command with an error reply.
        public static let serverError = Code("server error")
        /// The reply had a shape the caller did not expect.
        public static let unexpectedReply = Code("unexpected reply")
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String = "") {
        self.code = code
        self.message = message
    }

    public var description: String { message.isEmpty ? "redis: \(code)" : "redis: \(code): \(message)" }
}

// MARK: - Encoding

/// Encodes commands with hiredis's `redisFormatCommandArgv` (a RESP array of bulk strings:
/// binary-safe, so no value can inject a second command).
public enum RESPEncoder {
    /// `arguments` as one RESP command, appended to `buffer`.
    public static func encode(_ arguments: [ByteBuffer], into buffer: inout ByteBuffer) {
        precondition(!arguments.isEmpty, "a Redis command needs at least its name")
        // One contiguous copy of every argument; argv points into it.
        var joined: [UInt8] = []
        joined.reserveCapacity(arguments.reduce(1) { $0 + $1.readableBytes })
        var offsets: [Int] = []
        var lengths: [Int] = []
        for argument in arguments {
            offsets.append(joined.count)
            lengths.append(argument.readableBytes)
            joined.append(contentsOf: argument.readableBytesView)
        }
        joined.append(0)  // never an empty allocation, so the base address is not nil
        joined.withUnsafeBufferPointer { bytes in
            let base = UnsafeRawPointer(bytes.baseAddress!).assumingMemoryBound(to: CChar.self)
            var argv: [UnsafePointer<CChar>?] = offsets.map { base + $0 }
            var argvlen: [Int] = lengths
            var target: UnsafeMutablePointer<CChar>? = nil
            let count = argv.withUnsafeMutableBufferPointer { argv in
                argvlen.withUnsafeMutableBufferPointer { argvlen in
                    redisFormatCommandArgv(&target, Int32(arguments.count), argv.baseAddress, argvlen.baseAddress)
                }
            }
            guard count >= 0, let target else { fatalError("redisFormatCommandArgv: out of memory") }
            defer { redisFreeCommand(target) }
            buffer.writeBytes(UnsafeRawBufferPointer(start: target, count: Int(count)))
        }
    }

    /// `arguments` as one RESP command.
    public static func encode(_ arguments: [ByteBuffer]) -> ByteBuffer {
        var buffer = ByteBuffer()
        encode(arguments, into: &buffer)
        return buffer
    }

    /// `arguments` (UTF-8) as one RESP command.
    public static func encode(_ arguments: [String]) -> ByteBuffer {
        encode(arguments.map { ByteBuffer(string: $0) })
    }
}

// MARK: - Decoding

/// hiredis's own reply constructors, read once from a throwaway reader (hiredis does not
/// export them). Plain C function pointers: immutable and safe to share.
private let hiredisDefaultFunctions: redisReplyObjectFunctions = {
    guard let reader = redisReaderCreate() else { fatalError("redisReaderCreate: out of memory") }
    defer { redisReaderFree(reader) }
    return reader.pointee.fn.pointee
}()

/// Decodes RESP2 replies with hiredis's `redisReader`: feed bytes as they arrive, take
/// whole replies out. Not thread-safe and not `Sendable` (it owns C memory): one instance
/// lives inside one channel handler, on its event loop.
///
/// Limits, so that a broken or hostile peer cannot exhaust memory: a reply (top level,
/// everything nested included) may not take more than `maxReplyBytes` bytes on the wire,
/// and no array may announce more than `maxArrayElements` elements (hiredis would allocate
/// the element vector as soon as it reads the header). Nesting is limited by hiredis to 7.
/// After any error the decoder stays failed.
public final class RESPDecoder {
    public struct Limits: Sendable, Equatable {
        public var maxReplyBytes: Int
        public var maxArrayElements: Int32

        public init(maxReplyBytes: Int = 64 * 1024 * 1024, maxArrayElements: Int32 = 1_048_576) {
            self.maxReplyBytes = maxReplyBytes
            self.maxArrayElements = maxArrayElements
        }
    }

    private let reader: UnsafeMutablePointer<redisReader>
    /// The constructors the reader calls; must outlive it.
    private let functions: UnsafeMutablePointer<redisReplyObjectFunctions>
    private let limits: Limits
    /// Bytes fed since the last whole reply came out.
    private var bytesInReply = 0
    private var failure: RedisClientError?

    public init(limits: Limits = Limits()) {
        self.limits = limits
        functions = .allocate(capacity: 1)
        functions.initialize(to: hiredisDefaultFunctions)
        // A C function pointer cannot capture the limit: it travels in the reader's privdata,
        // which hiredis copies into every read task.
        functions.pointee.createArray = { task, elements in
            guard let task, let limit = task.pointee.privdata?.load(as: Int32.self), elements >= 0, elements <= limit else { return nil }
            return hiredisDefaultFunctions.createArray?(task, elements)
        }
        guard let reader = redisReaderCreateWithFunctions(functions) else { fatalError("redisReaderCreate: out of memory") }
        self.reader = reader
        let limit = UnsafeMutablePointer<Int32>.allocate(capacity: 1)
        limit.initialize(to: limits.maxArrayElements)
        reader.pointee.privdata = UnsafeMutableRawPointer(limit)
    }

    deinit {
        let limit = reader.pointee.privdata
        redisReaderFree(reader)  // frees a partly built reply with functions.freeObject
        limit?.deallocate()
        functions.deinitialize(count: 1)
        functions.deallocate()
    }

    /// Appends bytes from the server.
    public func feed(_ bytes: ByteBuffer) throws(RedisClientError) {
        if let failure { throw failure }
        bytesInReply += bytes.readableBytes
        guard bytesInReply <= limits.maxReplyBytes else {
            throw fail("reply larger than \(limits.maxReplyBytes) bytes")
        }
        let status = bytes.withUnsafeReadableBytes { raw -> Int32 in
            guard let base = raw.baseAddress else { return REDIS_OK }
            return redisReaderFeed(reader, base.assumingMemoryBound(to: CChar.self), raw.count)
        }
        if status != REDIS_OK { throw fail(readerError()) }
    }

    /// The next whole reply, or nil when more bytes are needed.
    public func next() throws(RedisClientError) -> RedisReply? {
        if let failure { throw failure }
        var object: UnsafeMutableRawPointer? = nil
        guard redisReaderGetReply(reader, &object) == REDIS_OK else { throw fail(readerError()) }
        guard let object else { return nil }
        defer { freeReplyObject(object) }
        bytesInReply = reader.pointee.len - reader.pointee.pos
        return Self.convert(object.assumingMemoryBound(to: redisReply.self))
    }

    /// Every whole reply now buffered.
    public func replies() throws(RedisClientError) -> [RedisReply] {
        var replies: [RedisReply] = []
        while let reply = try next() { replies.append(reply) }
        return replies
    }

    private func readerError() -> String {
        let text = withUnsafeBytes(of: &reader.pointee.errstr) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        if reader.pointee.err == REDIS_ERR_OOM {
            return "array of more than \(limits.maxArrayElements) elements, or out of memory"
        }
        return text.isEmpty ? "unreadable reply" : text
    }

    private func fail(_ message: String) -> RedisClientError {
        let error = RedisClientError(.protocolError, message)
        failure = error
        return error
    }

    private static func convert(_ reply: UnsafeMutablePointer<redisReply>) -> RedisReply {
        let value = reply.pointee
        func bytes() -> UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: value.str, count: value.str == nil ? 0 : value.len) }
        switch value.type {
        case REDIS_REPLY_STATUS: return .simpleString(String(decoding: bytes(), as: UTF8.self))
        case REDIS_REPLY_ERROR: return .error(String(decoding: bytes(), as: UTF8.self))
        case REDIS_REPLY_INTEGER: return .integer(Int64(value.integer))
        case REDIS_REPLY_STRING: return .bulkString(ByteBuffer(bytes: bytes()))
        case REDIS_REPLY_NIL: return .null
        case REDIS_REPLY_ARRAY:
            var elements: [RedisReply] = []
            elements.reserveCapacity(value.elements)
            for index in 0..<value.elements {
                guard let element = value.element[index] else { elements.append(.null); continue }
                elements.append(convert(element))
            }
            return .array(elements)
        default: return .error("unknown hiredis reply type \(value.type)")  // not produced by 0.14's reader
        }
    }
}
