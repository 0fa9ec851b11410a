#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import ServiceLifecycle

/// Why one delivery attempt did not succeed, in the terms a DSN reports (RFC 3464 §2.3).
public struct DeliveryProblem: Error, Sendable, Equatable, CustomStringConvertible {
    /// True when trying again cannot help (a 5xx, a null MX, an unknown mailbox): fail at once.
    public var isPermanent: Bool
    /// RFC 3463 status: `5.1.1`, `4.4.1`.
    public var status: String
    /// What went wrong, for the queue's `last_error` and logs.
    public var message: String
    /// The peer's reply, as a DSN's `Diagnostic-Code` (`smtp; 550 5.1.1 no such user`), if one came.
    public var diagnostic: String?
    /// The host that gave the reply (`dns; mx.example.com`), if any.
    public var remoteMTA: String?

    public init(isPermanent: Bool, status: String, message: String, diagnostic: String? = nil, remoteMTA: String? = nil) {
        self.isPermanent = isPermanent
        self.status = status
        self.message = message
        self.diagnostic = diagnostic
        self.remoteMTA = remoteMTA
    }

    public static func temporary(_ status: String, _ message: String) -> DeliveryProblem {
        DeliveryProblem(isPermanent: false, status: status, message: message)
    }

    public static func permanent(_ status: String, _ message: String) -> DeliveryProblem {
        DeliveryProblem(isPermanent: true, status: status, message: message)
    }

    public var description: String { message }
}

/// Carries remote recipients' mail to other hosts (MX lookup or a relay, then outbound SMTP).
public protocol RemoteTransport: Sendable {
    /// Delivers `message` (the spooled blob, without a Return-Path) to `jobs`, which all belong to
    /// one message and one recipient domain, in as few SMTP transactions as the peer allows.
    /// Returns one result per job, in the order of `jobs`: nil when the recipient was accepted.
    func deliver(_ message: ByteBuffer, jobs: [DeliveryJob]) async -> [DeliveryProblem?]
}

/// One recipient that failed for good: what a bounce (DSN) reports.
public struct FailedDelivery: Sendable, Equatable {
    public enum Reason: Sendable, Equatable {
        /// The destination refused it (5xx, null MX, no such domain or mailbox).
        case permanent
        /// Still temporary failures when attempts or the queue age ran out.
        case expired
        /// The DELIVERBY deadline passed (RFC 2852, `;R`).
        case deadline
    }

    public var job: DeliveryJob
    public var problem: DeliveryProblem
    public var reason: Reason

    public init(job: DeliveryJob, problem: DeliveryProblem, reason: Reason) {
        self.job = job
        self.problem = problem
        self.reason = reason
    }
}

/// Hears of recipients that failed for good, before their failure is recorded (so a crash in
/// between repeats the notice rather than losing it): the bounce generator.
public protocol FailureNotifier: Sendable {
    func notify(_ failures: [FailedDelivery]) async throws
}

/// The delivery role: claims due jobs under a lease, delivers them, records each result fenced
/// by its lease token, and removes a message's blob once every recipient has it.
///
/// Local recipients go into the mailbox store; remote ones through `remote` (without it, remote
/// recipients stay queued: a node that cannot send leaves them to one that can).
public final class DeliveryService: Service, Sendable {
    public struct Settings: Sendable {
        /// Embedded mode: this is the only worker, so leases left by a crash are released at start.
        public var exclusive: Bool
        public var pollInterval: Duration
        public var batchSize: Int
        public var lease: Duration
        /// Delay before retry n (1-based); the last entry repeats.
        public var retrySchedule: [Duration]
        /// A recipient still not delivered this long after acceptance fails for good.
        public var maxAge: Duration
        /// How long a spool blob without rows is kept before garbage collection.
        public var orphanGrace: Duration
        /// On graceful shutdown, how long deliveries in flight may go on; then they are cut and
        /// their leases released.
        public var shutdownGrace: Duration

