// GET /metrics over HTTP on SMTP_METRICS_PORT, against the real smtp-server: values after real
// SMTP traffic, label values, the bind address, and `promtool check metrics` on the exposition.

import Foundation
import Testing

/// One sample of the text format: `name{label="value",…} value`.
struct MetricSample: CustomStringConvertible {
    var name: String
    var labels: [String: String]
    var value: Double
    var description: String { "\(name)\(labels) \(value)" }
}

/// The exposition as scraped: its text, content type and samples.
struct Scrape {
    var status: Int
    var contentType: String?
    var text: String
    var samples: [MetricSample] = []
    /// Sample lines that do not parse as `name{k="v",…} number`.
    var unread: [String] = []

    init(status: Int, contentType: String?, text: String) {
        self.status = status
        self.contentType = contentType
        self.text = text
        for line in text.split(separator: "\n").map(String.init) where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else {
                unread.append(line)
                continue
            }
            let series = line[..<space]
            guard let open = series.firstIndex(of: "{") else {
                samples.append(MetricSample(name: String(series), labels: [:], value: value))
                continue
            }
            guard series.last == "}" else {
                unread.append(line)
                continue
            }
            var labels: [String: String] = [:]
            let body = series[series.index(after: open)..<series.index(before: series.endIndex)]
            // Label values are matched exactly below, so a value holding `",` would show as unread.
            for pair in body.components(separatedBy: "\",") {
                let parts = pair.split(separator: "=", maxSplits: 1)
                guard parts.count == 2, parts[1].first == "\"" else {
                    unread.append(line)
                    continue
                }
                labels[String(parts[0])] = String(parts[1].dropFirst()).replacingOccurrences(of: "\"", with: "")
            }
            samples.append(MetricSample(name: String(series[..<open]), labels: labels, value: value))
        }
    }

    func value(_ name: String, _ labels: [String: String] = [:]) -> Double? {
        samples.first { $0.name == name && $0.labels == labels }?.value
    }

    /// The metric families named in `# TYPE` lines.
    var families: Set<String> {
        Set(text.split(separator: "\n").filter { $0.hasPrefix("# TYPE ") }.compactMap { $0.split(separator: " ").dropFirst(2).first.map(String.init) })
    }
}

extension ServerHarness {
    /// `GET /metrics` on 127.0.0.1:`metricsPort`.
    func scrapeMetrics() async throws -> Scrape {
        let (status, headers, body) = try await httpGet(port: metricsPort, "/metrics")
        return Scrape(status: status, contentType: headers["content-type"], text: body)
    }

    /// Scrapes until `done` holds (up to 20 s); returns the last scrape.
    func scrapeMetrics(until done: (Scrape) -> Bool) async throws -> Scrape {
        var scrape = try await scrapeMetrics()
        let deadline = ContinuousClock.now + .seconds(20)
        while !done(scrape) && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(200))
            scrape = try await scrapeMetrics()
        }
        return scrape
    }
}

/// The local addresses listening on TCP `port`, from /proc/net/tcp and tcp6 (hex, as the kernel
/// writes them: `0100007F` is 127.0.0.1, `00000000` is 0.0.0.0).
func listeningAddresses(port: Int) -> [String] {
    let portHex = String(format: "%04X", port)
    var addresses: [String] = []
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        // Read to EOF: /proc files have no size, so whole-file reads that trust stat() get nothing.
        guard let handle = FileHandle(forReadingAtPath: file), let data = try? handle.readToEnd() else { continue }
        try? handle.close()
        let text = String(decoding: data, as: UTF8.self)
        for line in text.split(separator: "\n").dropFirst() {
            let fields = line.split(separator: " ")
            guard fields.count > 3, fields[3] == "0A" else { continue }  // 0A: LISTEN
            let local = fields[1].split(separator: ":")
            if local.count == 2, local[1] == portHex { addresses.append(String(local[0])) }
        }
    }
    return addresses
}

