import Foundation
import InMemoryLogging
import Logging
import MailTier
import MailTierRedis
import MetricsTestKit
import NIOCore
import Testing

@Suite(.timeLimit(.minutes(2))) struct RedisRateLimiterTests {
    /// Two nodes (two clients, two connections) hammer one key at once: exactly `limit`
    /// events get through, and every count from 1 up is seen once.
    @Test(.enabled(if: TestServices.shouldRunRedisTests)) func exactlyLimitAcrossTwoNodes() async throws {
        guard let endpoint = TestServices.requireRedis() else { return }
        let namespace = uniqueNamespace()
        let nodes = [makeClient(endpoint, commandTimeout: .seconds(5)), makeClient(endpoint, commandTimeout: .seconds(5))]
        let counters = nodes.map { RedisRateCounter(client: $0, namespace: namespace) }
        let rule = RateRule(limit: 37, window: .seconds(60))
        let now = Date()
        let decisions = try await withThrowingTaskGroup(of: RateDecision.self) { group in
            for index in 0..<400 {
                let counter = counters[index % 2]
                group.addTask { try await counter.hit(.connection, key: "192.0.2.7", rule: rule, now: now) }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        let allowed = decisions.filter(\.allowed)
        #expect(allowed.count == 37)
        #expect(Set(allowed.map(\.remaining)) == Set(0..<37))
        #expect(decisions.allSatisfy { !$0.unavailable })
        #expect(decisions.allSatisfy { $0.resetAt > now + 55 && $0.resetAt <= now + 60 })
        _ = try await nodes[0].send("DEL", counters[0].key(.connection, "192.0.2.7"))
        for node in nodes { await node.shutdown() }
    }

    @Test(.enabled(if: TestServices.shouldRunRedisTests)) func windowEndsAfterItsDuration() async throws {
        guard let endpoint = TestServices.requireRedis() else { return }
        let client = makeClient(endpoint)
        let counter = RedisRateCounter(client: client, namespace: uniqueNamespace())
        // Ten seconds: the whole test run keeps both cores busy, and three hits once took more
        // than a 3 s window (the third then opened a new one).
        let rule = RateRule(limit: 2, window: .seconds(10))
        let now = Date()
        let first = try await counter.hit(.message, key: "2001:db8::1", rule: rule, now: now)
        #expect(first.allowed && first.remaining == 1)
        #expect(first.resetAt > now && first.resetAt <= now + 10.0)
        #expect(try await counter.hit(.message, key: "2001:db8::1", rule: rule, now: Date()).allowed)
        let third = try await counter.hit(.message, key: "2001:db8::1", rule: rule, now: Date())
        #expect(!third.allowed && third.remaining == 0 && !third.unavailable)
        // The window the first hit opened ends: `resetAt` is the caller's clock plus Redis's TTL,
        // so the key goes a request's latency later — on a loaded machine, up to seconds. Denied
        // hits meanwhile do not extend it.
        try await Task.sleep(for: .seconds(max(0, first.resetAt.timeIntervalSinceNow)))
        var next = try await counter.hit(.message, key: "2001:db8::1", rule: rule, now: Date())
        while !next.allowed && Date() < first.resetAt + 5 {
            try await Task.sleep(for: .milliseconds(200))
            next = try await counter.hit(.message, key: "2001:db8::1", rule: rule, now: Date())
        }
        #expect(next.allowed && next.remaining == 1)
        await client.shutdown()
    }

    @Test(.enabled(if: TestServices.shouldRunRedisTests)) func peekDoesNotCount() async throws {
        guard let endpoint = TestServices.requireRedis() else { return }
        let client = makeClient(endpoint)
        let counter = RedisRateCounter(client: client, namespace: uniqueNamespace())
        let rule = RateRule(limit: 3, window: .seconds(60))
        let now = Date()
        for _ in 0..<5 {
            let peek = try await counter.peek(.authFailure, key: "198.51.100.1", rule: rule, now: now)
            #expect(peek == RateDecision(allowed: true, remaining: 3, resetAt: now + 60))
        }
        #expect(try await counter.hit(.authFailure, key: "198.51.100.1", rule: rule, now: now).remaining == 2)
        let peek = try await counter.peek(.authFailure, key: "198.51.100.1", rule: rule, now: now)
        #expect(peek.allowed && peek.remaining == 2 && peek.resetAt <= now + 60 && peek.resetAt > now + 55)
        _ = try await counter.hit(.authFailure, key: "198.51.100.1", rule: rule, now: now)
        _ = try await counter.hit(.authFailure, key: "198.51.100.1", rule: rule, now: now)
        let full = try await counter.peek(.authFailure, key: "198.51.100.1", rule: rule, now: now)
        #expect(!full.allowed && full.remaining == 0)
        #expect(try await client.send("GET", counter.key(.authFailure, "198.51.100.1")) == .bulk("3"))
        _ = try await client.send("DEL", counter.key(.authFailure, "198.51.100.1"))
        await client.shutdown()
    }

    /// A counter left without an expiry (by hand, or an old bug) gets one on the next hit.
    @Test(.enabled(if: TestServices.shouldRunRedisTests)) func keyWithoutExpiryIsRepaired() async throws {
        guard let endpoint = TestServices.requireRedis() else { return }
        let client = makeClient(endpoint)
        let counter = RedisRateCounter(client: client, namespace: uniqueNamespace())
        let key = counter.key(.command, "203.0.113.9")
        _ = try await client.send("SET", key, "5").checked()
        let decision = try await counter.hit(.command, key: "203.0.113.9", rule: RateRule(limit: 10, window: .seconds(30)), now: Date())
        #expect(decision.allowed && decision.remaining == 4)
        let ttl = try #require(try await client.send("PTTL", key).integer)
        #expect(ttl > 25_000 && ttl <= 30_000)
        _ = try await client.send("DEL", key)
        await client.shutdown()
    }

    @Test func keysAreNamespacedByKindAndAddress() async throws {
        let client = makeClient(try RedisEndpoint(url: "redis://127.0.0.1:1"))
        #expect(RedisRateCounter(client: client).key(.authFailure, "192.0.2.1") == "mailtier:rate:auth:192.0.2.1")
        #expect(RedisRateCounter(client: client).key(.connection, "2001:db8::1") == "mailtier:rate:connection:2001:db8::1")
        #expect(RedisLeaseStore(client: client).key("delivery") == "mailtier:lease:delivery")
        await client.shutdown()
    }

    // MARK: Failure policy

    @Test func openPolicyAnswersFromTheFallbackWhenRedisIsDown() async throws {
        let port = try await freePort()
        let (limiter, client, logs, metrics) = try makeLimiter(url: "redis://127.0.0.1:\(port)", policy: .open)
        let rule = RateRule(limit: 2, window: .seconds(60))
        let started = ContinuousClock.now
        var decisions: [RateDecision] = []
        for _ in 0..<3 { decisions.append(await limiter.hit(.connection, key: "192.0.2.1", rule: rule, now: Date())) }
        #expect(ContinuousClock.now - started < .seconds(10))  // refused connections fail fast, timeouts or not
        #expect(decisions.map(\.allowed) == [true, true, false])  // the per-node count
        #expect(decisions.allSatisfy { !$0.unavailable })
        #expect(await limiter.peek(.connection, key: "192.0.2.1", rule: rule, now: Date()).allowed == false)
        #expect(limiter.isDegraded)
        #expect(limiter.failureCount == 4)
        #expect(try metrics.expectCounter(RedisRateLimiter.failureMetric).totalValue == 4)
        let warnings = logs.entries.filter { $0.level == .warning }
        #expect(warnings.count == 1)  // once, not per call
        #expect(warnings.first?.message.description.contains("per node") == true)
        await client.shutdown()
    }

    @Test func closedPolicyRefusesAsUnavailableWhenRedisIsDown() async throws {
        let port = try await freePort()
        let (limiter, client, logs, _) = try makeLimiter(url: "redis://127.0.0.1:\(port)", policy: .closed)
        let rule = RateRule(limit: 100, window: .seconds(60))
        let started = ContinuousClock.now
        let hit = await limiter.hit(.message, key: "192.0.2.2", rule: rule, now: Date())
        let peek = await limiter.peek(.authFailure, key: "192.0.2.2", rule: rule, now: Date())
        #expect(ContinuousClock.now - started < .seconds(10))
        for decision in [hit, peek] {
            #expect(!decision.allowed && decision.unavailable && decision.remaining == 0)
        }
        #expect(logs.entries.filter { $0.level == .warning }.count == 1)
        await client.shutdown()
    }

    /// Connected, but Redis never answers: the call returns after the command timeout.
    @Test func silentRedisDoesNotHangTheCaller() async throws {
        let silent = try await SilentServer.start()
        let (limiter, client, _, _) = try makeLimiter(
            url: "redis://127.0.0.1:\(silent.port)", policy: .open, commandTimeout: .milliseconds(300))
        let started = ContinuousClock.now
        let decision = await limiter.hit(.command, key: "192.0.2.3", rule: RateRule(limit: 5, window: .seconds(60)), now: Date())
        #expect(ContinuousClock.now - started < .seconds(10))
        #expect(decision.allowed && decision.remaining == 4 && limiter.isDegraded)
        await client.shutdown()
        try await silent.close()
    }

    /// Redis killed and restarted under a running limiter: one warning, per-node answers
    /// meanwhile, one info line when it is back, and shared counting again — same objects.
    @Test func recoversAfterRedisIsKilledAndRestarted() async throws {
        let server = try await PrivateRedisServer.start()
        defer { server.stop() }
        let (limiter, client, logs, _) = try makeLimiter(url: server.url, policy: .open)
        let rule = RateRule(limit: 1000, window: .seconds(60))
        #expect(await limiter.hit(.connection, key: "192.0.2.4", rule: rule, now: Date()).remaining == 999)
        #expect(!limiter.isDegraded)

        server.kill()
        for _ in 0..<5 { _ = await limiter.hit(.connection, key: "192.0.2.4", rule: rule, now: Date()) }
        #expect(limiter.isDegraded)

        try await server.start()
        let deadline = ContinuousClock.now + .seconds(10)
        var decision = await limiter.hit(.connection, key: "192.0.2.4", rule: rule, now: Date())
        while limiter.isDegraded, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(50))
            decision = await limiter.hit(.connection, key: "192.0.2.4", rule: rule, now: Date())
        }
        #expect(!limiter.isDegraded)
        #expect(decision.remaining == 999)  // the restarted server counts from scratch
        #expect(logs.entries.filter { $0.level == .warning }.count == 1)
        #expect(logs.entries.filter { $0.level == .info }.map(\.message.description).count == 1)
        #expect(try await client.send("EXISTS", "mailtier:rate:connection:192.0.2.4") == .integer(1))
        await client.shutdown()
    }

    @Test func servicesFactoryPicksAdaptersByConfiguration() throws {
        var configuration = Configuration()
        let embedded = try RedisServices.make(configuration: configuration, logger: testLogger())
        #expect(embedded.limiter is InProcessRateLimiter && embedded.leases is InProcessLeaseStore && embedded.client == nil)
        configuration.redisURL = "redis://:pw@127.0.0.1:6390/2"
        configuration.redisFailure = .closed
        let cluster = try RedisServices.make(configuration: configuration, logger: testLogger())
        let limiter = try #require(cluster.limiter as? RedisRateLimiter)
        #expect(limiter.policy == .closed)
        #expect(cluster.leases is RedisLeaseStore)
        #expect(cluster.client?.configuration.endpoint == (try RedisEndpoint(url: "redis://:pw@127.0.0.1:6390/2")))
    }

    func makeLimiter(
        url: String, policy: Configuration.RedisFailurePolicy, commandTimeout: TimeAmount = .seconds(5)
    ) throws -> (RedisRateLimiter, RedisClient, InMemoryLogHandler, TestMetrics) {
        let logs = InMemoryLogHandler()
        var logger = Logger(label: "redis-test") { _ in logs }
        logger.logLevel = .info
        let metrics = TestMetrics()
        let client = makeClient(try RedisEndpoint(url: url), commandTimeout: commandTimeout, backoff: .milliseconds(50), logger: logger)
        let limiter = RedisRateLimiter(
            counter: RedisRateCounter(client: client), policy: policy, logger: logger, metricsFactory: metrics)
        return (limiter, client, logs, metrics)
    }
}