        public init(
            exclusive: Bool, pollInterval: Duration, batchSize: Int = 64, lease: Duration = .seconds(300),
            retrySchedule: [Duration] = [.seconds(60), .seconds(300), .seconds(1800), .seconds(7200), .seconds(28800)],
            maxAge: Duration = .seconds(432_000), orphanGrace: Duration = .seconds(900), shutdownGrace: Duration = .seconds(30)
        ) {
            self.shutdownGrace = shutdownGrace
            self.exclusive = exclusive
            self.pollInterval = pollInterval
            self.batchSize = batchSize
            self.lease = lease
            self.retrySchedule = retrySchedule.isEmpty ? [.seconds(60)] : retrySchedule
            self.maxAge = maxAge
            self.orphanGrace = orphanGrace
        }

        /// The settings a configuration asks for.
        public init(configuration: Configuration, exclusive: Bool) {
            self.init(
                exclusive: exclusive, pollInterval: .seconds(configuration.queuePollSeconds),
                lease: .seconds(configuration.leaseSeconds), retrySchedule: configuration.retrySchedule.map { .seconds($0) },
                maxAge: .seconds(configuration.maxQueueAgeSeconds), shutdownGrace: .seconds(configuration.shutdownGraceSeconds))
        }
    }

    private let queue: any MessageQueue
    private let spool: any BlobStore
    private let mailboxes: any MailboxStore
    private let settings: Settings
    private let doorbell: Doorbell
    private let quota: (users: any UserStore, checker: QuotaChecker)?
    private let remote: (any RemoteTransport)?
    private let notifier: (any FailureNotifier)?
    private let leases: (any LeaseStore)?
    /// `GET /stats`'s `messages.sent`, when given.
    private let counters: ProcessCounters?
    private let delivered: Counter
    private let failed: Counter
    private let logger: Logger

    /// Counts recipients whose delivery was recorded as done (`status="delivered"`) or failed for
    /// good (`status="failed"`), API.md's `smtp_messages_sent_total{status}`.
    public static let sentMetric = MailTierMetrics.messagesSent

    /// With `quota`, a message that would take an account over its quota is deferred (and failed
    /// once its attempts run out). Without `remote`, only local recipients are claimed. Without
    /// `notifier`, failures are recorded and logged but nobody is told.
    public init(
        queue: any MessageQueue, spool: any BlobStore, mailboxes: any MailboxStore, settings: Settings, doorbell: Doorbell,
        quota: (users: any UserStore, checker: QuotaChecker)? = nil, remote: (any RemoteTransport)? = nil,
        notifier: (any FailureNotifier)? = nil, leases: (any LeaseStore)? = nil, metricsFactory: (any MetricsFactory)? = nil,
        counters: ProcessCounters? = nil, logger: Logger
    ) {
        self.counters = counters
        self.leases = leases
        delivered = MailTierMetrics.counter(Self.sentMetric, [("status", "delivered")], factory: metricsFactory)
        failed = MailTierMetrics.counter(Self.sentMetric, [("status", "failed")], factory: metricsFactory)
        self.queue = queue
        self.spool = spool
        self.mailboxes = mailboxes
        self.settings = settings
        self.doorbell = doorbell
        self.quota = quota
        self.remote = remote
        self.notifier = notifier
        self.logger = logger
    }

    /// A local delivery that cannot happen now.
    struct MailboxFull: Error, CustomStringConvertible {
        var quotaMB: Int
        var description: String { "mailbox full (quota \(quotaMB) MB)" }
    }

    public func run() async throws {
        if settings.exclusive { try await queue.releaseAllLeases() }
        logger.info(
            "delivery started",
            metadata: ["poll_seconds": "\(settings.pollInterval.components.seconds)", "remote": "\(remote != nil)"])
        await collectOrphanBlobs()
        var lastCollection = ContinuousClock.now
        await withGracefulShutdownHandler {
            while !Task.isShuttingDownGracefully && !Task.isCancelled {
                let delivered: Int
                do {
                    delivered = try await runOnce()
                } catch {
                    logger.error("delivery loop error", metadata: ["error": "\(error)"])
                    delivered = 0
                }
                if ContinuousClock.now - lastCollection > .seconds(3600) {
                    await collectOrphanBlobs()
                    lastCollection = .now
                }
                if delivered == 0 && !Task.isShuttingDownGracefully {
                    await doorbell.wait(timeout: settings.pollInterval)
                }
            }
        } onGracefulShutdown: { [doorbell] in
            doorbell.ring()
        }
        logger.info("delivery stopped")
    }

