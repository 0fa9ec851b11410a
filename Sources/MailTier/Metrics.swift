import Metrics
import NIOConcurrencyHelpers

/// The metrics of API.md ("Prometheus Metrics", "Metrics Details"), through swift-metrics: the
/// domain counts, gauges and times; which backend exposes them (Prometheus, in `smtp-server`) is
/// the executable's choice, so nothing here imports Prometheus.
///
/// No metric carries a label whose value comes from a client: labels are the fixed words below
/// (`accepted`/`rejected`, `delivered`/`failed`, `success`/`failure`), never a user, an address or
/// an IP.
public enum MailTierMetrics {
    public static let messagesReceived = "smtp_messages_received_total"
    public static let messagesSent = "smtp_messages_sent_total"
    public static let messagesQueued = "smtp_messages_queued"
    public static let connectionsActive = "smtp_connections_active"
    public static let connectionsTotal = "smtp_connections_total"
    public static let authAttempts = "smtp_auth_attempts_total"
    public static let spamDetected = "smtp_spam_detected_total"
    public static let virusDetected = "smtp_virus_detected_total"
    public static let memory = "smtp_memory_bytes"
    public static let processingDuration = "smtp_processing_duration_seconds"
    public static let messageSize = "smtp_message_size_bytes"
    public static let redisFailures = "smtp_redis_failures_total"

    /// The `# HELP` text of each metric MailTier makes.
    public static let help: [String: String] = [
        messagesReceived: "Messages whose content was received, by the final reply: accepted (250) or rejected",
        messagesSent: "Recipients whose delivery was recorded: delivered, or failed for good",
        messagesQueued: "Messages with a recipient still waiting for delivery (pending or retry)",
        connectionsActive: "SMTP connections open now",
        connectionsTotal: "SMTP connections accepted since the process started",
        authAttempts: "SMTP AUTH attempts by result",
        spamDetected: "Messages found to be spam (no scanner is wired yet: always 0)",
        virusDetected: "Messages found to carry a virus (no scanner is wired yet: always 0)",
        memory: "Resident memory of this process (VmRSS)",
        processingDuration: "Time from the end of a message's data to its final reply",
        messageSize: "Size of received message contents in octets",
        redisFailures: "Redis calls of the rate limiter that failed",
    ]

    /// `smtp_processing_duration_seconds`: storing a message takes milliseconds, a slow disk or
    /// database seconds.
    public static let processingDurationBuckets: [Duration] = [
        .milliseconds(1), .milliseconds(5), .milliseconds(10), .milliseconds(25), .milliseconds(50),
        .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .milliseconds(2500),
        .seconds(5), .seconds(10), .seconds(30),
    ]

    /// `smtp_message_size_bytes`: 1 KiB to 64 MiB, by powers of 4 (the default SIZE is 50 MiB).
    public static let messageSizeBuckets: [Double] = (0...8).map { 1024 * Double(1 << (2 * $0)) }

    /// A counter from `factory`, or from the global `MetricsSystem` when there is none.
    public static func counter(_ label: String, _ dimensions: [(String, String)] = [], factory: (any MetricsFactory)?) -> Counter {
        factory.map { Counter(label: label, dimensions: dimensions, factory: $0) } ?? Counter(label: label, dimensions: dimensions)
    }

    public static func gauge(_ label: String, factory: (any MetricsFactory)?) -> Gauge {
        factory.map { Gauge(label: label, factory: $0) } ?? Gauge(label: label)
    }
}

/// What the ingress role measures: messages received and how long their final reply took, their
/// sizes, AUTH attempts; and the scanners' counters, created at 0 until a scanner exists.
public struct IngressMetrics: Sendable {
    private let accepted: Counter
    private let rejected: Counter
    private let authSuccess: Counter
    private let authFailure: Counter
    private let processing: Timer
    private let size: Recorder
    /// `smtp_spam_detected_total`, `smtp_virus_detected_total`: no scanner increments them yet.
    public let spamDetected: Counter
    public let virusDetected: Counter
    /// The same events for `GET /stats`, when given.
    private let counters: ProcessCounters?

