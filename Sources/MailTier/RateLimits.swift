#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOConcurrencyHelpers
import SMTPNIO

// MARK: - Limits

/// The per-client-address limits of API.md "Rate Limiting". 0 turns one off.
public struct RateLimits: Sendable, Equatable {
    public var connectionsPerMinute: Int
    public var commandsPerMinute: Int
    public var authFailuresPerHour: Int
    public var messagesPerHour: Int

    public init(connectionsPerMinute: Int, commandsPerMinute: Int, authFailuresPerHour: Int, messagesPerHour: Int) {
        self.connectionsPerMinute = connectionsPerMinute
        self.commandsPerMinute = commandsPerMinute
        self.authFailuresPerHour = authFailuresPerHour
        self.messagesPerHour = messagesPerHour
    }

    /// Every limit off.
    public static let off = RateLimits(connectionsPerMinute: 0, commandsPerMinute: 0, authFailuresPerHour: 0, messagesPerHour: 0)

    /// The limit and window of one kind; nil when it is off.
    public func rule(for kind: RateLimitKind) -> RateRule? {
        let rule: RateRule
        switch kind {
        case .connection: rule = RateRule(limit: connectionsPerMinute, window: .seconds(60))
        case .command: rule = RateRule(limit: commandsPerMinute, window: .seconds(60))
        case .authFailure: rule = RateRule(limit: authFailuresPerHour, window: .seconds(3600))
        case .message: rule = RateRule(limit: messagesPerHour, window: .seconds(3600))
        case .apiRequest: rule = RateRule(limit: commandsPerMinute, window: .seconds(60))
        case .apiAuthFailure: rule = RateRule(limit: authFailuresPerHour, window: .seconds(3600))
        }
        return rule.limit > 0 ? rule : nil
    }
}

/// What is counted per client address.
public enum RateLimitKind: String, Sendable, CaseIterable {
    case connection
    case command
    case authFailure = "auth"
    case message
    /// Admin API requests (the `commandsPerMinute` rule), per client address.
    case apiRequest = "api"
    /// Failed admin API logins (the `authFailuresPerHour` rule), per client address and per username.
    case apiAuthFailure = "api-auth"
}

/// At most `limit` events per `window`.
public struct RateRule: Sendable, Equatable {
    public var limit: Int
    public var window: Duration

    public init(limit: Int, window: Duration) {
        self.limit = limit
        self.window = window
    }
}

/// The answer of a rate limiter for one event.
public struct RateDecision: Sendable, Equatable {
    /// Whether the event is within the limit.
    public var allowed: Bool
    /// Events left in the current window after this one (0 when refused).
    public var remaining: Int
    /// When the current window ends.
    public var resetAt: Date
    /// Refused because the shared counters cannot be reached (`SMTP_REDIS_FAILURE=closed`),
    /// not because the client went over the limit.
    public var unavailable: Bool

    public init(allowed: Bool, remaining: Int, resetAt: Date, unavailable: Bool = false) {
        self.allowed = allowed
        self.remaining = remaining
        self.resetAt = resetAt
        self.unavailable = unavailable
    }

    /// The answer for a limit that is off.
    public static func unlimited(now: Date) -> RateDecision { RateDecision(allowed: true, remaining: .max, resetAt: now) }
}

/// Counts events per client address in fixed windows that start at an address's first event
/// (the window of a key starts when it is first counted and lasts `rule.window`).
///
/// Implemented in-process (embedded mode) and on Redis (every node shares the counts; the
/// increment and the window's start are one atomic step, so two nodes cannot both admit the
/// event over the limit).
public protocol RateLimiter: Sendable {
    /// Counts one event and answers whether it is within `rule` — the event over the limit is
    /// refused, and so is every later one until the window ends.
    func hit(_ kind: RateLimitKind, key: String, rule: RateRule, now: Date) async -> RateDecision
    /// Answers whether one more event would be within `rule`, without counting it (a check
    /// before an AUTH attempt whose failure is then counted with `hit`).
    func peek(_ kind: RateLimitKind, key: String, rule: RateRule, now: Date) async -> RateDecision
}

/// The limiter of one process: a dictionary of windows under a lock, pruned as it grows.
public final class InProcessRateLimiter: RateLimiter {
    private struct Window {
        var count: Int
        var end: Date
    }

    private let windows = NIOLockedValueBox<[String: Window]>([:])
    /// Above this many keys, expired windows are dropped on the next hit.
    private let pruneThreshold: Int

    public init(pruneThreshold: Int = 10_000) {
        self.pruneThreshold = pruneThreshold
    }

