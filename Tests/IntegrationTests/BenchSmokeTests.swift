// The benchmark harness (bench/run.py, issue 7) in its smoke mode: every scenario with tiny
// counts against the debug build, a private Postfix and smtp-sink. It checks that the harness
// works end to end — that each scenario ran and measured something — never how fast anything is.

import Foundation
import Testing

enum BenchSmoke {
    static let tools = ["smtp-source", "smtp-sink", "postfix"]
    static var required: Bool { ProcessInfo.processInfo.environment["MAILTIER_REQUIRE_SERVICES"] == "1" }
    /// Runs when the Postfix tools are there, or (failing on what is missing) when services are required.
    static var shouldRun: Bool { required || tools.allSatisfy { (try? Tools.path($0)) != nil } }

    static let repository = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static let sizes = ["1k", "100k"]
    static let targets = ["ours", "postfix", "sink"]
    /// A JSON number, whichever way Foundation decoded it.
    static func number(_ value: Any?) -> Double? {
        switch value {
        case let value as Double: value
        case let value as Int: Double(value)
        case let value as NSNumber: value.doubleValue
        default: nil
        }
    }

    static var ingressScenarios: [String] {
        sizes.flatMap { size in
            ["new", "reuse"].flatMap { mode in targets.map { "ingress/\($0)/\(size)/\(mode)" } }
        }
    }
}

@Suite("Benchmark harness, smoke mode", .serialized, .timeLimit(.minutes(8)))
struct BenchSmokeTests {
    @Test("scripts/bench.sh --smoke runs every scenario and reports positive rates", .enabled(if: BenchSmoke.shouldRun))
    func smokeRun() async throws {
        for tool in BenchSmoke.tools { _ = try Tools.path(tool) }  // fails, naming the missing tool
        let server = binaryPath("smtp-server")
        #expect(FileManager.default.isExecutableFile(atPath: server), "build smtp-server first: \(server)")

        let out = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-bench-smoke-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: out) }
        var environment = cleanEnvironment()
        environment["BENCH_BIN"] = URL(fileURLWithPath: server).deletingLastPathComponent().path
        environment.removeValue(forKey: "BENCH_SMOKE")

        await ServerSlots.shared.acquire()
        let result = try await runProcess(
            "/bin/bash", [BenchSmoke.repository.appendingPathComponent("scripts/bench.sh").path, "--smoke", "--repeat", "2", "--out", out.path],
            environment: environment, timeout: .seconds(420))
        await ServerSlots.shared.release()
        #expect(result.status == 0 && !result.timedOut, "bench.sh --smoke failed:\n\(result.output.suffix(6000))")

        let data = try Data(contentsOf: out.appendingPathComponent("smoke-latest.json"))
        let report = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect(report["smoke"] as? Bool == true)
        let scenarios = try #require(report["scenarios"] as? [[String: Any]])
        let byName = Dictionary(scenarios.compactMap { s in (s["name"] as? String).map { ($0, s) } }, uniquingKeysWith: { a, _ in a })

        for name in BenchSmoke.ingressScenarios + ["delivery/ours/1k"] {
            let scenario = try #require(byName[name], "no scenario \(name) in the report")
            #expect(scenario["ok"] as? Bool == true, "\(name) failed: \(scenario["error"] ?? "")")
            let rate = BenchSmoke.number(scenario["msgs_per_s"]) ?? 0
            #expect(rate > 0, "\(name): msg/s \(rate)")
            #expect((BenchSmoke.number(scenario["cpu_s_per_1000"]) ?? -1) >= 0, "\(name): no CPU figure")
            #expect((BenchSmoke.number(scenario["peak_rss_mb"]) ?? 0) > 0, "\(name): no peak RSS")
            if name.hasPrefix("ingress/") {
                let latency = scenario["latency_ms"] as? [String: Any]
                #expect((BenchSmoke.number(latency?["p99"]) ?? 0) > 0, "\(name): no latency p99")
                // --repeat 2: both runs kept, the row's msg/s is their median.
                let runs = (scenario["runs_msgs_per_s"] as? [Any])?.compactMap(BenchSmoke.number) ?? []
                #expect(runs.count == 2, "\(name): runs \(runs)")
                if runs.count == 2 { #expect(abs((runs[0] + runs[1]) / 2 - rate) < 0.2, "\(name): \(rate) is not the median of \(runs)") }
            }
            if name.hasPrefix("ingress/ours/") {
                #expect(BenchSmoke.number(scenario["ratio_vs_postfix"]) != nil, "\(name): no ratio to Postfix")
                #expect(BenchSmoke.number(scenario["ratio_vs_sink"]) != nil, "\(name): no ratio to smtp-sink")
            }
        }
        let idle = try #require(byName["idle/ours"], "no idle scenario")
        #expect(idle["ok"] as? Bool == true, "idle failed: \(idle["error"] ?? "")")
        #expect(BenchSmoke.number(idle["connections"]) == 50)
        #expect(BenchSmoke.number(idle["rss_per_connection_kb"]) != nil)
    }
}
