#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import NIOCore
import ServiceLifecycle

/// The delivery role: claims due jobs under a lease, delivers them, records each result fenced
/// by its lease token, and removes a message's blob once every recipient has it.
///
/// Local delivery only, for now: remote recipients stay queued until an outbound transport exists.
public final class DeliveryService: Service, Sendable {
    public struct Settings: Sendable {
        /// Embedded mode: this is the only worker, so leases left by a crash are released at start.
        public var exclusive: Bool
        public var pollInterval: Duration
        public var batchSize: Int
        public var lease: Duration
        /// Delay before retry n (1-based); the last entry repeats.
        public var retrySchedule: [Duration]
        /// How long a spool blob without rows is kept before garbage collection.
        public var orphanGrace: Duration

        public init(
            exclusive: Bool, pollInterval: Duration, batchSize: Int = 64, lease: Duration = .seconds(300),
            retrySchedule: [Duration] = [.seconds(60), .seconds(300), .seconds(1800), .seconds(7200), .seconds(28800)],
            orphanGrace: Duration = .seconds(900)
        ) {
            self.exclusive = exclusive
            self.pollInterval = pollInterval
            self.batchSize = batchSize
            self.lease = lease
            self.retrySchedule = retrySchedule
            self.orphanGrace = orphanGrace
        }
    }

    private let queue: any MessageQueue
    private let spool: any BlobStore
    private let mailboxes: any MailboxStore
    private let settings: Settings
    private let doorbell: Doorbell
    private let quota: (users: any UserStore, checker: QuotaChecker)?
    private let logger: Logger

    /// With `quota`, a message that would take an account over its quota is deferred (and failed
    /// once its attempts run out).
    public init(
        queue: any MessageQueue, spool: any BlobStore, mailboxes: any MailboxStore, settings: Settings, doorbell: Doorbell,
        quota: (users: any UserStore, checker: QuotaChecker)? = nil, logger: Logger
    ) {
        self.queue = queue
        self.spool = spool
        self.mailboxes = mailboxes
        self.settings = settings
        self.doorbell = doorbell
        self.quota = quota
        self.logger = logger
    }

    /// A local delivery that cannot happen now.
    struct MailboxFull: Error, CustomStringConvertible {
        var quotaMB: Int
        var description: String { "mailbox full (quota \(quotaMB) MB)" }
    }

    public func run() async throws {
        if settings.exclusive { try await queue.releaseAllLeases() }
        logger.info("delivery started", metadata: ["poll_seconds": "\(settings.pollInterval.components.seconds)"])
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
        let jobs = try await queue.claimDue(
            now: now, limit: settings.batchSize, lease: settings.lease, localOnly: true,
            makeDeliveryKey: { [mailboxes] in mailboxes.makeDeliveryKey() })
        guard !jobs.isEmpty else { return 0 }
        // Mailboxes in parallel; one mailbox's messages in order, so its quota is measured
        // between them and no two writers race on it.
        let byMailbox = Dictionary(grouping: jobs, by: \.recipient)
        let outcomes = await withTaskGroup(of: [(job: DeliveryJob, outcome: DeliveryOutcome)].self) { group in
            for mailboxJobs in byMailbox.values {
                group.addTask {
                    var results: [(job: DeliveryJob, outcome: DeliveryOutcome)] = []
                    for job in mailboxJobs { results.append((job, await self.deliver(job, now: now))) }
                    return results
                }
            }
            var outcomes: [(job: DeliveryJob, outcome: DeliveryOutcome)] = []
            for await results in group { outcomes += results }
            return outcomes
        }
        let finished = try await queue.record(outcomes, now: Date())
        for key in finished {
            do { try await spool.delete(key: key) } catch { logger.warning("cannot delete blob", metadata: ["key": "\(key)", "error": "\(error)"]) }
        }
        return jobs.count
    }

    private func deliver(_ job: DeliveryJob, now: Date) async -> DeliveryOutcome {
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
                    receivedAt: job.receivedAt))
            logger.info(
                "delivered", metadata: ["queue_id": "\(job.messageID)", "to": "<\(job.recipient)>", "duplicate_suppressed": "\(!stored)"])
            return .delivered
        } catch {
            let attempt = job.attempts + 1
            let text = "\(error)"
            if attempt >= job.maxAttempts {
                logger.error("delivery failed", metadata: ["queue_id": "\(job.messageID)", "to": "<\(job.recipient)>", "error": "\(text)"])
                return .failed(error: text)
            }
            let delay = settings.retrySchedule[min(attempt - 1, settings.retrySchedule.count - 1)]
            let jitter = Double.random(in: 0.9...1.1)
            let seconds = Double(delay.components.seconds) * jitter
            logger.warning(
                "delivery deferred", metadata: ["queue_id": "\(job.messageID)", "to": "<\(job.recipient)>", "error": "\(text)", "attempt": "\(attempt)"])
            return .retry(error: text, at: now.addingTimeInterval(seconds))
        }
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