    public func hit(_ kind: RateLimitKind, key: String, rule: RateRule, now: Date) async -> RateDecision {
        hitNow(kind, key: key, rule: rule, now: now)
    }

    /// `hit` without suspension, for callers outside async code.
    public func hitNow(_ kind: RateLimitKind, key: String, rule: RateRule, now: Date) -> RateDecision {
        let name = "\(kind.rawValue):\(key)"
        return windows.withLockedValue { windows in
            if windows.count > pruneThreshold {
                windows = windows.filter { $0.value.end > now }
            }
            var window = windows[name].flatMap { $0.end > now ? $0 : nil } ?? Window(count: 0, end: now + rule.window.timeInterval)
            window.count += 1
            windows[name] = window
            return RateDecision(allowed: window.count <= rule.limit, remaining: max(0, rule.limit - window.count), resetAt: window.end)
        }
    }

    public func peek(_ kind: RateLimitKind, key: String, rule: RateRule, now: Date) async -> RateDecision {
        let name = "\(kind.rawValue):\(key)"
        let count = windows.withLockedValue { windows in windows[name].flatMap { $0.end > now ? $0.count : nil } ?? 0 }
        let end = windows.withLockedValue { $0[name]?.end } ?? now + rule.window.timeInterval
        return RateDecision(allowed: count < rule.limit, remaining: max(0, rule.limit - count), resetAt: end)
    }
}

extension Duration {
    /// Seconds as a `TimeInterval`.
    public var timeInterval: TimeInterval {
        let (seconds, attoseconds) = components
        return TimeInterval(seconds) + TimeInterval(attoseconds) / 1e18
    }
}

// MARK: - Leases

/// Named leases with a holder token and a time to live, for delivery workers: only the holder
/// of the token can renew or release a lease, and a lease nobody renews expires by itself.
public protocol LeaseStore: Sendable {
    /// Takes `name` for `token` when nobody holds it (or its holder's lease expired).
    func acquire(_ name: String, token: String, ttl: Duration) async throws -> Bool
    /// Extends the lease when `token` still holds it.
    func renew(_ name: String, token: String, ttl: Duration) async throws -> Bool
    /// Gives the lease up when `token` still holds it; a lease taken over by another holder is left alone.
    func release(_ name: String, token: String) async throws -> Bool
}

/// Leases of one process (embedded mode), with the same semantics as the Redis ones.
public final class InProcessLeaseStore: LeaseStore {
    private struct Lease {
        var token: String
        var until: ContinuousClock.Instant
    }

    private let leases = NIOLockedValueBox<[String: Lease]>([:])

    public init() {}

    public func acquire(_ name: String, token: String, ttl: Duration) async throws -> Bool {
        let now = ContinuousClock.now
        return leases.withLockedValue { leases in
            if let lease = leases[name], lease.until > now, lease.token != token { return false }
            leases[name] = Lease(token: token, until: now + ttl)
            return true
        }
    }

    public func renew(_ name: String, token: String, ttl: Duration) async throws -> Bool {
        let now = ContinuousClock.now
        return leases.withLockedValue { leases in
            guard let lease = leases[name], lease.token == token, lease.until > now else { return false }
            leases[name]?.until = now + ttl
            return true
        }
    }

    public func release(_ name: String, token: String) async throws -> Bool {
        leases.withLockedValue { leases in
            guard let lease = leases[name], lease.token == token else { return false }
            leases[name] = nil
            return true
        }
    }
}

// MARK: - Redis endpoint

/// Where Redis is: `redis://[[user]:password@]host[:port][/db]`.
public struct RedisEndpoint: Sendable, Equatable {
    public var host: String
    public var port: Int
    public var username: String?
    public var password: String?
    public var database: Int

    public struct InvalidURL: Error, Sendable {}

    public init(url text: String) throws(InvalidURL) {
        guard text.lowercased().hasPrefix("redis://"), let components = URLComponents(string: text),
            var host = components.host, !host.isEmpty
        else { throw InvalidURL() }
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        self.host = host
        self.port = components.port ?? 6379
        guard (1...65_535).contains(port), components.query == nil, components.fragment == nil else { throw InvalidURL() }
        let user = components.user.flatMap { $0.isEmpty ? nil : $0 }
        self.username = user
        self.password = components.password.flatMap { $0.isEmpty ? nil : $0 }
        var path = components.path
        if path.hasPrefix("/") { path.removeFirst() }
        if path.isEmpty {
            database = 0
        } else {
            guard let number = Int(path), (0...1_000_000).contains(number), path.allSatisfy(\.isASCII) else { throw InvalidURL() }
            database = number
        }
    }
}
