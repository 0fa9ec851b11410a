// MailTierWebhooks: posts the `events` outbox to SMTP_WEBHOOK_URL (API.md "WebHooks") with
// AsyncHTTPClient, signed with HMAC-SHA256. It owns the HTTP side only: which events exist and
// how they are stored is MailTier's (`EventOutbox`, `WebhookEvent`); it must not import a
// database driver or SMTP code.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import AsyncHTTPClient
import Crypto
import Logging
import MailTier
import NIOCore
import NIOHTTP1
import ServiceLifecycle

/// The headers of a webhook post, and their signature.
///
/// `X-MailTier-Signature: sha256=<hex>` where `<hex>` is the lower-case hex HMAC-SHA256, keyed
/// with the UTF-8 bytes of `SMTP_WEBHOOK_SECRET`, of the bytes `<X-MailTier-Timestamp>.<body>`:
/// the timestamp header's decimal digits, one `.`, then the request body exactly as received.
/// The timestamp (Unix seconds of this attempt) is inside the signature so that a receiver can
/// refuse a replayed request that is too old; the event id (`X-MailTier-Event-Id`, the same on
/// every attempt) lets it drop a retried event it already has.
public enum WebhookSignature {
    public static let eventHeader = "X-MailTier-Event"
    public static let eventIDHeader = "X-MailTier-Event-Id"
    public static let timestampHeader = "X-MailTier-Timestamp"
    public static let signatureHeader = "X-MailTier-Signature"

    /// `sha256=<hex>` for `body` posted at `timestamp`.
    public static func signature(secret: String, timestamp: Int64, body: String) -> String {
        let key = SymmetricKey(data: Array(secret.utf8))
        let code = HMAC<SHA256>.authenticationCode(for: Array("\(timestamp).\(body)".utf8), using: key)
        return "sha256=" + code.map { byte in
            let digits = Array("0123456789abcdef")
            return String([digits[Int(byte >> 4)], digits[Int(byte & 0x0F)]])
        }.joined()
    }

    /// Every header of the post of `event` at `timestamp` (no signature without a secret).
    public static func headers(for event: ClaimedEvent, timestamp: Int64, secret: String?) -> [(String, String)] {
        var headers = [
            ("Content-Type", "application/json"),
            (eventHeader, event.type),
            (eventIDHeader, event.id),
            (timestampHeader, String(timestamp)),
        ]
        if let secret { headers.append((signatureHeader, signature(secret: secret, timestamp: timestamp, body: event.payload))) }
        return headers
    }
}

/// A background `Service` that drains the webhook outbox: it claims due events (leased, so that
/// several nodes can run it at once), posts each body exactly as stored, and records a 2xx as
/// delivered; any other status, a connection failure or no answer within `timeout` is a failed
/// attempt, retried on `retry`'s schedule until it fails for good (kept, with `last_error`, and
/// logged). It also prunes old rows, so the table stays bounded.
public final class WebhookSender: Service, Sendable {
    public struct Settings: Sendable {
        /// `SMTP_WEBHOOK_URL`.
        public var url: String
        /// `SMTP_WEBHOOK_SECRET`; no signature header without it.
        public var secret: String?
        /// One post's limit, connect to end of response.
        public var timeout: Duration = .seconds(10)
        /// How often the outbox is polled while idle.
        public var pollInterval: Duration = .seconds(1)
        /// Events claimed at once; posted one after the other, oldest first.
        public var batchSize: Int = 10
        /// How long a claim holds an event: longer than posting a whole batch may take (each post
        /// is bounded by `timeout`; AsyncHTTPClient keeps retrying a refused connection until then).
        public var lease: Duration = .seconds(180)
        public var retry = WebhookRetryPolicy()
        /// Delivered events are deleted after this long; failed ones after `failedRetention`.
        public var deliveredRetention: Duration = .seconds(7 * 86400)
        public var failedRetention: Duration = .seconds(30 * 86400)
        /// How often pruning runs (and the failed count is logged when not zero).
        public var pruneInterval: Duration = .seconds(3600)

        public init(url: String, secret: String?) {
            self.url = url
            self.secret = secret
        }
    }

    public let outbox: any EventOutbox
    public let settings: Settings
    private let wake: Doorbell
    private let logger: Logger

    public init(outbox: any EventOutbox, settings: Settings, logger: Logger) {
        self.outbox = outbox
        self.settings = settings
        self.wake = Doorbell()
        self.logger = logger
    }

    /// Polls sooner than `pollInterval` (an event was just written in this process).
    public func ring() { wake.ring() }

