import AsyncHTTPClient
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import Testing

@testable import MailTier
@testable import MailTierWebhooks

// The sender against a real HTTP server on 127.0.0.1 (NIOHTTP1, in this process) that answers
// with the statuses a test gives it, and an in-memory outbox that records what the sender did.

/// What the test server saw, and the statuses it answers with (the last one repeats; 0 = never answer).
private final class ServerScript: Sendable {
    struct Request: Sendable {
        var path: String
        var headers: [(String, String)]
        var body: String
        func header(_ name: String) -> String? { headers.first { $0.0.lowercased() == name.lowercased() }?.1 }
    }
    private let state = NIOLockedValueBox<(statuses: [Int], requests: [Request])>(([], []))
    init(_ statuses: [Int]) { state.withLockedValue { $0.statuses = statuses } }
    var requests: [Request] { state.withLockedValue { $0.requests } }
    func next(_ request: Request) -> Int {
        state.withLockedValue { state in
            state.requests.append(request)
            return state.statuses.count > 1 ? state.statuses.removeFirst() : (state.statuses.first ?? 200)
        }
    }
}

private final class ScriptedHandler: ChannelInboundHandler, @unchecked Sendable {
    // @unchecked: used only on its channel's event loop.
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let script: ServerScript
    var head: HTTPRequestHead?
    var body = ""
    init(script: ServerScript) { self.script = script }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            body = ""
        case .body(let buffer):
            body += String(buffer: buffer)
        case .end:
            guard let head else { return }
            let status = script.next(.init(path: head.uri, headers: head.headers.map { ($0.name, $0.value) }, body: body))
            guard status != 0 else { return }  // never answer: the client's timeout
            var headers = HTTPHeaders()
            headers.add(name: "Content-Length", value: "0")
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: .init(statusCode: status), headers: headers))), promise: nil)
            context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        }
    }
}

private func withScriptedServer<T>(_ statuses: [Int], _ body: (Int, ServerScript) async throws -> T) async throws -> T {
    let script = ServerScript(statuses)
    let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .childChannelInitializer { channel in
            channel.pipeline.configureHTTPServerPipeline().flatMap { channel.pipeline.addHandler(ScriptedHandler(script: script)) }
        }
        .bind(host: "127.0.0.1", port: 0).get()
    do {
        let result = try await body(channel.localAddress!.port!, script)
        try await channel.close()
        return result
    } catch {
        try? await channel.close()
        throw error
    }
}

/// An outbox in memory: one waiting event, and what the sender recorded.
private final class MemoryOutbox: EventOutbox {
    struct State {
        var waiting: [ClaimedEvent]
        var delivered: [String] = []
        var failures: [(id: String, error: String, retryAt: Date?)] = []
    }
    let state: NIOLockedValueBox<State>
    init(_ events: [ClaimedEvent]) { state = NIOLockedValueBox(State(waiting: events)) }

    func append(_ event: OutboxEvent) async throws {}
    func claim(now: Date, limit: Int, lease: Duration) async throws -> [ClaimedEvent] {
        state.withLockedValue { state in
            defer { state.waiting = [] }
            return state.waiting
        }
    }
    func markDelivered(_ event: ClaimedEvent, at date: Date) async throws -> Bool {
        state.withLockedValue { $0.delivered.append(event.id) }
        return true
    }
    func markFailed(_ event: ClaimedEvent, error: String, retryAt: Date?) async throws -> Bool {
        state.withLockedValue { $0.failures.append((event.id, error, retryAt)) }
        return true
    }
    func prune(deliveredBefore: Date, failedBefore: Date) async throws -> Int { 0 }
    func counts() async throws -> EventOutboxCounts { EventOutboxCounts(waiting: 0, failed: 0, delivered: 0) }
    func failed(limit: Int) async throws -> [FailedEvent] { [] }
    func retryFailed(now: Date) async throws -> Int { 0 }
}

private let payload = #"{"data":{},"event":"auth.failed","timestamp":"2025-10-23T12:00:00Z"}"#

private func event(attempt: Int = 1) -> ClaimedEvent {
    ClaimedEvent(id: "evt_test", type: "auth.failed", payload: payload, createdAt: Date(), attempt: attempt)
}

