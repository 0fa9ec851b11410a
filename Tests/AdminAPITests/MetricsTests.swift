import Hummingbird
import HummingbirdTesting
import MailTier
import Prometheus
import Testing

@testable import AdminAPI

/// One sample line of the text format: `name{label="value",…} value`.
struct Sample: Equatable {
    var name: String
    var labels: [String: String]
    var value: Double
}

/// The samples, `# HELP` and `# TYPE` lines of an exposition. Label values here never hold
/// `"`, `\` or `,`, so the parse can be simple; lines it cannot read are returned as `unread`.
struct Exposition {
    var samples: [Sample] = []
    var help: [String: String] = [:]
    var types: [String: String] = [:]
    var unread: [String] = []

    init(_ text: String) {
        for line in text.split(separator: "\n").map(String.init) {
            if line.hasPrefix("# HELP ") || line.hasPrefix("# TYPE ") {
                let words = line.dropFirst(7).split(separator: " ", maxSplits: 1).map(String.init)
                guard words.count == 2 else {
                    unread.append(line)
                    continue
                }
                if line.hasPrefix("# HELP ") { help[words[0]] = words[1] } else { types[words[0]] = words[1] }
                continue
            }
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
                unread.append(line)
                continue
            }
            let series = line[..<space]
            var labels: [String: String] = [:]
            var name = String(series)
            if let open = series.firstIndex(of: "{"), series.last == "}" {
                name = String(series[..<open])
                for pair in series[series.index(after: open)..<series.index(before: series.endIndex)].split(separator: ",") {
                    let parts = pair.split(separator: "=", maxSplits: 1)
                    guard parts.count == 2, parts[1].first == "\"", parts[1].last == "\"" else {
                        unread.append(line)
                        continue
                    }
                    labels[String(parts[0])] = String(parts[1].dropFirst().dropLast())
                }
            }
            samples.append(Sample(name: name, labels: labels, value: value))
        }
    }

    func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
        samples.first { $0.name == name && $0.labels == labels }?.value
    }
}

@Suite("GET /metrics exposition")
struct MetricsExpositionTests {
    @Test("every metric of API.md with its labels, HELP and TYPE; values as recorded; scrape-time gauges refreshed")
    func exposition() async throws {
        let factory = MailTierPrometheusFactory(registry: PrometheusCollectorRegistry())
        let ingress = IngressMetrics(factory: factory)
        let connections = ConnectionMetrics(factory: factory)
        let sent = (
            delivered: MailTierMetrics.counter(MailTierMetrics.messagesSent, [("status", "delivered")], factory: factory),
            failed: MailTierMetrics.counter(MailTierMetrics.messagesSent, [("status", "failed")], factory: factory))
        let queued = MailTierMetrics.gauge(MailTierMetrics.messagesQueued, factory: factory)
        let listener = (active: 2, total: 9)
        let endpoint = MetricsEndpoint(
            factory: factory, memoryUsage: { MemoryUsage(residentBytes: 47_395_635, heapBytes: 1) },
            refresh: {
                connections.update(active: listener.active, total: listener.total)
                queued.record(4)
            })

        ingress.messageReceived(sizeBytes: 2_000, accepted: true, processing: .milliseconds(3))
        ingress.messageReceived(sizeBytes: 70_000, accepted: true, processing: .milliseconds(40))
        ingress.messageReceived(sizeBytes: nil, accepted: false, processing: .zero)
        ingress.authenticationAttempted(succeeded: true)
        ingress.authenticationAttempted(succeeded: false)
        ingress.authenticationAttempted(succeeded: false)
        sent.delivered.increment(by: 5)
        sent.failed.increment()

        let text = await endpoint.render()
        let exposition = Exposition(text)
        #expect(exposition.unread.isEmpty, "\(exposition.unread)")

        let types: [String: String] = [
            "smtp_messages_received_total": "counter", "smtp_messages_sent_total": "counter",
            "smtp_messages_queued": "gauge", "smtp_connections_active": "gauge", "smtp_connections_total": "counter",
            "smtp_auth_attempts_total": "counter", "smtp_spam_detected_total": "counter",
            "smtp_virus_detected_total": "counter", "smtp_memory_bytes": "gauge",
            "smtp_processing_duration_seconds": "histogram", "smtp_message_size_bytes": "histogram",
        ]
        #expect(exposition.types == types)
        for name in types.keys {
            #expect(exposition.help[name] == MailTierMetrics.help[name], "\(name)")
            #expect(exposition.help[name]?.isEmpty == false, "\(name)")
        }

        #expect(exposition.value("smtp_messages_received_total", ["status": "accepted"]) == 2)
        #expect(exposition.value("smtp_messages_received_total", ["status": "rejected"]) == 1)
        #expect(exposition.value("smtp_messages_sent_total", ["status": "delivered"]) == 5)
        #expect(exposition.value("smtp_messages_sent_total", ["status": "failed"]) == 1)
        #expect(exposition.value("smtp_auth_attempts_total", ["result": "success"]) == 1)
        #expect(exposition.value("smtp_auth_attempts_total", ["result": "failure"]) == 2)
        #expect(exposition.value("smtp_spam_detected_total") == 0)
        #expect(exposition.value("smtp_virus_detected_total") == 0)
        #expect(exposition.value("smtp_messages_queued") == 4)
        #expect(exposition.value("smtp_connections_active") == 2)
        #expect(exposition.value("smtp_connections_total") == 9)
        #expect(exposition.value("smtp_memory_bytes") == 47_395_635)

        // Histograms: every message has a time; only the two kept whole have a size.
        #expect(exposition.value("smtp_processing_duration_seconds_count") == 3)
        #expect(exposition.value("smtp_processing_duration_seconds_bucket", ["le": "+Inf"]) == 3)
        #expect(exposition.value("smtp_processing_duration_seconds_bucket", ["le": "0.005"]) == 2)
        #expect(exposition.value("smtp_processing_duration_seconds_bucket", ["le": "0.05"]) == 3)
        #expect(abs((exposition.value("smtp_processing_duration_seconds_sum") ?? 0) - 0.043) < 1e-9)
        #expect(exposition.value("smtp_message_size_bytes_count") == 2)
        #expect(exposition.value("smtp_message_size_bytes_sum") == 72_000)
        #expect(exposition.value("smtp_message_size_bytes_bucket", ["le": "4096.0"]) == 1)
        #expect(exposition.value("smtp_message_size_bytes_bucket", ["le": "262144.0"]) == 2)

        // Labels are the fixed words and bucket bounds only.
        let words: Set = ["accepted", "rejected", "delivered", "failed", "success", "failure"]
        for sample in exposition.samples {
            for (key, value) in sample.labels {
                #expect(key == "le" ? (value == "+Inf" || Double(value) != nil) : words.contains(value), "\(sample)")
            }
        }
    }