    /// Registered with `factory` (the global `MetricsSystem` when nil) at once, so every series is
    /// scraped from the start, at 0.
    public init(factory: (any MetricsFactory)? = nil, counters: ProcessCounters? = nil) {
        typealias M = MailTierMetrics
        self.counters = counters
        accepted = M.counter(M.messagesReceived, [("status", "accepted")], factory: factory)
        rejected = M.counter(M.messagesReceived, [("status", "rejected")], factory: factory)
        authSuccess = M.counter(M.authAttempts, [("result", "success")], factory: factory)
        authFailure = M.counter(M.authAttempts, [("result", "failure")], factory: factory)
        spamDetected = M.counter(M.spamDetected, factory: factory)
        virusDetected = M.counter(M.virusDetected, factory: factory)
        processing = factory.map { Timer(label: M.processingDuration, factory: $0) } ?? Timer(label: M.processingDuration)
        size = factory.map { Recorder(label: M.messageSize, aggregate: true, factory: $0) } ?? Recorder(label: M.messageSize)
    }

    /// Records nothing.
    public static let none = IngressMetrics(factory: NOOPMetricsHandler.instance)

    /// A message's content arrived and got its final reply after `processing`; `sizeBytes` when
    /// the content was kept whole (a message refused for its size or its line endings has none).
    public func messageReceived(sizeBytes: Int?, accepted: Bool, processing: Duration) {
        (accepted ? self.accepted : rejected).increment()
        if let sizeBytes { size.record(sizeBytes) }
        let (seconds, attoseconds) = processing.components
        self.processing.recordNanoseconds(seconds * 1_000_000_000 + attoseconds / 1_000_000_000)
        if accepted, let counters {
            counters.update { $0.received += 1 }
            counters.recordProcessing(milliseconds: Double(seconds) * 1000 + Double(attoseconds) / 1e15)
        }
    }

    public func authenticationAttempted(succeeded: Bool) {
        (succeeded ? authSuccess : authFailure).increment()
        counters?.update { succeeded ? ($0.authSuccesses += 1) : ($0.authFailures += 1) }
    }

    /// A connection refused by a rate limit (for `/stats`; the listener counts those refused for
    /// being too many).
    public func connectionRefused() {
        counters?.update { $0.rejectedConnections += 1 }
    }
}

/// `smtp_connections_active` and `smtp_connections_total`, copied from the listener's own counts
/// before each scrape. The total is a counter, so it grows by what the listener counted since the
/// last copy.
public final class ConnectionMetrics: Sendable {
    private let active: Gauge
    private let total: Counter
    private let copiedTotal = NIOLockedValueBox(0)

    public init(factory: (any MetricsFactory)? = nil) {
        active = MailTierMetrics.gauge(MailTierMetrics.connectionsActive, factory: factory)
        total = MailTierMetrics.counter(MailTierMetrics.connectionsTotal, factory: factory)
    }

    public func update(active: Int, total: Int) {
        self.active.record(active)
        let growth = copiedTotal.withLockedValue { copied -> Int in
            let growth = max(total - copied, 0)
            copied = max(copied, total)
            return growth
        }
        if growth > 0 { self.total.increment(by: growth) }
    }
}

/// `smtp_messages_queued`, read from the queue before each scrape: the messages with a recipient
/// pending or waiting for a retry (failed ones have left the delivery queue; their bounce went).
public struct QueueMetrics: Sendable {
    private let queued: Gauge
    private let queue: any MessageQueue

    public init(queue: any MessageQueue, factory: (any MetricsFactory)? = nil) {
        self.queue = queue
        queued = MailTierMetrics.gauge(MailTierMetrics.messagesQueued, factory: factory)
    }

    /// Counts and records; throws (leaving the last value) when the queue cannot be read.
    public func update() async throws {
        queued.record(try await queue.waitingMessageCount())
    }
}

extension MessageQueue {
    /// Messages with at least one recipient pending or due for a retry.
    public func waitingMessageCount() async throws -> Int {
        let pending = try await list(status: .pending, offset: 0, limit: 0).total
        let retry = try await list(status: .retry, offset: 0, limit: 0).total
        return pending + retry
    }
}