    /// Claims one batch and delivers it. Returns the number of jobs handled.
    @discardableResult
    public func runOnce(now: Date = Date()) async throws -> Int {
        let claimed = try await queue.claimDue(
            now: now, limit: settings.batchSize, lease: settings.lease, localOnly: remote == nil,
            makeDeliveryKey: { [mailboxes] in mailboxes.makeDeliveryKey() })
        return try await process(claimed, now: now, remote: remote)
    }

    /// ATRN (RFC 2645): claims the mail waiting for `domains`, due or not, and delivers it through
    /// `transport` — the connection the peer turned around — in batches until none is left.
    /// Results are recorded, retried and bounced as in `runOnce`. Returns the number of jobs.
    @discardableResult
    public func deliverWaiting(domains: [String], through transport: any RemoteTransport) async throws -> Int {
        var total = 0
        while true {
            let now = Date()
            let claimed = try await queue.claimWaiting(
                domains: domains, now: now, limit: settings.batchSize, lease: settings.lease,
                makeDeliveryKey: { [mailboxes] in mailboxes.makeDeliveryKey() })
            guard !claimed.isEmpty else { return total }
            total += try await process(claimed, now: now, remote: transport)
        }
    }

    /// Delivers claimed jobs (local ones to the mailboxes, remote ones through `remote`), then
    /// notifies failures, records every outcome and drops finished blobs.
    private func process(_ claimed: [DeliveryJob], now: Date, remote: (any RemoteTransport)?) async throws -> Int {
        let claimedAt = ContinuousClock.now
        let jobs = await mirrorLeases(claimed)
        guard !jobs.isEmpty else { return 0 }
        // RFC 2852 `BY=…;R` past its deadline: no attempt; the sender hears of it.
        let missed = jobs.filter { $0.missedDeadline(at: now) }
        // Leases renewed while it runs; on graceful shutdown, cut after the grace period.
        let (results, unfinished) = await attemptHoldingLeases(
            jobs.filter { !$0.missedDeadline(at: now) }, now: now, claimedAt: claimedAt, remote: remote)
        var outcomes: [(job: DeliveryJob, outcome: DeliveryOutcome)] = []
        var failures: [FailedDelivery] = []
        for (job, problem) in results {
            let (outcome, failure) = settle(job, problem, now: now)
            outcomes.append((job, outcome))
            if let failure { failures.append(failure) }
        }
        for job in missed {
            let problem = DeliveryProblem.deadlineExpired
            logger.error(
                "delivery failed", metadata: ["queue_id": "\(job.messageID)", "to": "<\(job.recipient)>", "error": "\(problem.message)"])
            outcomes.append((job, .failed(error: problem.message)))
            failures.append(FailedDelivery(job: job, problem: problem, reason: .deadline))
        }
        if !failures.isEmpty, let notifier {
            // Before recording: a crash in between repeats the notice, it never loses it.
            try await notifier.notify(failures)
        }
        let recorded = try await queue.recordOutcomes(outcomes, now: Date())
        count(outcomes, recorded: recorded)
        if !unfinished.isEmpty {
            try await queue.releaseLeases(unfinished)
            logger.info("released the leases of unfinished deliveries", metadata: ["count": "\(unfinished.count)"])
        }
        await releaseMirroredLeases(jobs)
        // Together, not one after the other: the spool's deletes then share commits (SQLite),
        // or run in parallel (files, S3).
        await withTaskGroup(of: Void.self) { group in
            for key in recorded.finishedBlobKeys {
                group.addTask { [spool, logger] in
                    do {
                        try await spool.delete(key: key)
                    } catch {
                        logger.warning("cannot delete blob", metadata: ["key": "\(key)", "error": "\(error)"])
                    }
                }
            }
        }
        return jobs.count
    }

