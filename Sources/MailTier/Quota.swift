#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOConcurrencyHelpers

/// Per-account quotas (`quota_mb`; 0 means unlimited), measured from the mailbox store itself.
///
/// RCPT asks `isOverQuota` and delivery `wouldExceed`, both answered from a short-lived cache of
/// each mailbox's usage, which a delivery's own size is added to: measuring a mailbox lists (and,
/// for maildir, stats) every message in it, so measuring it per message made a run of deliveries
/// quadratic in the mailbox's size. Delivery measures afresh when the cache is older than
/// `cacheLifetime` or the message would take the cached usage past 90 % of the quota: other
/// processes' deliveries since the last measurement cannot push a mailbox over unless they add
/// 10 % of its quota within one cache lifetime.
public final class QuotaChecker: Sendable {
    public let mailboxes: any MailboxStore
    private let cacheLifetime: Duration
    private let cache = NIOLockedValueBox<[String: (bytes: Int64, measured: ContinuousClock.Instant)]>([:])

    public init(mailboxes: any MailboxStore, cacheLifetime: Duration = .seconds(10)) {
        self.mailboxes = mailboxes
        self.cacheLifetime = cacheLifetime
    }

    static func limitBytes(_ user: User) -> Int64? {
        user.quotaMB > 0 ? Int64(user.quotaMB) * 1_048_576 : nil
    }

    /// True when the mailbox already holds its quota or more (RCPT: 452 4.2.2).
    public func isOverQuota(_ user: User) async throws -> Bool {
        guard let limit = Self.limitBytes(user) else { return false }
        let now = ContinuousClock.now
        if let cached = cache.withLockedValue({ $0[user.email] }), now - cached.measured < cacheLifetime {
            return cached.bytes >= limit
        }
        let bytes = try await mailboxes.usageBytes(of: user.email)
        cache.withLockedValue { $0[user.email] = (bytes, now) }
        return bytes >= limit
    }

    /// True when storing `size` more bytes would take the mailbox over its quota (delivery defers).
    public func wouldExceed(_ user: User, adding size: Int) async throws -> Bool {
        guard let limit = Self.limitBytes(user) else { return false }
        let now = ContinuousClock.now
        if let cached = cache.withLockedValue({ $0[user.email] }), now - cached.measured < cacheLifetime,
            (cached.bytes + Int64(size)) * 10 <= limit * 9
        {
            // Far from the limit: count this message in, keep the measurement's time.
            cache.withLockedValue { $0[user.email] = (cached.bytes + Int64(size), cached.measured) }
            return false
        }
        let bytes = try await mailboxes.usageBytes(of: user.email)
        let exceeds = bytes + Int64(size) > limit
        // What the mailbox will hold: a deferred message is not stored, so it does not count
        // (RCPT must not answer "mailbox full" for a mailbox that is not).
        cache.withLockedValue { $0[user.email] = (exceeds ? bytes : bytes + Int64(size), .now) }
        return exceeds
    }
}
