import Logging
import MailTier

/// What the executables call: the rate limiter and lease store a configuration selects.
public enum RedisServices {
    /// With `redisURL` set: `RedisRateLimiter` (with the `redisFailure` policy and a per-node
    /// fallback) and `RedisLeaseStore`, sharing one `RedisClient` — put the client in the
    /// `ServiceGroup` before the services that use it (it connects lazily; its `run()` only
    /// waits to shut down). Without: the in-process adapters and no client.
    ///
    /// Throws only for a URL that `Configuration` would not have accepted.
    public static func make(
        configuration: Configuration, logger: Logger
    ) throws(RedisEndpoint.InvalidURL) -> (limiter: any RateLimiter, leases: any LeaseStore, client: RedisClient?) {
        guard let url = configuration.redisURL else {
            return (InProcessRateLimiter(), InProcessLeaseStore(), nil)
        }
        var logger = logger
        logger[metadataKey: "component"] = "redis"
        let client = RedisClient(configuration: .init(endpoint: try RedisEndpoint(url: url)), logger: logger)
        let limiter = RedisRateLimiter(counter: RedisRateCounter(client: client), policy: configuration.redisFailure, logger: logger)
        return (limiter, RedisLeaseStore(client: client), client)
    }
}