    /// Cluster mode (a `LeaseStore`): takes `leaseName(job)` for each claimed job with its token and the
    /// lease TTL. A job refused there is held by another worker: it is skipped, and its database
    /// lease left to expire. When the store cannot be reached the database lease alone decides
    /// (results are fenced by it anyway).
    private func mirrorLeases(_ jobs: [DeliveryJob]) async -> [DeliveryJob] {
        guard let leases, !jobs.isEmpty else { return jobs }
        var held: [DeliveryJob] = []
        for job in jobs {
            do {
                if try await leases.acquire(Self.leaseName(job), token: job.leaseToken, ttl: settings.lease) {
                    held.append(job)
                } else {
                    logger.warning("job leased by another worker, skipped", metadata: ["queue_id": "\(job.messageID)", "job": "\(job.id)"])
                }
            } catch {
                logger.warning("lease store unreachable, the database lease fences the job", metadata: ["error": "\(error)"])
                held.append(job)
            }
        }
        return held
    }

    private func releaseMirroredLeases(_ jobs: [DeliveryJob]) async {
        guard let leases else { return }
        for job in jobs { _ = try? await leases.release(Self.leaseName(job), token: job.leaseToken) }
    }

    /// `job:<message id>:<row id>`: message ids are random, so two clusters (or two test
    /// databases) sharing a Redis never take each other's leases.
    static func leaseName(_ job: DeliveryJob) -> String { "job:\(job.messageID):\(job.id)" }

    /// Counts the recorded results in `smtp_messages_sent_total` (retries are not counted; a result
    /// that lost its lease is not ours to count) and logs the ones that lost their lease.
    private func count(_ outcomes: [(job: DeliveryJob, outcome: DeliveryOutcome)], recorded: RecordedOutcomes) {
        for (job, outcome) in outcomes {
            guard recorded.recorded.contains(job.id) else {
                logger.warning(
                    "result not recorded: the lease was lost to a newer attempt",
                    metadata: ["queue_id": "\(job.messageID)", "to": "<\(job.recipient)>"])
                continue
            }
            switch outcome {
            case .delivered:
                delivered.increment()
                counters?.update { $0.sent += 1 }
            case .failed: failed.increment()
            case .retry: break
            }
        }
    }

    private enum Step: Sendable {
        case finished([(DeliveryJob, DeliveryProblem?)])
        case graceOver
    }

    /// `attempt`, while the jobs' leases are renewed every third of the lease (in the database,
    /// and in the lease store when there is one). When a graceful shutdown begins, the attempt
    /// has `shutdownGrace` to finish; then it is cancelled and given 2 more seconds to return what
    /// it did. Only the deliveries done count; every other job is returned as unfinished, for its
    /// lease to be released. The bound holds even when a transport ignores cancellation (a peer
    /// that does not answer): the attempt is then abandoned, not awaited.
    private func attemptHoldingLeases(
        _ jobs: [DeliveryJob], now: Date, claimedAt: ContinuousClock.Instant, remote: (any RemoteTransport)?
    ) async -> (
        results: [(DeliveryJob, DeliveryProblem?)], unfinished: [DeliveryJob]
    ) {
        guard !jobs.isEmpty else { return ([], []) }
        let first = FirstOffer<Step>()
        let attempt = Task {
            let results = await self.attempt(jobs, now: now, claimedAt: claimedAt, remote: remote)
            first.offer(.finished(results))
            return results
        }
        let renewal = Task { await self.keepLeases(jobs) }
        let grace = Task {
            do {
                try await gracefulShutdown()
                try await Task.sleep(for: self.settings.shutdownGrace)
                first.offer(.graceOver)
            } catch {}
        }
        // Cancelled outright (not a graceful shutdown): cut at once.
        let step = await withTaskCancellationHandler {
            await first.value()
        } onCancel: {
            first.offer(.graceOver)
        }
        grace.cancel()
        defer { renewal.cancel() }
        if case .finished(let results) = step { return (results, []) }

        logger.warning(
            "shutdown grace over, cutting deliveries in flight", metadata: ["grace_seconds": "\(settings.shutdownGrace.components.seconds)"])
        attempt.cancel()
        let late = FirstOffer<[(DeliveryJob, DeliveryProblem?)]>()
        Task { late.offer(await attempt.value) }
        Task {
            try? await Task.sleep(for: .seconds(2))
            late.offer([])
        }
        let done = await late.value().filter { $0.1 == nil }
        let doneIDs = Set(done.map(\.0.id))
        return (done, jobs.filter { !doneIDs.contains($0.id) })
    }

