import MailTier
import NIOConcurrencyHelpers

/// `GET /stats` (API.md "Statistics"). Queue and storage figures come from the database and the
/// mailboxes, so they are cluster-wide; counters of connections, messages received and sent,
/// logins and processing times are this process's since it started.
public struct ServerStatistics: Encodable, Sendable, Equatable {
    public struct Messages: Encodable, Sendable, Equatable {
        public var received: Int
        public var sent: Int
        public var queued: Int
        public var failed: Int

        public init(received: Int, sent: Int, queued: Int, failed: Int) {
            self.received = received
            self.sent = sent
            self.queued = queued
            self.failed = failed
        }
    }

    public struct Connections: Encodable, Sendable, Equatable {
        public var current: Int
        public var total: Int
        public var rejected: Int

        public init(current: Int, total: Int, rejected: Int) {
            self.current = current
            self.total = total
            self.rejected = rejected
        }
    }

    public struct Authentication: Encodable, Sendable, Equatable {
        public var attempts: Int
        public var successful: Int
        public var failed: Int

        public init(successful: Int, failed: Int) {
            self.attempts = successful + failed
            self.successful = successful
            self.failed = failed
        }
    }

    public struct Detections: Encodable, Sendable, Equatable {
        public var detected: Int
        /// Detected per message received (0 without messages).
        public var rate: Double

        public init(detected: Int, received: Int) {
            self.detected = detected
            self.rate = received > 0 ? (Double(detected) / Double(received) * 10_000).rounded() / 10_000 : 0
        }
    }

    public struct Storage: Encodable, Sendable, Equatable {
        public var messagesStored: Int
        public var totalSizeMB: Double

        public init(messagesStored: Int, totalSizeBytes: Int64) {
            self.messagesStored = messagesStored
            self.totalSizeMB = JSON.megabytes(totalSizeBytes)
        }

        enum CodingKeys: String, CodingKey {
            case messagesStored = "messages_stored"
            case totalSizeMB = "total_size_mb"
        }
    }

    public struct Performance: Encodable, Sendable, Equatable {
        public var avgProcessingMS: Double
        public var p95ProcessingMS: Double
        public var p99ProcessingMS: Double

        /// From recent processing times in milliseconds (any order); zeros without any.
        public init(samples: [Double]) {
            let sorted = samples.sorted()
            func rounded(_ value: Double) -> Double { (value * 10).rounded() / 10 }
            func percentile(_ p: Double) -> Double {
                guard !sorted.isEmpty else { return 0 }
                let index = min(sorted.count - 1, max(0, Int((p * Double(sorted.count)).rounded(.up)) - 1))
                return rounded(sorted[index])
            }
            avgProcessingMS = sorted.isEmpty ? 0 : rounded(sorted.reduce(0, +) / Double(sorted.count))
            p95ProcessingMS = percentile(0.95)
            p99ProcessingMS = percentile(0.99)
        }

        enum CodingKeys: String, CodingKey {
            case avgProcessingMS = "avg_processing_ms"
            case p95ProcessingMS = "p95_processing_ms"
            case p99ProcessingMS = "p99_processing_ms"
        }
    }

    public var messages: Messages
    public var connections: Connections
    public var authentication: Authentication
    public var spam: Detections
    public var virus: Detections
    public var storage: Storage
    public var performance: Performance

    public init(
        messages: Messages, connections: Connections, authentication: Authentication, spam: Detections, virus: Detections,
        storage: Storage, performance: Performance
    ) {
        self.messages = messages
        self.connections = connections
        self.authentication = authentication
        self.spam = spam
        self.virus = virus
        self.storage = storage
        self.performance = performance
    }
}

/// Gathers `/stats`: the queue and the mailboxes (cluster-wide) and this process's counters.
public enum AdminStatistics {
    public static func collect(
        queue: any MessageQueue, storage: StoredMailFigures,
        connections: (active: Int, total: Int), counters: ProcessCounters.Snapshot = .init()
    ) async throws -> ServerStatistics {
        let queued =
            try await queue.list(status: .pending, offset: 0, limit: 0).total
            + queue.list(status: .retry, offset: 0, limit: 0).total
        let failed = try await queue.list(status: .failed, offset: 0, limit: 0).total
        let (stored, bytes) = try await storage.current()
        return ServerStatistics(
            messages: .init(received: counters.received, sent: counters.sent, queued: queued, failed: failed),
            connections: .init(current: connections.active, total: connections.total, rejected: counters.rejectedConnections),
            authentication: .init(successful: counters.authSuccesses, failed: counters.authFailures),
            spam: .init(detected: counters.spam, received: counters.received),
            virus: .init(detected: counters.viruses, received: counters.received),
            storage: .init(messagesStored: stored, totalSizeBytes: bytes),
            performance: .init(samples: counters.processingMilliseconds))
    }
}

/// `/stats`' storage figures: the messages in every account's INBOX and the bytes of every
/// mailbox. Measuring them lists (for maildir, stats) every message of every account, so a
/// measurement is kept for `lifetime` and shared by the calls meanwhile.
public final class StoredMailFigures: Sendable {
    let accounts: AccountService
    let mailboxes: any MailboxStore
    let lifetime: Duration
    private let cached = NIOLockedValueBox<(messages: Int, bytes: Int64, measured: ContinuousClock.Instant)?>(nil)

    public init(accounts: AccountService, mailboxes: any MailboxStore, lifetime: Duration = .seconds(30)) {
        self.accounts = accounts
        self.mailboxes = mailboxes
        self.lifetime = lifetime
    }

    public func current() async throws -> (messages: Int, bytes: Int64) {
        let now = ContinuousClock.now
        if let figures = cached.withLockedValue({ $0 }), now - figures.measured < lifetime {
            return (figures.messages, figures.bytes)
        }
        var stored = 0
        var bytes: Int64 = 0
        var offset = 0
        while true {
            let (users, total) = try await accounts.list(offset: offset, limit: 1000)
            for user in users {
                bytes += try await mailboxes.usageBytes(of: user.email)
                stored += (try? await mailboxes.list(mailbox: user.email, folder: "INBOX", offset: 0, limit: 0).total) ?? 0
            }
            offset += users.count
            if users.isEmpty || offset >= total { break }
        }
        cached.withLockedValue { $0 = (stored, bytes, now) }
        return (stored, bytes)
    }
}
