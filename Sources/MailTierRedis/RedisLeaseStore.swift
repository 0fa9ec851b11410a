import MailTier

/// Leases in Redis, shared by every node: a lease is the key `<namespace>:lease:<name>`
/// holding its holder's token, expiring after the TTL unless renewed.
///
/// - `acquire`: `SET key token NX PX ttl`; when the key exists, the holder itself may take it
///   again (like `InProcessLeaseStore`), which is the compare-and-extend of `renew`.
/// - `renew` / `release`: Lua scripts that compare the token and only then `PEXPIRE` / `DEL`,
///   atomically — a worker whose lease expired and was taken over cannot extend or drop the
///   new holder's lease.
///
/// Throws `RedisClientError` when Redis does not answer: the caller decides (a delivery
/// worker that cannot renew must stop before its lease could have run out).
public struct RedisLeaseStore: LeaseStore {
    public let client: RedisClient
    public let namespace: String

    /// KEYS[1] the lease, ARGV[1] the token, ARGV[2] the TTL in ms → 1 when extended.
    static let renewScript = RedisScript(
        """
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('PEXPIRE', KEYS[1], ARGV[2])
        end
        return 0
        """)

    /// KEYS[1] the lease, ARGV[1] the token → 1 when deleted.
    static let releaseScript = RedisScript(
        """
        if redis.call('GET', KEYS[1]) == ARGV[1] then
            return redis.call('DEL', KEYS[1])
        end
        return 0
        """)

    public init(client: RedisClient, namespace: String = "mailtier") {
        self.client = client
        self.namespace = namespace
    }

    public func key(_ name: String) -> String { "\(namespace):lease:\(name)" }

    public func acquire(_ name: String, token: String, ttl: Duration) async throws -> Bool {
        let milliseconds = String(RedisRateCounter.milliseconds(ttl))
        let reply = try await client.send(["SET", key(name), token, "NX", "PX", milliseconds]).checked()
        switch reply {
        case .simpleString("OK"): return true
        case .null: return try await renew(name, token: token, ttl: ttl)
        default: throw RedisClientError(.unexpectedReply, "SET NX answered \(reply)")
        }
    }

    public func renew(_ name: String, token: String, ttl: Duration) async throws -> Bool {
        try await flag(client.evaluate(Self.renewScript, keys: [key(name)], arguments: [token, String(RedisRateCounter.milliseconds(ttl))]))
    }

    public func release(_ name: String, token: String) async throws -> Bool {
        try await flag(client.evaluate(Self.releaseScript, keys: [key(name)], arguments: [token]))
    }

    private func flag(_ reply: RedisReply) throws(RedisClientError) -> Bool {
        guard let value = try reply.checked().integer else { throw RedisClientError(.unexpectedReply, "lease script answered \(reply)") }
        return value == 1
    }
}
