import InMemoryLogging
import Logging
import NIOCore
import NIOEmbedded
import SMTPProtocol
import Testing

@testable import SMTPNIO

/// Answers nothing of interest (the tests here run without connection and command checks).
private struct StubDelegate: SMTPServerDelegate {
    func authenticate(login: String, password: String, session: SMTPSessionInfo) async throws -> String? { nil }
    func checkRecipient(_ recipient: ForwardPath, envelope: Envelope, session: SMTPSessionInfo) async -> SMTPReply? { nil }
    func deliver(_ envelope: Envelope, content: ByteBuffer, session: SMTPSessionInfo) async -> SMTPDeliveryOutcome {
        .rejected(.tlsNotAvailable)
    }
    func etrn(domain: String, session: SMTPSessionInfo) async -> SMTPReply { .tlsNotAvailable }
    func atrn(domains: [String], user: String, session: SMTPSessionInfo) async -> SMTPATRNDecision { .reply(.tlsNotAvailable) }
}

private let greeting = "220 mx.example.test ESMTP MailTier\r\n"
private let proxyAddress = try! SocketAddress(ipAddress: "10.0.0.5", port: 40000)

private func sessionConfiguration() -> SMTPServerConfiguration {
    SMTPServerConfiguration(
        hostname: "mx.example.test", maxMessageSize: 1 << 20, maxRecipients: 10, tlsAvailable: false, authRequired: false,
        deliverByMinimum: 86_400)
}

/// Records what reaches the session side of the pipeline once the proxy handler is done.
private final class Recorder: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    var received: [UInt8] = []
    var addedToActiveChannel: Bool?

    func handlerAdded(context: ChannelHandlerContext) { addedToActiveChannel = context.channel.isActive }
    func channelRead(context: ChannelHandlerContext, data: NIOAny) { received += unwrapInboundIn(data).readableBytesView }
}

/// A channel as `SMTPServer` builds it for a trusted proxy: a `ProxyHeaderHandler` whose session is
/// `makeSession(header)`; "connected" from 10.0.0.5:40000.
private struct ProxiedChannel {
    let channel = EmbeddedChannel()
    let logs = InMemoryLogHandler()

    init(timeLimit: TimeAmount = .seconds(5), makeSession: @escaping (ProxyHeader, Logger) -> [any ChannelHandler]) throws {
        var logger = Logger(label: "proxy-test") { [logs] _ in logs }
        logger.logLevel = .trace
        channel.remoteAddress = proxyAddress
        try channel.pipeline.syncOperations.addHandler(
            ProxyHeaderHandler(timeLimit: timeLimit, logger: logger) { header in makeSession(header, logger) })
        try channel.connect(to: proxyAddress).wait()
    }

    /// Everything the server wrote so far.
    func written() throws -> String {
        var text = ""
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { text += String(buffer: buffer) }
        return text
    }

    var proxyHandlerRemoved: Bool { (try? channel.pipeline.syncOperations.handler(type: ProxyHeaderHandler.self)) == nil }

    /// Log entries above debug level.
    var loudEntries: [InMemoryLogHandler.Entry] { logs.entries.filter { $0.level > .debug } }
}

private func smtpSession() -> (ProxyHeader, Logger) -> [any ChannelHandler] {
    { header, logger in
        [SMTPServerHandler(configuration: sessionConfiguration(), delegate: StubDelegate(), tlsContext: nil, logger: logger, proxyHeader: header)]
    }
}

private let v2Header = proxyV2(family: 1, transport: 1, body: proxyV2Inet([203, 0, 113, 7], [192, 0, 2, 1], 56324, 25))
private let v1Header = Array("PROXY TCP4 203.0.113.7 192.0.2.1 56324 25\r\n".utf8)
private let ehloLine = Array("EHLO client.test\r\n".utf8)

@Suite("PROXY header handler")
struct ProxyHeaderHandlerTests {
    @Test("the session starts only once the header is complete, with the header's source; bytes after it reach the session",
          arguments: [v1Header, v2Header])
    func headerThenSession(header: [UInt8]) throws {
        let proxied = try ProxiedChannel(makeSession: smtpSession())
        #expect(try proxied.written() == "")
        try proxied.channel.writeInbound(ByteBuffer(bytes: header + ehloLine))
        let written = try proxied.written()
        #expect(written.hasPrefix(greeting + "250-mx.example.test\r\n"), "\(written.debugDescription)")
        #expect(proxied.proxyHandlerRemoved)
        let opened = try #require(proxied.logs.entries.first { $0.message == "connection opened" })
        #expect(opened.metadata["client"] == "203.0.113.7:56324")
        #expect(opened.metadata["proxy"] == "10.0.0.5:40000")
        #expect(proxied.loudEntries.isEmpty, "\(proxied.loudEntries)")
        _ = try proxied.channel.finish()
    }