/// promtool's path; when it is missing, the test fails if MAILTIER_REQUIRE_SERVICES=1 and is
/// skipped with a note otherwise (install it with scripts/install-deps.sh: apt `prometheus`).
func promtool(sourceLocation: SourceLocation = #_sourceLocation) throws -> String? {
    if let path = try? Tools.path("promtool") { return path }
    let how = "install it with scripts/install-deps.sh (apt package prometheus)"
    if ProcessInfo.processInfo.environment["MAILTIER_REQUIRE_SERVICES"] == "1" {
        Issue.record("MAILTIER_REQUIRE_SERVICES=1 but promtool is not installed: \(how)", sourceLocation: sourceLocation)
        return nil
    }
    try Test.cancel("skipped: promtool is not installed (\(how))", sourceLocation: sourceLocation)
}

/// AUTH failed once, then succeeded; one message accepted, one rejected at the end of its data
/// (a bare LF: 554 5.6.0).
func metricsTraffic() -> SMTPScript {
    var s = SMTPScript()
    s.greeting()
    s.cmd("EHLO client.test", SMTP.ehlo())
    s.cmd("AUTH PLAIN \(SMTP.plain("alice", "Wr0ng-Passw0rd!"))", SMTP.authInvalid)
    s.cmd("AUTH PLAIN \(SMTP.plain("alice", alicePassword))", SMTP.authOK)
    s.cmd("MAIL FROM:<alice@example.test>", SMTP.senderOk)
    s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
    s.cmd("DATA", SMTP.startData)
    s.send("Subject: counted\r\n\r\nmetrics test\r\n.\r\n", expect: [SMTP.queued])
    s.cmd("MAIL FROM:<alice@example.test>", SMTP.senderOk)
    s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
    s.cmd("DATA", SMTP.startData)
    s.send("Subject: refused\r\n\r\nbare\nline feed\r\n.\r\n", expect: ["554 5.6.0 Message contains bare CR or LF, lines must end with CRLF"])
    s.cmd("QUIT", SMTP.bye)
    s.expectClosed()
    return s
}

