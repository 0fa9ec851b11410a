import Crypto
import Foundation
import Hummingbird
import MailTier
import NIOConcurrencyHelpers
import NIOCore

/// The request context of the admin application: the client's address (for rate limits and
/// login throttling) and, once `AuthenticationMiddleware` has run, the user.
public struct AdminRequestContext: RequestContext, RemoteAddressRequestContext {
    public var coreContext: CoreRequestContextStorage
    public var remoteAddress: SocketAddress?
    /// The authenticated user; nil on `/health` and before authentication.
    public var user: User?

    public init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.remoteAddress = source.channel.remoteAddress
        self.user = nil
    }

    /// The client address as rate-limit keys use it (`unknown` in router tests).
    var clientKey: String { remoteAddress?.ipAddress ?? "unknown" }
}

/// An API error: a status and the JSON body `{"error": code, "message": message}`.
public struct APIError: Error, Sendable {
    public var status: HTTPResponse.Status
    public var code: String
    public var message: String
    public var headers: HTTPFields

    public init(_ status: HTTPResponse.Status, _ code: String, _ message: String, headers: HTTPFields = [:]) {
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
    }

    static func badRequest(_ message: String) -> APIError { APIError(.badRequest, "bad_request", message) }
    static func notFound(_ message: String) -> APIError { APIError(.notFound, "not_found", message) }
    static let forbidden = APIError(.forbidden, "forbidden", "this needs an administrator")

    static func unauthorized(_ message: String) -> APIError {
        APIError(.unauthorized, "unauthorized", message, headers: [.wwwAuthenticate: "Basic realm=\"mailtier\", charset=\"UTF-8\""])
    }

    static func tooManyRequests(retryAfter: Int, _ message: String) -> APIError {
        APIError(.tooManyRequests, "too_many_requests", message, headers: [.retryAfter: "\(max(1, retryAfter))"])
    }

    var response: Response {
        var response = AdminAPI.errorResponse(status, error: code, message: message)
        response.headers.append(contentsOf: headers)
        return response
    }
}

/// HTTP Basic authentication against the users table (Argon2id), for the admin API.
///
/// - A verified `Authorization` value is remembered for `cacheLifetime`, keyed by its SHA-256,
///   with the password hash it was verified against: while the account keeps that hash and stays
///   enabled, the header is accepted without another Argon2id run (64 MB, ~100 ms each). The
///   account itself is read on every request, so a disabled, deleted or demoted account takes
///   effect at once, on every node.
/// - At most `maxConcurrentVerifications` Argon2id verifications run at a time; others wait.
/// - An unknown user and a wrong password give the same answer in the same time (the account
///   service verifies against a dummy hash for unknown users).
/// - Failures are counted per client address and per username (`RateLimitKind.apiAuthFailure`):
///   over the limit, requests with credentials get 429 with `Retry-After`, before any verification.
public final class APIAuthenticator: Sendable {
    public struct Settings: Sendable {
        public var cacheLifetime: Duration
        public var cacheCapacity: Int
        public var maxConcurrentVerifications: Int
        /// Failed logins per window, per address and per username; nil: no throttling.
        public var failureRule: RateRule?

        public init(
            cacheLifetime: Duration = .seconds(300), cacheCapacity: Int = 10_000, maxConcurrentVerifications: Int = 2,
            failureRule: RateRule?
        ) {
            self.cacheLifetime = cacheLifetime
            self.cacheCapacity = cacheCapacity
            self.maxConcurrentVerifications = maxConcurrentVerifications
            self.failureRule = failureRule
        }
    }

    private struct Verified {
        var username: String
        var passwordHash: String
        var expires: ContinuousClock.Instant
    }

    let accounts: AccountService
    let limiter: any RateLimiter
    let settings: Settings
    /// Where a failed login's `auth.failed` webhook event goes; nil: none is written.
    let failedLogins: (any EventOutbox)?
    private let cache = NIOLockedValueBox<[String: Verified]>([:])
    private let verifications: AsyncLimit

    public init(accounts: AccountService, limiter: any RateLimiter, settings: Settings, failedLogins: (any EventOutbox)? = nil) {
        self.failedLogins = failedLogins
        self.accounts = accounts
        self.limiter = limiter
        self.settings = settings
        self.verifications = AsyncLimit(settings.maxConcurrentVerifications)
    }

    /// The user the `Authorization` header proves, or an `APIError` (401 or 429).
    func authenticate(_ header: String?, client: String) async throws -> User {
        guard let header else { throw APIError.unauthorized("authentication required") }
        guard let (username, password) = Self.basicCredentials(header) else {
            throw APIError.unauthorized("malformed Authorization header: expected Basic base64(username:password)")
        }
        let key = Self.cacheKey(header)
        if let user = try await cachedUser(key) { return user }

        let now = Date()
        if let rule = settings.failureRule {
            for limitKey in ["ip:\(client)", "user:\(username.lowercased())"] {
                let decision = await limiter.peek(.apiAuthFailure, key: limitKey, rule: rule, now: now)
                if !decision.allowed {
                    throw APIError.tooManyRequests(
                        retryAfter: Int(decision.resetAt.timeIntervalSince(now).rounded(.up)),
                        "too many failed logins; try again later")
                }
            }
        }
        let user = try await verifications.run { try await accounts.authenticate(login: username, password: password) }
        guard let user else {
            if let rule = settings.failureRule {
                for limitKey in ["ip:\(client)", "user:\(username.lowercased())"] {
                    _ = await limiter.hit(.apiAuthFailure, key: limitKey, rule: rule, now: now)
                }
            }
            // Best effort, like SMTP AUTH's: a failed login is not refused for want of its event.
            try? await failedLogins?.append(.authFailed(username: String(username.prefix(256)), clientAddress: client, at: now))
            throw APIError.unauthorized("invalid credentials")
        }
        remember(key, user)
        return user
    }