    @Test("a header arriving one octet at a time, then SMTP one octet at a time", arguments: [v1Header, v2Header])
    func everyByteSplit(header: [UInt8]) throws {
        let proxied = try ProxiedChannel(makeSession: smtpSession())
        for byte in header {
            #expect(try proxied.written() == "")
            #expect(!proxied.proxyHandlerRemoved)
            try proxied.channel.writeInbound(ByteBuffer(bytes: [byte]))
        }
        #expect(try proxied.written() == greeting)
        #expect(proxied.proxyHandlerRemoved)
        for byte in ehloLine { try proxied.channel.writeInbound(ByteBuffer(bytes: [byte])) }
        #expect(try proxied.written().hasPrefix("250-mx.example.test\r\n"))
        _ = try proxied.channel.finish()
    }

    @Test("leftover octets are passed on unchanged, in the same read as the header's end")
    func leftoverPassedOn() throws {
        let recorder = Recorder()
        let proxied = try ProxiedChannel { _, _ in [recorder] }
        let tail: [UInt8] = Array("EHLO a\r\nMAIL FROM:<x@y>\r\n\u{0}\u{FF}".utf8)
        try proxied.channel.writeInbound(ByteBuffer(bytes: Array(v2Header.prefix(5))))
        try proxied.channel.writeInbound(ByteBuffer(bytes: Array(v2Header.dropFirst(5)) + tail))
        #expect(recorder.received == tail)
        #expect(recorder.addedToActiveChannel == true)
        #expect(proxied.proxyHandlerRemoved)
        try proxied.channel.writeInbound(ByteBuffer(string: "more"))
        #expect(recorder.received == tail + Array("more".utf8))
    }

    static let malformed: [[UInt8]] = [
        Array("PROXY TCP4 203.0.113.7 192.0.2.1 99999 25\r\n".utf8),
        Array("EHLO client.test\r\n".utf8),
        proxyV2(version: 1, family: 1, transport: 1, body: Array(repeating: 0, count: 12)),
        proxyV2(family: 1, transport: 1, length: 60000),
    ]

    @Test("a malformed header (or none: SMTP straight away) closes the connection without a banner", arguments: malformed)
    func malformedCloses(bytes: [UInt8]) throws {
        let proxied = try ProxiedChannel(makeSession: smtpSession())
        _ = try? proxied.channel.writeInbound(ByteBuffer(bytes: bytes))
        #expect(!proxied.channel.isActive)
        #expect(try proxied.written() == "")
        #expect(proxied.loudEntries.map(\.message.description) == ["malformed PROXY header, closing"])
    }

    @Test("no complete header within the time limit: closed without a banner")
    func timeout() throws {
        let proxied = try ProxiedChannel(timeLimit: .seconds(5), makeSession: smtpSession())
        try proxied.channel.writeInbound(ByteBuffer(bytes: Array(v1Header.prefix(10))))
        proxied.channel.embeddedEventLoop.advanceTime(by: .milliseconds(4_999))
        #expect(proxied.channel.isActive)
        proxied.channel.embeddedEventLoop.advanceTime(by: .milliseconds(1))
        #expect(!proxied.channel.isActive)
        #expect(try proxied.written() == "")
        #expect(proxied.loudEntries.map(\.message.description) == ["no PROXY header in time, closing"])
    }

    @Test("the timer stops once the header is complete")
    func noTimeoutAfterHeader() throws {
        let proxied = try ProxiedChannel(timeLimit: .seconds(5), makeSession: smtpSession())
        try proxied.channel.writeInbound(ByteBuffer(bytes: v1Header))
        proxied.channel.embeddedEventLoop.advanceTime(by: .seconds(60))
        #expect(proxied.channel.isActive)
        #expect(try proxied.written() == greeting)
        _ = try proxied.channel.finish()
    }