@Suite("GET /metrics", .timeLimit(.minutes(3)))
struct MetricsEndpointIntegrationTests {
    @Test("embedded mode: API.md's metrics with the values of real SMTP traffic; labels hold no address; bound to 127.0.0.1")
    func embedded() async throws {
        try await withServer { h in
            // SMTP_METRICS_HOST is not set: the default.
            #expect(h.environment["SMTP_METRICS_HOST"] == nil)
            #expect(listeningAddresses(port: h.metricsPort) == ["0100007F"], "metrics not bound to 127.0.0.1 only")

            try await h.createUser("alice", "alice@example.test", alicePassword)
            try await metricsTraffic().run(h)
            _ = try await h.waitForMaildirFiles(for: "alice@example.test", count: 1)

            let scrape = try await h.scrapeMetrics { scrape in
                scrape.value("smtp_messages_sent_total", ["status": "delivered"]) == 1
                    && scrape.value("smtp_messages_queued") == 0 && scrape.value("smtp_connections_active") == 0
            }
            #expect(scrape.status == 200)
            #expect(scrape.contentType == "text/plain; version=0.0.4; charset=utf-8")
            #expect(scrape.unread.isEmpty, "\(scrape.unread)")

            #expect(scrape.value("smtp_messages_received_total", ["status": "accepted"]) == 1, "\(scrape.text)")
            #expect(scrape.value("smtp_messages_received_total", ["status": "rejected"]) == 1)
            #expect(scrape.value("smtp_messages_sent_total", ["status": "delivered"]) == 1, "\(scrape.text)")
            #expect(scrape.value("smtp_messages_sent_total", ["status": "failed"]) == 0)
            #expect(scrape.value("smtp_messages_queued") == 0)
            #expect(scrape.value("smtp_auth_attempts_total", ["result": "success"]) == 1)
            #expect(scrape.value("smtp_auth_attempts_total", ["result": "failure"]) == 1)
            #expect(scrape.value("smtp_spam_detected_total") == 0)
            #expect(scrape.value("smtp_virus_detected_total") == 0)
            #expect(scrape.value("smtp_connections_active") == 0)
            // The session, and the harness's probes while the server started.
            #expect((scrape.value("smtp_connections_total") ?? 0) >= 2)
            #expect((scrape.value("smtp_memory_bytes") ?? 0) > 1_000_000)
            // Both messages have a processing time; only the one kept whole has a size.
            #expect(scrape.value("smtp_processing_duration_seconds_count") == 2)
            #expect(scrape.value("smtp_processing_duration_seconds_bucket", ["le": "+Inf"]) == 2)
            #expect((scrape.value("smtp_processing_duration_seconds_sum") ?? -1) >= 0)
            #expect(scrape.value("smtp_message_size_bytes_count") == 1)
            #expect((scrape.value("smtp_message_size_bytes_sum") ?? 0) > 30)

            #expect(
                scrape.families == [
                    "smtp_messages_received_total", "smtp_messages_sent_total", "smtp_messages_queued",
                    "smtp_connections_active", "smtp_connections_total", "smtp_auth_attempts_total",
                    "smtp_spam_detected_total", "smtp_virus_detected_total", "smtp_memory_bytes",
                    "smtp_processing_duration_seconds", "smtp_message_size_bytes",
                ], "\(scrape.text)")

            // No label carries a user, an address or an IP: only the documented words and bucket bounds.
            let words: [String: Set<String>] = [
                "status": ["accepted", "rejected", "delivered", "failed"], "result": ["success", "failure"],
            ]
            for sample in scrape.samples {
                for (key, value) in sample.labels {
                    if key == "le" {
                        #expect(value == "+Inf" || Double(value) != nil, "\(sample)")
                    } else {
                        #expect(words[key]?.contains(value) == true, "label \(key)=\(value) in \(sample)")
                    }
                    for secret in ["alice", "@", "example.test", "127.0.0.1", "client.test"] {
                        #expect(!value.contains(secret), "\(sample)")
                    }
                }
            }
        }
    }

    @Test("promtool check metrics accepts the live exposition")
    func promtoolAccepts() async throws {
        guard let promtool = try promtool() else { return }
        try await withServer { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            try await metricsTraffic().run(h)
            let scrape = try await h.scrapeMetrics { $0.value("smtp_messages_sent_total", ["status": "delivered"]) == 1 }
            #expect(scrape.status == 200)
            let result = try await runProcess(
                promtool, ["check", "metrics"], environment: cleanEnvironment(), stdin: Data(scrape.text.utf8), timeout: .seconds(30))
            #expect(result.status == 0 && !result.timedOut, "promtool check metrics:\n\(result.output)\nexposition:\n\(scrape.text)")
        }
    }

    @Test(
        "each role exposes what it measures, memory in all",
        arguments: [
            ("ingress", [
                "smtp_messages_received_total", "smtp_connections_active", "smtp_connections_total",
                "smtp_auth_attempts_total", "smtp_spam_detected_total", "smtp_virus_detected_total",
                "smtp_processing_duration_seconds", "smtp_message_size_bytes", "smtp_memory_bytes",
                // ATRN delivers queued mail over the turned-around connection.
                "smtp_messages_sent_total",
            ]),
            ("delivery", ["smtp_messages_sent_total", "smtp_messages_queued", "smtp_memory_bytes"]),
            ("admin", ["smtp_messages_queued", "smtp_memory_bytes"]),
        ] as [(String, Set<String>)])
    func roles(role: String, families: Set<String>) async throws {
        let h = try ServerHarness(overrides: ["SMTP_ROLE": role])
        do {
            try await h.start(timeout: .seconds(60), readyLine: role == "ingress" ? nil : "Server started and listening")
            let scrape = try await h.scrapeMetrics { $0.families == families }
            #expect(scrape.status == 200)
            #expect(scrape.families == families, "\(scrape.text)")
            #expect((scrape.value("smtp_memory_bytes") ?? 0) > 1_000_000)
            if families.contains("smtp_messages_queued") { #expect(scrape.value("smtp_messages_queued") == 0) }
            #expect(listeningAddresses(port: h.metricsPort) == ["0100007F"], "metrics not bound to 127.0.0.1")
        } catch {
            Issue.record("log:\n\(h.logTail())")
            await h.cleanup()
            throw error
        }
        await h.cleanup()
    }

    @Test("SMTP_METRICS_HOST=0.0.0.0: /metrics listens on every interface")
    func metricsHost() async throws {
        try await withServer(["SMTP_METRICS_HOST": "0.0.0.0"]) { h in
            #expect(listeningAddresses(port: h.metricsPort) == ["00000000"], "metrics not bound to 0.0.0.0")
            let scrape = try await h.scrapeMetrics()
            #expect(scrape.status == 200)
            #expect(scrape.value("smtp_spam_detected_total") == 0)
        }
    }
}
