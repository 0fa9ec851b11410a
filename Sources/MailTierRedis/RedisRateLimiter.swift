#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import MailTier
import Metrics
import NIOConcurrencyHelpers

/// Rate-limit counters in Redis, shared by every node: `hit` and `peek` throw when Redis
/// does not answer (`RedisRateLimiter` decides what that means).
///
/// A key is `<namespace>:rate:<kind>:<key>` (the key is the client address), holding the
/// count of the current window and expiring when the window ends. `hit` is one Lua script,
/// which Redis runs atomically: increment, and when the key has no expiry (it was just
/// created — or something left it without one) give it the window. However many nodes hit
/// the same key at once, the counts they see are 1, 2, 3, … with no gaps or repeats, so
/// exactly `limit` events are allowed per window.
public struct RedisRateCounter: Sendable {
    public let client: RedisClient
    public let namespace: String

    /// KEYS[1] the counter, ARGV[1] the window in ms → {count, ms left in the window}.
    static let hitScript = RedisScript(
        """
        local count = redis.call('INCR', KEYS[1])
        local ttl = redis.call('PTTL', KEYS[1])
        if ttl < 0 then
            redis.call('PEXPIRE', KEYS[1], ARGV[1])
            ttl = tonumber(ARGV[1])
        end
        return {count, ttl}
        """)

    /// KEYS[1] the counter → {count, ms left in the window (negative when there is none)}.
    static let peekScript = RedisScript(
        """
        local count = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
        return {count, redis.call('PTTL', KEYS[1])}
        """)

    public init(client: RedisClient, namespace: String = "mailtier") {
        self.client = client
        self.namespace = namespace
    }

    public func key(_ kind: RateLimitKind, _ key: String) -> String { "\(namespace):rate:\(kind.rawValue):\(key)" }

    /// Counts one event; the decision is made as `InProcessRateLimiter.hit` makes it.
    public func hit(_ kind: RateLimitKind, key: String, rule: RateRule, now: Date) async throws(RedisClientError) -> RateDecision {
        let (count, ttl) = try await run(Self.hitScript, self.key(kind, key), [String(Self.milliseconds(rule.window))])
        return RateDecision(allowed: count <= rule.limit, remaining: max(0, rule.limit - count), resetAt: now + Double(ttl) / 1000)
    }

    /// Whether one more event would be allowed, without counting it.
    public func peek(_ kind: RateLimitKind, key: String, rule: RateRule, now: Date) async throws(RedisClientError) -> RateDecision {
        let (count, ttl) = try await run(Self.peekScript, self.key(kind, key), [])
        let resetAt = ttl > 0 ? now + Double(ttl) / 1000 : now + rule.window.timeInterval
        return RateDecision(allowed: count < rule.limit, remaining: max(0, rule.limit - count), resetAt: resetAt)
    }

    private func run(_ script: RedisScript, _ key: String, _ arguments: [String]) async throws(RedisClientError) -> (Int, Int64) {
        let reply = try await client.evaluate(script, keys: [key], arguments: arguments).checked()
        guard let pair = reply.array, pair.count == 2, let count = pair[0].integer, let ttl = pair[1].integer else {
            throw RedisClientError(.unexpectedReply, "rate script answered \(reply)")
        }
        return (Int(clamping: count), ttl)
    }

    /// A window in whole milliseconds, at least 1 (PEXPIRE 0 would delete the key).
    static func milliseconds(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        let (milliseconds, rest) = attoseconds.quotientAndRemainder(dividingBy: 1_000_000_000_000_000)
        return max(1, seconds * 1000 + milliseconds + (rest > 0 ? 1 : 0))
    }
}

/// The `RateLimiter` of cluster mode: the shared counters of `RedisRateCounter`, and the
/// configured policy (`SMTP_REDIS_FAILURE`) for when Redis does not answer in time:
///
/// - `open`: answer from a per-node `InProcessRateLimiter` until Redis is back;
/// - `closed`: refuse with `unavailable: true` (the ingress turns that into a 4xx).
///
/// It never throws and never waits longer than the client's timeouts. Logs one warning when
/// Redis becomes unreachable and one info line when it is back (not one line per call), and
/// counts every failed call in `smtp_redis_failures_total`.
public final class RedisRateLimiter: RateLimiter {
    public let counter: RedisRateCounter
    public let policy: Configuration.RedisFailurePolicy
    /// The per-node limiter the `open` policy answers from.
    public let fallback: InProcessRateLimiter
    private let logger: Logger
    private let failures: Counter
    private let health = NIOLockedValueBox(Health())

    private struct Health {
        var degraded = false
        var failures = 0
    }

    /// - Parameter metricsFactory: where `smtp_redis_failures_total` goes; the global
    ///   `MetricsSystem` (bootstrap it before creating this) unless given.
    public init(
        counter: RedisRateCounter, policy: Configuration.RedisFailurePolicy, fallback: InProcessRateLimiter = InProcessRateLimiter(),
        logger: Logger, metricsFactory: (any MetricsFactory)? = nil
    ) {
        self.counter = counter
        self.policy = policy
        self.fallback = fallback
        self.logger = logger
        self.failures = MailTierMetrics.counter(Self.failureMetric, factory: metricsFactory)
    }

    public static let failureMetric = MailTierMetrics.redisFailures

    /// True from a failed call until the next call that reaches Redis.
    public var isDegraded: Bool { health.withLockedValue { $0.degraded } }
    /// Calls that did not reach Redis, since start.
    public var failureCount: Int { health.withLockedValue { $0.failures } }

    public func hit(_ kind: RateLimitKind, key: String, rule: RateRule, now: Date) async -> RateDecision {
        await decide(now) { () async throws(RedisClientError) in
            try await counter.hit(kind, key: key, rule: rule, now: now)
        } fallback: {
            fallback.hitNow(kind, key: key, rule: rule, now: now)
        }
    }

    public func peek(_ kind: RateLimitKind, key: String, rule: RateRule, now: Date) async -> RateDecision {
        await decide(now) { () async throws(RedisClientError) in
            try await counter.peek(kind, key: key, rule: rule, now: now)
        } fallback: {
            await fallback.peek(kind, key: key, rule: rule, now: now)
        }
    }

    /// Redis's answer; when there is none, the policy's.
    private func decide(
        _ now: Date, shared: () async throws(RedisClientError) -> RateDecision, fallback: () async -> RateDecision
    ) async -> RateDecision {
        do {
            let decision = try await shared()
            succeeded()
            return decision
        } catch {
            failed(error)
            switch policy {
            case .open: return await fallback()
            case .closed: return RateDecision(allowed: false, remaining: 0, resetAt: now, unavailable: true)
            }
        }
    }

    private func succeeded() {
        let recovered = health.withLockedValue { health in
            defer { health.degraded = false }
            return health.degraded
        }
        if recovered {
            logger.info("redis reachable again: rate limits are shared by all nodes again")
        }
    }

    private func failed(_ error: RedisClientError) {
        failures.increment()
        let becameDegraded = health.withLockedValue { health in
            health.failures += 1
            defer { health.degraded = true }
            return !health.degraded
        }
        if becameDegraded {
            let consequence =
                switch policy {
                case .open: "rate limits are per node until it is back (SMTP_REDIS_FAILURE=open)"
                case .closed: "refusing what the rate limits guard until it is back (SMTP_REDIS_FAILURE=closed)"
                }
            logger.warning("redis unreachable: \(consequence)", metadata: ["error": "\(error)"])
        }
    }
}
