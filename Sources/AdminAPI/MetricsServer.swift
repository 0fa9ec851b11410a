import Hummingbird
import Logging
import MailTier
import Metrics
import NIOCore
import Prometheus
import ServiceLifecycle

/// swift-prometheus's `PrometheusMetricsFactory`, with `# HELP` text and histogram buckets for
/// MailTier's metrics (`MailTierMetrics.help`): the plain factory registers every metric without
/// help, and `promtool check metrics` wants it. Other labels (a library's own metrics) go to the
/// plain factory.
public struct MailTierPrometheusFactory: MetricsFactory {
    public let registry: PrometheusCollectorRegistry
    private let plain: PrometheusMetricsFactory
    private let help: [String: String]

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry(), help: [String: String] = MailTierMetrics.help) {
        var plain = PrometheusMetricsFactory(registry: registry)
        plain.durationHistogramBuckets = [MailTierMetrics.processingDuration: MailTierMetrics.processingDurationBuckets]
        plain.valueHistogramBuckets = [MailTierMetrics.messageSize: MailTierMetrics.messageSizeBuckets]
        self.registry = registry
        self.plain = plain
        self.help = help
    }

    /// The label's name with its help text, when it is one of ours.
    private func descriptor(_ label: String) -> MetricNameDescriptor? {
        help[label].map { MetricNameDescriptor(metricName: label, unitName: "", helpText: $0) }
    }

    public func makeCounter(label: String, dimensions: [(String, String)]) -> any CounterHandler {
        guard let name = descriptor(label) else { return plain.makeCounter(label: label, dimensions: dimensions) }
        return registry.makeCounter(descriptor: name, labels: dimensions)
    }

    public func makeFloatingPointCounter(label: String, dimensions: [(String, String)]) -> any FloatingPointCounterHandler {
        guard let name = descriptor(label) else { return plain.makeFloatingPointCounter(label: label, dimensions: dimensions) }
        return registry.makeCounter(descriptor: name, labels: dimensions)
    }

    public func makeRecorder(label: String, dimensions: [(String, String)], aggregate: Bool) -> any RecorderHandler {
        guard let name = descriptor(label) else { return plain.makeRecorder(label: label, dimensions: dimensions, aggregate: aggregate) }
        guard aggregate else { return registry.makeGauge(descriptor: name, labels: dimensions) }
        let buckets = plain.valueHistogramBuckets[label] ?? plain.defaultValueHistogramBuckets
        return registry.makeValueHistogram(descriptor: name, labels: dimensions, buckets: buckets)
    }

    public func makeMeter(label: String, dimensions: [(String, String)]) -> any MeterHandler {
        guard let name = descriptor(label) else { return plain.makeMeter(label: label, dimensions: dimensions) }
        return registry.makeGauge(descriptor: name, labels: dimensions)
    }

    public func makeTimer(label: String, dimensions: [(String, String)]) -> any TimerHandler {
        guard let name = descriptor(label) else { return plain.makeTimer(label: label, dimensions: dimensions) }
        let buckets = plain.durationHistogramBuckets[label] ?? plain.defaultDurationHistogramBuckets
        return registry.makeDurationHistogram(descriptor: name, labels: dimensions, buckets: buckets)
    }

    public func destroyCounter(_ handler: any CounterHandler) { plain.destroyCounter(handler) }
    public func destroyFloatingPointCounter(_ handler: any FloatingPointCounterHandler) { plain.destroyFloatingPointCounter(handler) }
    public func destroyRecorder(_ handler: any RecorderHandler) { plain.destroyRecorder(handler) }
    public func destroyMeter(_ handler: any MeterHandler) { plain.destroyMeter(handler) }
    public func destroyTimer(_ handler: any TimerHandler) { plain.destroyTimer(handler) }
}

/// `GET /metrics`: the registry in Prometheus text format, after `refresh` has copied the values
/// read at scrape time (connections, queue, memory) into their gauges.
public struct MetricsEndpoint: Sendable {
    public let registry: PrometheusCollectorRegistry
    private let refresh: @Sendable () async -> Void
    /// How long a scrape waits for `refresh` (a queue count on a database that does not answer);
    /// then it renders the values of the last refresh.
    public let refreshTimeout: Duration

    /// `smtp_memory_bytes` (every role has it) is made here with `factory` and set from
    /// `memoryUsage` before each scrape; `refresh` does the rest.
    public init(
        factory: MailTierPrometheusFactory, memoryUsage: @escaping @Sendable () -> MemoryUsage = MemoryUsage.current,
        refreshTimeout: Duration = .seconds(2), refresh: @escaping @Sendable () async -> Void = {}
    ) {
        self.registry = factory.registry
        self.refreshTimeout = refreshTimeout
        let memory = MailTierMetrics.gauge(MailTierMetrics.memory, factory: factory)
        self.refresh = {
            memory.record(memoryUsage().residentBytes)
            await refresh()
        }
    }

    /// The exposition, refreshed (or as last refreshed, when `refresh` takes over `refreshTimeout`).
    public func render() async -> String {
        let refresh = self.refresh
        _ = await HealthChecks.outcome(of: HealthCheck("metrics refresh") { await refresh() }, within: refreshTimeout)
        return registry.emitToString()
    }

    /// Prometheus text format 0.0.4.
    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    public func router() -> Router<BasicRequestContext> {
        let router = Router(context: BasicRequestContext.self)
        router.get("metrics") { _, _ -> Response in
            Response(
                status: .ok, headers: [.contentType: Self.contentType],
                body: ResponseBody(byteBuffer: ByteBuffer(string: await render())))
        }
        return router
    }

    /// The application as a `Service`, on `SMTP_METRICS_HOST`:`SMTP_METRICS_PORT`.
    public func application(host: String, port: Int, logger: Logger) -> some ApplicationProtocol & Service {
        Application(
            router: router(),
            configuration: ApplicationConfiguration(address: .hostname(host, port: port), serverName: "MailTier"),
            logger: logger)
    }
}