@Suite("Webhook sender") struct WebhookSenderTests {
    @Test("signature: sha256=<hex HMAC-SHA256(secret, \"<timestamp>.<body>\")> (checked against Python's hmac)")
    func signatureVector() {
        #expect(
            WebhookSignature.signature(secret: "whsec_test", timestamp: 1_761_220_800, body: payload)
                == "sha256=ea428b823f483aa273fe2ffa2e71ae5eddda2b430d6aff93da829a8e81f9e1cd")
        let names = WebhookSignature.headers(for: event(), timestamp: 1, secret: nil).map(\.0)
        #expect(names == ["Content-Type", "X-MailTier-Event", "X-MailTier-Event-Id", "X-MailTier-Timestamp"], "no secret: no signature")
    }

    @Test("a 2xx is delivered: the body as stored, the documented headers, a valid signature")
    func delivered() async throws {
        try await withScriptedServer([204]) { port, script in
            let outbox = MemoryOutbox([event()])
            let sender = WebhookSender(
                outbox: outbox, settings: .init(url: "http://127.0.0.1:\(port)/hook?x=1", secret: "s3cret"), logger: Logger(label: "test"))
            let client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
            #expect(try await sender.runOnce(client: client) == 1)
            try await client.shutdown()
            #expect(outbox.state.withLockedValue { $0.delivered } == ["evt_test"])
            let request = try #require(script.requests.first)
            #expect(request.path == "/hook?x=1" && request.body == payload)
            #expect(request.header("Content-Type") == "application/json")
            #expect(request.header("X-MailTier-Event") == "auth.failed" && request.header("X-MailTier-Event-Id") == "evt_test")
            let timestamp = try #require(request.header("X-MailTier-Timestamp").flatMap { Int64($0) })
            #expect(abs(Double(timestamp) - Date().timeIntervalSince1970) < 60)
            #expect(request.header("X-MailTier-Signature") == WebhookSignature.signature(secret: "s3cret", timestamp: timestamp, body: payload))
        }
    }

    @Test("a 500, a refused connection or no answer is a failed attempt with a retry time; the last attempt gives up")
    func failures() async throws {
        try await withScriptedServer([500, 0]) { port, _ in
            let outbox = MemoryOutbox([event(attempt: 1)])
            var settings = WebhookSender.Settings(url: "http://127.0.0.1:\(port)/", secret: nil)
            settings.timeout = .seconds(1)
            settings.retry = WebhookRetryPolicy(first: .seconds(10), maxAttempts: 3, jitter: 0)
            let sender = WebhookSender(outbox: outbox, settings: settings, logger: Logger(label: "test"))
            let client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
            let before = Date()
            try await sender.runOnce(client: client)
            let after = Date()
            outbox.state.withLockedValue { $0.waiting = [event(attempt: 2)] }
            try await sender.runOnce(client: client)  // no answer: times out after 1 s
            outbox.state.withLockedValue { $0.waiting = [event(attempt: 3)] }
            try await client.shutdown()
            let failures = outbox.state.withLockedValue { $0.failures }
            try #require(failures.count == 2)
            #expect(failures[0].error == "HTTP 500")
            // 10 s (no jitter) after the failure, which came between `before` and `after`.
            let retryAt = try #require(failures[0].retryAt)
            #expect(retryAt.timeIntervalSince(before) >= 9 && retryAt.timeIntervalSince(after) <= 11, "\(retryAt) for \(before)…\(after)")
            #expect(!failures[1].error.isEmpty && failures[1].retryAt != nil)
            #expect(outbox.state.withLockedValue { $0.delivered }.isEmpty)
        }
        // Nobody listening (a closed port), on the last attempt: failed for good.
        let outbox = MemoryOutbox([event(attempt: 3)])
        var settings = WebhookSender.Settings(url: "http://127.0.0.1:1/", secret: nil)
        settings.retry = WebhookRetryPolicy(maxAttempts: 3)
        let client = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup)
        try await WebhookSender(outbox: outbox, settings: settings, logger: Logger(label: "test")).runOnce(client: client)
        try await client.shutdown()
        let failures = outbox.state.withLockedValue { $0.failures }
        #expect(failures.count == 1 && failures[0].retryAt == nil)
    }
}
