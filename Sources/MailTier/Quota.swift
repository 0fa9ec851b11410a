#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOConcurrencyHelpers

/// Per-account quotas (`quota_mb`; 0 means unlimited), measured from the mailbox store itself.
///
/// RCPT asks `isOverQuota` (answered from a short-lived cache, so a busy mailbox is not measured
/// for every recipient); delivery asks `wouldExceed` with a fresh measurement.
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
        let bytes = try await mailboxes.usageBytes(of: user.email)
        let exceeds = bytes + Int64(size) > limit
        // What the mailbox will hold: a deferred message is not stored, so it does not count
        // (RCPT must not answer "mailbox full" for a mailbox that is not).
        cache.withLockedValue { $0[user.email] = (exceeds ? bytes : bytes + Int64(size), .now) }
        return exceeds
    }
}