    @Test("a health check: v2 LOCAL then close, or close before any header, logs nothing above debug")
    func healthCheckQuiet() throws {
        // LOCAL: the session starts on the socket's own address.
        let local = try ProxiedChannel(makeSession: smtpSession())
        try local.channel.writeInbound(ByteBuffer(bytes: proxyV2(command: 0, family: 0, transport: 0) + ehloLine))
        let written = try local.written()
        #expect(written.hasPrefix(greeting + "250-mx.example.test\r\n"), "\(written.debugDescription)")
        try local.channel.close().wait()
        #expect(local.loudEntries.isEmpty, "\(local.loudEntries)")
        let opened = try #require(local.logs.entries.first { $0.message == "connection opened" })
        #expect(opened.metadata["client"] == "10.0.0.5:40000")

        let silent = try ProxiedChannel(makeSession: smtpSession())
        try silent.channel.writeInbound(ByteBuffer(bytes: Array(v2Header.prefix(7))))
        try silent.channel.close().wait()
        #expect(silent.loudEntries.isEmpty, "\(silent.loudEntries)")
        #expect(try silent.written() == "")
    }

    @Test("graceful shutdown before the header closes the connection")
    func shutdownBeforeHeader() throws {
        let proxied = try ProxiedChannel(makeSession: smtpSession())
        proxied.channel.pipeline.fireUserInboundEventTriggered(SMTPServerShutdownEvent())
        #expect(!proxied.channel.isActive)
        #expect(try proxied.written() == "")
    }
}

@Suite("SMTP session: PROXY headers from untrusted peers, and when the session starts")
struct SMTPServerHandlerProxyTests {
    /// A direct (unproxied) session from 198.51.100.9, greeted on connect.
    private func directSession() throws -> (EmbeddedChannel, InMemoryLogHandler) {
        let logs = InMemoryLogHandler()
        var logger = Logger(label: "smtp-test") { [logs] _ in logs }
        logger.logLevel = .trace
        let channel = EmbeddedChannel()
        let address = try SocketAddress(ipAddress: "198.51.100.9", port: 1025)
        channel.remoteAddress = address
        try channel.pipeline.syncOperations.addHandler(
            SMTPServerHandler(configuration: sessionConfiguration(), delegate: StubDelegate(), tlsContext: nil, logger: logger))
        try channel.connect(to: address).wait()
        return (channel, logs)
    }

    private func written(_ channel: EmbeddedChannel) throws -> String {
        var text = ""
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { text += String(buffer: buffer) }
        return text
    }

    @Test("a PROXY header from a peer that is not a trusted proxy: closed, no reply (v1, v2, in pieces)",
          arguments: [[v1Header], [v2Header], [Array(v2Header.prefix(2)), Array(v2Header.dropFirst(2))], [Array("PROX".utf8), Array("Y UNKNOWN\r\n".utf8)]])
    func untrustedHeaderCloses(pieces: [[UInt8]]) throws {
        let (channel, logs) = try directSession()
        #expect(try written(channel) == greeting)
        for piece in pieces { _ = try? channel.writeInbound(ByteBuffer(bytes: piece)) }
        #expect(!channel.isActive)
        #expect(try written(channel) == "")
        #expect(logs.entries.contains { $0.level == .warning && $0.message == "PROXY header from an untrusted address, closing" })
    }

    @Test("SMTP that merely starts like a header prefix is served")
    func prefixThenSMTP() throws {
        let (channel, _) = try directSession()
        #expect(try written(channel) == greeting)
        try channel.writeInbound(ByteBuffer(string: "\r\n"))
        #expect(try written(channel) == "")  // could still be the v2 signature
        try channel.writeInbound(ByteBuffer(string: "NOOP\r\n"))
        #expect(try written(channel) == "500 5.5.2 Command not recognized\r\n250 2.0.0 Ok\r\n")
        try channel.writeInbound(ByteBuffer(string: "PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"))  // not at the start: an unknown verb
        #expect(try written(channel) == "500 5.5.2 Command not recognized\r\n")
        #expect(channel.isActive)
        _ = try channel.finish()
    }

    @Test("greeted exactly once: added before activation (channelActive) or to an active channel (handlerAdded)")
    func greetedOnce() throws {
        let (before, _) = try directSession()
        #expect(try written(before) == greeting)
        _ = try before.finish()

        let after = EmbeddedChannel()
        let address = try SocketAddress(ipAddress: "198.51.100.9", port: 1025)
        after.remoteAddress = address
        try after.connect(to: address).wait()
        try after.pipeline.syncOperations.addHandler(
            SMTPServerHandler(
                configuration: sessionConfiguration(), delegate: StubDelegate(), tlsContext: nil, logger: Logger(label: "t")))
        #expect(try written(after) == greeting)
        after.pipeline.fireChannelActive()
        #expect(try written(after) == "")
        _ = try after.finish()
    }
}