    @Test("smtp_connections_total follows the listener's count and never goes down")
    func connectionTotalIsACounter() async throws {
        let factory = MailTierPrometheusFactory(registry: PrometheusCollectorRegistry())
        let connections = ConnectionMetrics(factory: factory)
        let endpoint = MetricsEndpoint(factory: factory)
        for (active, total, expected) in [(1, 3, 3.0), (0, 3, 3), (4, 10, 10), (0, 7, 10), (1, 12, 12)] {
            connections.update(active: active, total: total)
            let exposition = Exposition(await endpoint.render())
            #expect(exposition.value("smtp_connections_total") == expected, "after (\(active), \(total))")
            #expect(exposition.value("smtp_connections_active") == Double(active))
        }
    }

    @Test("a role exposes only what it made: memory always, nothing else unasked")
    func roleExposesWhatItMeasures() async throws {
        let factory = MailTierPrometheusFactory(registry: PrometheusCollectorRegistry())
        let endpoint = MetricsEndpoint(factory: factory, memoryUsage: { MemoryUsage(residentBytes: 1024, heapBytes: 0) })
        let exposition = Exposition(await endpoint.render())
        #expect(exposition.types == ["smtp_memory_bytes": "gauge"])
        #expect(exposition.value("smtp_memory_bytes") == 1024)
    }

    @Test("a refresh that hangs (a database that does not answer) does not hold the scrape")
    func hangingRefresh() async throws {
        let factory = MailTierPrometheusFactory(registry: PrometheusCollectorRegistry())
        let endpoint = MetricsEndpoint(
            factory: factory, memoryUsage: { MemoryUsage(residentBytes: 2048, heapBytes: 0) }, refreshTimeout: .milliseconds(100),
            refresh: { try? await Task.sleep(for: .seconds(30)) })
        let started = ContinuousClock.now
        let exposition = Exposition(await endpoint.render())
        #expect(ContinuousClock.now - started < .seconds(10))
        #expect(exposition.value("smtp_memory_bytes") == 2048)
    }

    @Test("a library's own metric goes through the plain factory, without HELP")
    func otherLabels() async throws {
        let factory = MailTierPrometheusFactory(registry: PrometheusCollectorRegistry())
        MailTierMetrics.counter("some_library_events_total", factory: factory).increment()
        let exposition = Exposition(factory.registry.emitToString())
        #expect(exposition.value("some_library_events_total") == 1)
        #expect(exposition.help["some_library_events_total"] == nil)
    }

    @Test("GET /metrics: 200, the Prometheus text content type, the exposition")
    func route() async throws {
        let factory = MailTierPrometheusFactory(registry: PrometheusCollectorRegistry())
        IngressMetrics(factory: factory).authenticationAttempted(succeeded: true)
        let endpoint = MetricsEndpoint(factory: factory, memoryUsage: { MemoryUsage(residentBytes: 4096, heapBytes: 0) })
        let app = Application(router: endpoint.router())
        try await app.test(.router) { client in
            try await client.execute(uri: "/metrics", method: .get) { response in
                #expect(response.status == .ok)
                #expect(response.headers[.contentType] == "text/plain; version=0.0.4; charset=utf-8")
                let exposition = Exposition(String(buffer: response.body))
                #expect(exposition.value("smtp_auth_attempts_total", ["result": "success"]) == 1)
                #expect(exposition.value("smtp_memory_bytes") == 4096)
            }
            try await client.execute(uri: "/health", method: .get) { response in
                #expect(response.status == .notFound)
            }
        }
    }
}
