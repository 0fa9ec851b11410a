import MailTier
import MailTierRedis
import Testing

@Suite(.timeLimit(.minutes(1))) struct RedisLeaseStoreTests {
    @Test(.enabled(if: TestServices.shouldRunRedisTests)) func onlyTheHolderRenewsAndReleases() async throws {
        guard let endpoint = TestServices.requireRedis() else { return }
        let client = makeClient(endpoint)
        let leases = RedisLeaseStore(client: client, namespace: uniqueNamespace())
        let ttl = Duration.seconds(30)

        #expect(try await leases.acquire("queue", token: "worker-a", ttl: ttl))
        #expect(try await leases.acquire("queue", token: "worker-b", ttl: ttl) == false)
        #expect(try await leases.acquire("queue", token: "worker-a", ttl: ttl))  // the holder may take it again
        #expect(try await client.send("GET", leases.key("queue")) == .bulk("worker-a"))

        #expect(try await leases.renew("queue", token: "worker-b", ttl: ttl) == false)
        #expect(try await leases.renew("queue", token: "worker-a", ttl: .seconds(90)))
        let ttlAfterRenew = try #require(try await client.send("PTTL", leases.key("queue")).integer)
        #expect(ttlAfterRenew > 85_000 && ttlAfterRenew <= 90_000)

        #expect(try await leases.release("queue", token: "worker-b") == false)
        #expect(try await client.send("GET", leases.key("queue")) == .bulk("worker-a"))
        #expect(try await leases.release("queue", token: "worker-a"))
        #expect(try await leases.release("queue", token: "worker-a") == false)
        #expect(try await leases.renew("queue", token: "worker-a", ttl: ttl) == false)
        #expect(try await leases.acquire("queue", token: "worker-b", ttl: ttl))
        _ = try await leases.release("queue", token: "worker-b")
        await client.shutdown()
    }

    @Test(.enabled(if: TestServices.shouldRunRedisTests)) func leaseExpiresAfterItsTTL() async throws {
        guard let endpoint = TestServices.requireRedis() else { return }
        let client = makeClient(endpoint)
        let leases = RedisLeaseStore(client: client, namespace: uniqueNamespace())
        // 8 s: on a loaded machine the second call can come seconds after the first. The wait is
        // what Redis says is left (its clock starts when the SET ran, after the connection was made).
        #expect(try await leases.acquire("delivery", token: "old", ttl: .seconds(8)))
        #expect(try await leases.acquire("delivery", token: "new", ttl: .seconds(30)) == false)
        let left = try #require(try await client.send("PTTL", leases.key("delivery")).integer)
        #expect(left > 0 && left <= 8000)
        try await Task.sleep(for: .milliseconds(left + 300))
        #expect(try await leases.renew("delivery", token: "old", ttl: .seconds(30)) == false)
        #expect(try await leases.acquire("delivery", token: "new", ttl: .seconds(30)))
        // The old holder cannot drop the new holder's lease.
        #expect(try await leases.release("delivery", token: "old") == false)
        #expect(try await leases.release("delivery", token: "new"))
        await client.shutdown()
    }

    @Test func errorsAreThrownToTheCaller() async throws {
        let port = try await freePort()
        let client = makeClient(try RedisEndpoint(url: "redis://127.0.0.1:\(port)"))
        let leases = RedisLeaseStore(client: client)
        await #expect(throws: RedisClientError.self) { try await leases.acquire("queue", token: "a", ttl: .seconds(1)) }
        await #expect(throws: RedisClientError.self) { try await leases.renew("queue", token: "a", ttl: .seconds(1)) }
        await #expect(throws: RedisClientError.self) { try await leases.release("queue", token: "a") }
        await client.shutdown()
    }
}
