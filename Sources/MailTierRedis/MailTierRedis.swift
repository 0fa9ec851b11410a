// MailTierRedis — rate limits and leases shared by every node, on Redis: a pipelined client
// whose socket NIO owns and whose RESP2 codec is hiredis (`RESPEncoder`, `RESPDecoder`,
// `RedisChannelHandler`, `RedisClient`), the `RateLimiter` with its failure policy, and the
// `LeaseStore`. Implements MailTier's ports; imports no other adapter. The C pointers of
// hiredis never leave the decoder, which lives inside one channel handler.
