import Foundation
import MailTier
import Testing

@Suite("In-process rate limiter and leases")
struct RateLimiterTests {
    let rule = RateRule(limit: 3, window: .seconds(60))

    @Test("the event over the limit is refused, and every later one until the window ends; keys and kinds are separate")
    func fixedWindow() async {
        let limiter = InProcessRateLimiter()
        let start = Date(timeIntervalSince1970: 1_000_000)
        var answers: [Bool] = []
        for second in 0..<5 {
            answers.append(await limiter.hit(.connection, key: "192.0.2.1", rule: rule, now: start + Double(second)).allowed)
        }
        #expect(answers == [true, true, true, false, false])
        #expect(await limiter.hit(.connection, key: "192.0.2.2", rule: rule, now: start).allowed)
        #expect(await limiter.hit(.command, key: "192.0.2.1", rule: rule, now: start).allowed)
        let last = await limiter.hit(.connection, key: "192.0.2.1", rule: rule, now: start + 59)
        #expect(!last.allowed && last.remaining == 0 && last.resetAt == start + 60)
        // A new window starts with the first event after the old one ended.
        let fresh = await limiter.hit(.connection, key: "192.0.2.1", rule: rule, now: start + 60)
        #expect(fresh.allowed && fresh.remaining == 2 && fresh.resetAt == start + 120)
    }

    @Test("peek does not count")
    func peek() async {
        let limiter = InProcessRateLimiter()
        let now = Date()
        for _ in 0..<10 { #expect(await limiter.peek(.authFailure, key: "a", rule: rule, now: now).allowed) }
        for _ in 0..<3 { _ = await limiter.hit(.authFailure, key: "a", rule: rule, now: now) }
        #expect(!(await limiter.peek(.authFailure, key: "a", rule: rule, now: now).allowed))
    }

    @Test("concurrent hits on one key let exactly the limit through")
    func concurrent() async {
        let limiter = InProcessRateLimiter()
        let rule = RateRule(limit: 50, window: .seconds(60))
        let now = Date()
        let allowed = await withTaskGroup(of: Bool.self) { group in
            for _ in 0..<500 { group.addTask { await limiter.hit(.message, key: "k", rule: rule, now: now).allowed } }
            var count = 0
            for await answer in group where answer { count += 1 }
            return count
        }
        #expect(allowed == 50)
    }

    @Test("expired windows are pruned once the table grows")
    func pruning() async {
        let limiter = InProcessRateLimiter(pruneThreshold: 10)
        let start = Date(timeIntervalSince1970: 2_000_000)
        for index in 0..<20 { _ = await limiter.hit(.connection, key: "old-\(index)", rule: rule, now: start) }
        // Long after: the old keys are gone, and a previously exhausted key starts afresh.
        for _ in 0..<3 { _ = await limiter.hit(.connection, key: "old-0", rule: rule, now: start + 3600) }
        #expect(!(await limiter.hit(.connection, key: "old-0", rule: rule, now: start + 3600).allowed))
        #expect(await limiter.hit(.connection, key: "old-1", rule: rule, now: start + 3600).allowed)
    }

    @Test("limits from the configuration: API.md's defaults, 0 turns one off")
    func rules() throws {
        let defaults = try Configuration.load(from: [:]).rateLimits
        #expect(defaults.rule(for: .connection) == RateRule(limit: 10, window: .seconds(60)))
        #expect(defaults.rule(for: .command) == RateRule(limit: 100, window: .seconds(60)))
        #expect(defaults.rule(for: .authFailure) == RateRule(limit: 5, window: .seconds(3600)))
        #expect(defaults.rule(for: .message) == RateRule(limit: 20, window: .seconds(3600)))
        let off = try Configuration.load(from: ["SMTP_RATE_COMMANDS_PER_MINUTE": "0"]).rateLimits
        #expect(off.rule(for: .command) == nil)
        #expect(RateLimits.off.rule(for: .connection) == nil)
    }

    @Test("leases: only the holder renews or releases; an expired lease can be taken")
    func leases() async throws {
        let leases = InProcessLeaseStore()
        #expect(try await leases.acquire("job-1", token: "a", ttl: .seconds(60)))
        #expect(!(try await leases.acquire("job-1", token: "b", ttl: .seconds(60))))
        #expect(try await leases.acquire("job-1", token: "a", ttl: .seconds(60)))
        #expect(!(try await leases.renew("job-1", token: "b", ttl: .seconds(60))))
        #expect(try await leases.renew("job-1", token: "a", ttl: .seconds(60)))
        #expect(!(try await leases.release("job-1", token: "b")))
        #expect(try await leases.release("job-1", token: "a"))
        #expect(try await leases.acquire("job-1", token: "b", ttl: .milliseconds(50)))
        try await Task.sleep(for: .milliseconds(120))
        #expect(!(try await leases.renew("job-1", token: "b", ttl: .seconds(60))))
        #expect(try await leases.acquire("job-1", token: "c", ttl: .seconds(60)))
        #expect(!(try await leases.release("job-1", token: "b")))
    }
}