    /// Renews the leases of `jobs` every third of the lease until cancelled. A job whose renewal is
    /// refused lost its lease (it was claimed again after expiring): it is logged and no longer
    /// renewed; its result will not be recorded.
    private func keepLeases(_ jobs: [DeliveryJob]) async {
        var held = jobs
        while !held.isEmpty {
            do { try await Task.sleep(for: settings.lease / 3) } catch { return }
            do {
                let until = Date().addingTimeInterval(Double(settings.lease.components.seconds))
                let renewed = try await queue.renewLeases(held, until: until)
                for job in held where !renewed.contains(job.id) {
                    logger.warning("lease lost while delivering", metadata: ["queue_id": "\(job.messageID)", "to": "<\(job.recipient)>"])
                }
                held = held.filter { renewed.contains($0.id) }
                if let leases {
                    for job in held { _ = try? await leases.renew(Self.leaseName(job), token: job.leaseToken, ttl: settings.lease) }
                }
            } catch {
                logger.warning("cannot renew leases", metadata: ["error": "\(error)"])
            }
        }
    }

    /// Tries every job once: local mailboxes in parallel (one mailbox's messages in order, so
    /// its quota is measured between them and no two writers race on it), and each remote
    /// message's recipients at one domain together.
    private func attempt(
        _ jobs: [DeliveryJob], now: Date, claimedAt: ContinuousClock.Instant, remote transport: (any RemoteTransport)?
    ) async -> [(DeliveryJob, DeliveryProblem?)] {
        let local = Dictionary(grouping: jobs.filter(\.isLocal), by: \.recipient)
        let remote = Dictionary(grouping: jobs.filter { !$0.isLocal }, by: { RemoteGroup(messageID: $0.messageID, domain: $0.domain) })
        return await withTaskGroup(of: [(DeliveryJob, DeliveryProblem?)].self) { group in
            for mailboxJobs in local.values {
                group.addTask {
                    var results: [(DeliveryJob, DeliveryProblem?)] = []
                    for job in mailboxJobs { results.append((job, await self.deliverLocally(job, claimedAt: claimedAt))) }
                    return results
                }
            }
            if let transport {
                for groupJobs in remote.values {
                    group.addTask { await self.deliverRemotely(groupJobs, through: transport) }
                }
            }
            var results: [(DeliveryJob, DeliveryProblem?)] = []
            for await batch in group { results += batch }
            return results
        }
    }

    private struct RemoteGroup: Hashable {
        var messageID: String
        var domain: String
    }

    /// A first attempt (the claim made the delivery key) tells the mailbox that nothing can be
    /// stored under the key yet — while the lease is surely still this worker's: after half of
    /// it (a process stopped past its lease, a newer worker may have delivered meanwhile) the
    /// mailbox looks for a copy as on a retry.
    private func deliverLocally(_ job: DeliveryJob, claimedAt: ContinuousClock.Instant) async -> DeliveryProblem? {
        do {
            let blob = try await spool.get(key: job.blobKey)
            var message = ByteBufferAllocator().buffer(capacity: blob.readableBytes + 64)
            message.writeString("Return-Path: <\(job.mailFrom)>\r\n")
            message.writeImmutableBuffer(blob)
            if let quota, let user = try await quota.users.user(email: job.recipient),
                try await quota.checker.wouldExceed(user, adding: message.readableBytes)
            {
                throw MailboxFull(quotaMB: user.quotaMB)
            }
            let stored = try await mailboxes.deliver(
                message,
                MailboxDelivery(
                    mailbox: job.recipient, messageID: job.messageID, deliveryKey: job.deliveryKey, sender: job.mailFrom,
                    receivedAt: job.receivedAt,
                    mayBeStoredAlready: !job.deliveryKeyIsNew || ContinuousClock.now - claimedAt > settings.lease / 2))
            logger.info(
                "delivered", metadata: ["queue_id": "\(job.messageID)", "to": "<\(job.recipient)>", "duplicate_suppressed": "\(!stored)"])
            return nil
        } catch let full as MailboxFull {
            return .temporary("4.2.2", full.description)
        } catch let error as MailboxError where error.kind == .invalidMailbox {
            return .permanent("5.1.1", error.description)
        } catch {
            return .temporary("4.3.0", "\(error)")
        }
    }