    /// A remembered header whose account still has the verified hash and is enabled.
    private func cachedUser(_ key: String) async throws -> User? {
        let now = ContinuousClock.now
        guard let entry = cache.withLockedValue({ $0[key] }), entry.expires > now else { return nil }
        guard let user = try await accounts.users.user(named: entry.username), user.enabled,
            user.passwordHash == entry.passwordHash
        else {
            _ = cache.withLockedValue { $0.removeValue(forKey: key) }
            return nil
        }
        return user
    }

    private func remember(_ key: String, _ user: User) {
        let now = ContinuousClock.now
        let entry = Verified(username: user.username, passwordHash: user.passwordHash, expires: now + settings.cacheLifetime)
        cache.withLockedValue { cache in
            if cache.count >= settings.cacheCapacity {
                cache = cache.filter { $0.value.expires > now }
                if cache.count >= settings.cacheCapacity { cache.removeAll() }
            }
            cache[key] = entry
        }
    }

    static func cacheKey(_ header: String) -> String {
        SHA256.hash(data: Data(header.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    /// `Basic <base64(username:password)>` (RFC 7617; the scheme is case-insensitive). The
    /// username ends at the first colon.
    static func basicCredentials(_ header: String) -> (username: String, password: String)? {
        let parts = header.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
        guard parts.count == 2, parts[0].lowercased() == "basic", parts[1].utf8.count <= 8192,
            let decoded = Data(base64Encoded: String(parts[1]).trimmingCharacters(in: .whitespaces)),
            let text = String(data: decoded, encoding: .utf8),
            let colon = text.firstIndex(of: ":")
        else { return nil }
        let username = String(text[..<colon])
        guard !username.isEmpty else { return nil }
        return (username, String(text[text.index(after: colon)...]))
    }
}

/// At most `limit` bodies at once; the others wait their turn.
final class AsyncLimit: Sendable {
    private struct State {
        var free: Int
        var waiters: [CheckedContinuation<Void, Never>] = []
    }

    private let state: NIOLockedValueBox<State>

    init(_ limit: Int) {
        state = NIOLockedValueBox(State(free: max(1, limit)))
    }

    func run<T: Sendable>(_ body: () async throws -> T) async throws -> T {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = state.withLockedValue { state -> Bool in
                if state.free > 0 {
                    state.free -= 1
                    return true
                }
                state.waiters.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
        defer {
            let next = state.withLockedValue { state -> CheckedContinuation<Void, Never>? in
                if state.waiters.isEmpty {
                    state.free += 1
                    return nil
                }
                return state.waiters.removeFirst()
            }
            next?.resume()
        }
        return try await body()
    }
}

/// Authenticates every request but `/health` (and `/openapi.json`), counts it against the
/// per-address API rate limit, and puts `X-RateLimit-*` on the response (API.md "Rate Limiting").
struct AuthenticationMiddleware: RouterMiddleware {
    typealias Context = AdminRequestContext

    let authenticator: APIAuthenticator
    /// Requests per window per client address; nil: no limit.
    let requestRule: RateRule?

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var context = context
        let now = Date()
        var decision: RateDecision?
        if let requestRule {
            let hit = await authenticator.limiter.hit(.apiRequest, key: "ip:\(context.clientKey)", rule: requestRule, now: now)
            decision = hit
            if !hit.allowed {
                var error = APIError.tooManyRequests(
                    retryAfter: Int(hit.resetAt.timeIntervalSince(now).rounded(.up)), "request rate limit exceeded")
                error.headers.append(contentsOf: Self.rateHeaders(hit, rule: requestRule))
                throw error
            }
        }
        context.user = try await authenticator.authenticate(request.headers[.authorization], client: context.clientKey)
        var response = try await next(request, context)
        if let decision, let requestRule { response.headers.append(contentsOf: Self.rateHeaders(decision, rule: requestRule)) }
        return response
    }

    static func rateHeaders(_ decision: RateDecision, rule: RateRule) -> HTTPFields {
        [
            .xRateLimitLimit: "\(rule.limit)",
            .xRateLimitRemaining: "\(max(0, decision.remaining))",
            .xRateLimitReset: "\(Int(decision.resetAt.timeIntervalSince1970.rounded(.up)))",
        ]
    }
}

extension HTTPFields.Element.Name {
    static let xRateLimitLimit = Self("X-RateLimit-Limit")!
    static let xRateLimitRemaining = Self("X-RateLimit-Remaining")!
    static let xRateLimitReset = Self("X-RateLimit-Reset")!
}