    public func run() async throws {
        let client = HTTPClient(
            eventLoopGroup: HTTPClient.defaultEventLoopGroup,
            configuration: HTTPClient.Configuration(
                redirectConfiguration: .disallow,
                timeout: HTTPClient.Configuration.Timeout(connect: .seconds(settings.timeout.components.seconds))),
            backgroundActivityLogger: logger)
        if settings.secret == nil {
            logger.warning("SMTP_WEBHOOK_SECRET is not set: webhook posts carry no signature")
        }
        logger.info("webhook sender started", metadata: ["url": "\(Self.redacted(settings.url))"])
        var nextPrune = ContinuousClock.now
        await withGracefulShutdownHandler {
            while !Task.isShuttingDownGracefully && !Task.isCancelled {
                if ContinuousClock.now >= nextPrune {
                    await prune()
                    nextPrune = ContinuousClock.now + settings.pruneInterval
                }
                var claimed = 0
                do {
                    claimed = try await runOnce(client: client)
                } catch {
                    logger.error("webhook outbox unavailable", metadata: ["error": "\(error)"])
                }
                if claimed < settings.batchSize && !Task.isShuttingDownGracefully {
                    await wake.wait(timeout: settings.pollInterval)
                }
            }
        } onGracefulShutdown: { [wake] in
            wake.ring()
        }
        try? await client.shutdown()
    }

    /// Claims one batch and posts it; returns how many events were claimed. Stops between posts
    /// on graceful shutdown (the rest are due again when their lease ends).
    @discardableResult
    public func runOnce(client: HTTPClient, now: Date = Date()) async throws -> Int {
        let events = try await outbox.claim(now: now, limit: settings.batchSize, lease: settings.lease)
        for event in events {
            if Task.isShuttingDownGracefully || Task.isCancelled { break }
            let problem = await post(event, client: client)
            let finished = Date()
            if let problem {
                let retryAt = settings.retry.retryAt(afterAttempt: event.attempt, now: finished, random: Double.random(in: -1...1))
                let recorded = try await outbox.markFailed(event, error: problem, retryAt: retryAt)
                var metadata: Logger.Metadata = [
                    "event_id": "\(event.id)", "event": "\(event.type)", "attempt": "\(event.attempt)", "error": "\(problem)",
                ]
                if let retryAt {
                    metadata["retry_in"] = "\(Int(retryAt.timeIntervalSince(finished)))s"
                    logger.warning("webhook post failed; will retry", metadata: metadata)
                } else {
                    logger.error("webhook event failed for good (kept in the events table)", metadata: metadata)
                }
                if !recorded { logger.notice("webhook lease lost; another sender owns the event", metadata: metadata) }
            } else {
                if try await !outbox.markDelivered(event, at: finished) {
                    logger.notice("webhook lease lost after a delivered post", metadata: ["event_id": "\(event.id)"])
                }
                logger.debug("webhook delivered", metadata: ["event_id": "\(event.id)", "event": "\(event.type)"])
            }
        }
        return events.count
    }

    /// Posts one event; nil when the receiver answered 2xx, else what went wrong.
    func post(_ event: ClaimedEvent, client: HTTPClient) async -> String? {
        var request = HTTPClientRequest(url: settings.url)
        request.method = .POST
        for (name, value) in WebhookSignature.headers(for: event, timestamp: Date().unixSeconds, secret: settings.secret) {
            request.headers.add(name: name, value: value)
        }
        request.body = .bytes(ByteBuffer(string: event.payload))
        do {
            let response = try await client.execute(request, timeout: .init(settings.timeout))
            // Read (and drop) what the receiver says, up to 64 KiB, so the connection can be reused.
            var read = 0
            for try await chunk in response.body {
                read += chunk.readableBytes
                if read > 65536 { break }
            }
            guard (200..<300).contains(response.status.code) else { return "HTTP \(response.status.code)" }
            return nil
        } catch {
            return "\(error)"
        }
    }

    private func prune() async {
        let now = Date()
        do {
            let removed = try await outbox.prune(
                deliveredBefore: now - Self.seconds(settings.deliveredRetention), failedBefore: now - Self.seconds(settings.failedRetention))
            let counts = try await outbox.counts()
            if counts.failed > 0 || removed > 0 {
                logger.notice(
                    "webhook outbox",
                    metadata: ["failed": "\(counts.failed)", "waiting": "\(counts.waiting)", "pruned": "\(removed)"])
            }
        } catch {
            logger.error("webhook outbox prune failed", metadata: ["error": "\(error)"])
        }
    }

    static func seconds(_ duration: Duration) -> TimeInterval {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }

    /// The URL without its query (which may carry a token), for logs.
    static func redacted(_ url: String) -> String {
        url.split(separator: "?", maxSplits: 1).first.map(String.init) ?? url
    }
}