    private func deliverRemotely(_ jobs: [DeliveryJob], through transport: any RemoteTransport) async -> [(DeliveryJob, DeliveryProblem?)] {
        let blob: ByteBuffer
        do {
            blob = try await spool.get(key: jobs[0].blobKey)
        } catch {
            return jobs.map { ($0, .temporary("4.3.0", "cannot read the spooled message: \(error)")) }
        }
        let problems = await transport.deliver(blob, jobs: jobs)
        return zip(jobs, problems).map { job, problem in
            if problem == nil {
                logger.info("delivered", metadata: ["queue_id": "\(job.messageID)", "to": "<\(job.recipient)>", "remote": "true"])
            }
            return (job, problem)
        }
    }

    /// What an attempt's result means for the job: delivered, a retry after the schedule's delay
    /// (with ±10 % jitter), or failed for good when the problem is permanent, the attempts are used
    /// up, or the next try would come after the queue's maximum age.
    func settle(_ job: DeliveryJob, _ problem: DeliveryProblem?, now: Date) -> (DeliveryOutcome, FailedDelivery?) {
        guard let problem else { return (.delivered, nil) }
        let attempt = job.attempts + 1
        let delay = settings.retrySchedule[min(attempt - 1, settings.retrySchedule.count - 1)]
        var next = now.addingTimeInterval(Double(delay.components.seconds) * Double.random(in: 0.9...1.1))
        if job.deliverByMode == "R", let deadline = job.deliverBy, next > deadline {
            // The next try at the deadline itself, which returns the message at once: a timely DSN.
            next = max(deadline, now)
        }
        let expiry = job.receivedAt.addingTimeInterval(Double(settings.maxAge.components.seconds))
        let reason: FailedDelivery.Reason?
        if problem.isPermanent {
            reason = .permanent
        } else if attempt >= job.maxAttempts || next > expiry {
            reason = .expired
        } else {
            reason = nil
        }
        let metadata: Logger.Metadata = [
            "queue_id": "\(job.messageID)", "to": "<\(job.recipient)>", "error": "\(problem.message)", "attempt": "\(attempt)",
        ]
        guard let reason else {
            logger.warning("delivery deferred", metadata: metadata)
            return (.retry(error: problem.message, at: next), nil)
        }
        logger.error("delivery failed", metadata: metadata)
        return (.failed(error: problem.message), FailedDelivery(job: job, problem: problem, reason: reason))
    }

    /// Blob first, rows second: a crash between them leaves a blob no row refers to. Such blobs
    /// older than the grace period are removed.
    public func collectOrphanBlobs(now: Date = Date()) async {
        do {
            let blobs = try await spool.list()
            let referenced = try await queue.referencedBlobKeys()
            let cutoff = now.addingTimeInterval(-Double(settings.orphanGrace.components.seconds))
            var removed = 0
            for blob in blobs where !referenced.contains(blob.key) && blob.modified < cutoff {
                try await spool.delete(key: blob.key)
                removed += 1
            }
            if removed > 0 { logger.info("removed orphan blobs", metadata: ["count": "\(removed)"]) }
        } catch {
            logger.warning("orphan collection failed", metadata: ["error": "\(error)"])
        }
    }
}

extension DeliveryProblem {
    /// RFC 2852 `BY=…;R` past its deadline (RFC 3463 5.4.7: delivery time expired).
    public static let deadlineExpired = DeliveryProblem.permanent("5.4.7", "delivery time expired")
}

extension DeliveryJob {
    /// RFC 2852: the client asked for `BY=…;R` and the deadline has come, so the message is not
    /// tried again but returned (a DSN). `;N` never stops delivery: API.md's "no notification".
    public func missedDeadline(at now: Date) -> Bool {
        guard deliverByMode == "R", let deliverBy else { return false }
        return deliverBy <= now
    }
}
