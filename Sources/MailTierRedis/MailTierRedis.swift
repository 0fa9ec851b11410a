// MailTierRedis: rate limits and leases on Redis (hiredis as the RESP codec, NIO for the socket).
