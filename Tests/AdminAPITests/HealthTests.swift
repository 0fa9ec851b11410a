import Foundation
import Synchronization
import Hummingbird
import HummingbirdTesting
import MailTier
import NIOConcurrencyHelpers
import Testing

@testable import AdminAPI

/// Counts the runs of a check, and fails it while `failing` holds an error text.
private final class FakeCheck: Sendable {
    private let state = Mutex<(runs: Int, failing: String?)>((0, nil))
    var runs: Int { state.withLock { $0.runs } }
    func fail(with text: String?) { state.withLock { $0.failing = text } }
    func check(_ name: String) -> HealthCheck {
        HealthCheck(name) { [self] in
            let failing = state.withLock { state -> String? in
                state.runs += 1
                return state.failing
            }
            if let failing { throw TestError(failing) }
        }
    }
}

private struct TestError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

private func application(
    database: HealthCheck, spool: HealthCheck = HealthCheck("spool") {}, connections: (Int, Int) = (3, 17)
) -> some ApplicationProtocol {
    let health = HealthEndpoint(
        checks: HealthChecks([database, spool], cacheDuration: .zero),
        connections: { connections },
        memory: { MemoryUsage(residentBytes: 47_395_635, heapBytes: 39_950_746) })  // 45.2 and 38.1 MB
    return Application(router: AdminAPI.router(health: health))
}

private func json(_ buffer: ByteBuffer) throws -> [String: Any] {
    let object = try JSONSerialization.jsonObject(with: Data(buffer.readableBytesView))
    return try #require(object as? [String: Any])
}

@Suite struct HealthEndpointTests {
    @Test func healthyReportHasAPIShape() async throws {
        try await application(database: HealthCheck("database") {}).test(.router) { client in
            try await client.execute(uri: "/health", method: .get) { response in
                #expect(response.status == .ok)
                #expect(response.headers[.apiVersion] == "1.0")
                #expect(response.headers[.contentType]?.hasPrefix("application/json") == true)
                let body = try json(response.body)
                #expect(Set(body.keys) == ["status", "version", "uptime_seconds", "connections", "memory", "checks"])
                #expect(body["status"] as? String == "healthy")
                #expect(body["version"] as? String == MailTierVersion.current)
                // Seconds since the endpoint was made: small, but a loaded machine may take a while.
                let uptime = try #require(body["uptime_seconds"] as? Int)
                #expect((0...120).contains(uptime))
                let connections = try #require(body["connections"] as? [String: Int])
                #expect(connections == ["active": 3, "total": 17])
                let memory = try #require(body["memory"] as? [String: Double])
                #expect(memory == ["allocated_mb": 45.2, "heap_mb": 38.1])
                #expect(body["checks"] as? [String: String] == ["database": "ok", "spool": "ok"])
                // One decimal, as in API.md.
                let text = String(buffer: response.body)
                #expect(text.contains("\"uptime_seconds\": \(uptime),"))
                #expect(text.contains("\"allocated_mb\": 45.2,"))
                #expect(text.contains("\"heap_mb\": 38.1}"))
            }
        }
    }

    @Test func failingDatabaseMakesItUnhealthy() async throws {
        let database = FakeCheck()
        database.fail(with: "cannot reach PostgreSQL: connection refused")
        try await application(database: database.check("database")).test(.router) { client in
            try await client.execute(uri: "/health", method: .get) { response in
                #expect(response.status == .serviceUnavailable)
                #expect(response.headers[.apiVersion] == "1.0")
                let body = try json(response.body)
                #expect(body["status"] as? String == "unhealthy")
                #expect(
                    body["checks"] as? [String: String]
                        == ["database": "cannot reach PostgreSQL: connection refused", "spool": "ok"])
                #expect(body["connections"] as? [String: Int] == ["active": 3, "total": 17])
            }
            database.fail(with: nil)
            try await client.execute(uri: "/health", method: .get) { response in
                #expect(response.status == .ok)
                let body = try json(response.body)
                #expect(body["status"] as? String == "healthy")
            }
        }
    }

    @Test func failingSpoolMakesItUnhealthy() async throws {
        let spool = HealthCheck("spool") { throw TestError("S3 error NoSuchBucket (HTTP 404): \"mail\"\nbucket") }
        try await application(database: HealthCheck("database") {}, spool: spool).test(.router) { client in
            try await client.execute(uri: "/health", method: .get) { response in
                #expect(response.status == .serviceUnavailable)
                let checks = try json(response.body)["checks"] as? [String: String]
                #expect(checks == ["database": "ok", "spool": "S3 error NoSuchBucket (HTTP 404): \"mail\" bucket"])
            }
        }
    }

    @Test(arguments: [("/nothing", "GET"), ("/health/more", "GET"), ("/health", "POST")])
    func otherRequestsGetJSON404(path: String, method: String) async throws {
        try await application(database: HealthCheck("database") {}).test(.router) { client in
            try await client.execute(uri: path, method: HTTPRequest.Method(method)!) { response in
                #expect(response.status == .notFound)
                #expect(response.headers[.apiVersion] == "1.0")
                #expect(response.headers[.contentType]?.hasPrefix("application/json") == true)
                let body = try json(response.body)
                #expect(body["error"] as? String == "not_found")
                #expect(body["message"] as? String == "no such endpoint: \(method) \(path)")
            }
        }
    }
}

@Suite struct HealthChecksTests {
    @Test func resultsAreCachedForTheCacheDuration() async throws {
        let database = FakeCheck()
        let checks = HealthChecks([database.check("database")], cacheDuration: .seconds(600))
        for _ in 0..<5 { #expect(await checks.results() == [HealthCheckResult(name: "database", problem: nil)]) }
        // A storm of concurrent probes: one round.
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<50 { group.addTask { _ = await checks.results() } }
        }
        #expect(database.runs == 1)

        let uncached = HealthChecks([database.check("database")], cacheDuration: .zero)
        _ = await uncached.results()
        _ = await uncached.results()
        #expect(database.runs == 3)
    }

    @Test func aCheckThatNeverAnswersTimesOut() async throws {
        // Ignores cancellation, like a blocking call on a thread pool.
        let release = Mutex(false)
        let stuck = HealthCheck("database") {
            while !release.withLock({ $0 }) { try? await Task.sleep(for: .milliseconds(20)) }
        }
        defer { release.withLock { $0 = true } }
        let checks = HealthChecks([stuck, HealthCheck("spool") {}], timeout: .milliseconds(300))
        let started = ContinuousClock.now
        let results = await checks.results()
        #expect(ContinuousClock.now - started < .seconds(20))  // a busy machine is slow, but not that slow
        #expect(results == [
            HealthCheckResult(name: "database", problem: "no answer within 0.3 s"),
            HealthCheckResult(name: "spool", problem: nil),
        ])
    }
}

@Suite struct HealthReportTests {
    @Test func megabytesHaveOneDecimal() {
        #expect(JSON.megabytes(0) == "0.0")
        #expect(JSON.megabytes(1_048_576) == "1.0")
        #expect(JSON.megabytes(47_395_635) == "45.2")
        #expect(JSON.megabytes(1_048_576 * 1024 + 52_429) == "1024.1")
    }

    @Test func stringsAreEscaped() {
        #expect(JSON.string("a\"b\\c\nd\u{1}é") == "\"a\\\"b\\\\c\\nd\\u0001é\"")
    }

    @Test func memoryFromProcStatus() {
        let status = ["Name:\tsmtp-server\n", "VmRSS:\t   46284 kB\n", "RssAnon:\t   39014 kB\n", "RssFile:\t    7270 kB\n"]
        #expect(MemoryUsage(status: status) == MemoryUsage(residentBytes: 46284 * 1024, heapBytes: 39014 * 1024))
        #expect(MemoryUsage(status: []) == MemoryUsage(residentBytes: 0, heapBytes: 0))
        #if os(Linux)
        let now = MemoryUsage.current()
        #expect(now.residentBytes > 0 && now.heapBytes > 0 && now.heapBytes <= now.residentBytes)
        #endif
    }
}

@Suite struct ResourceHealthChecksTests {
    @Test func diskSpaceFailsUnderTheMinimum() async throws {
        let fine = await HealthChecks.outcome(of: .diskSpace(NSTemporaryDirectory(), minimumFreePercent: 0), within: .seconds(5))
        #expect(fine.isOK, "\(fine)")
        let short = await HealthChecks.outcome(of: .diskSpace(NSTemporaryDirectory(), minimumFreePercent: 100.5), within: .seconds(5))
        #expect(short.name == "disk")
        #expect(short.problem?.contains("% free on the file system of") == true && short.problem?.contains("(under 100%)") == true, "\(short)")
        let missing = await HealthChecks.outcome(of: .diskSpace("/no/such/dir"), within: .seconds(5))
        #expect(missing.problem?.contains("cannot read the file system of /no/such/dir") == true, "\(missing)")
    }

    @Test func memoryFailsOverTheMaximum() async throws {
        let limit = try #require(MemoryUsage.limitBytes())
        #expect(limit > 0)
        let fine = await HealthChecks.outcome(of: .memory(), within: .seconds(5))
        #expect(fine.isOK, "a test process is not near the machine's memory: \(fine)")
        let full = HealthCheck.memory(usage: { MemoryUsage(residentBytes: limit / 100 * 95, heapBytes: 0) })
        let answer = await HealthChecks.outcome(of: full, within: .seconds(5))
        #expect(answer.problem?.hasSuffix("% of the memory limit in use (over 90%)") == true, "\(answer)")
    }

    @Test func refusedConnectionsSpikeIsCountedOverTheWindow() {
        let window = SpikeWindow(window: .seconds(60))
        let start = ContinuousClock.now
        #expect(window.increase(now: start, total: 10) == 0)
        #expect(window.increase(now: start + .seconds(20), total: 80) == 70)
        #expect(window.increase(now: start + .seconds(50), total: 150) == 140)
        // A minute after the first sample, the baseline moves to the sample at 20 s.
        #expect(window.increase(now: start + .seconds(85), total: 160) == 80)
        #expect(window.increase(now: start + .seconds(200), total: 160) == 0)
    }

    @Test func refusedConnectionsCheckFailsOverTheLimit() async {
        let refused = NIOLockedValueBox(0)
        let check = HealthCheck.refusedConnections(limit: 5) { refused.withLockedValue { $0 } }
        #expect(await HealthChecks.outcome(of: check, within: .seconds(5)).isOK)
        refused.withLockedValue { $0 = 6 }
        let answer = await HealthChecks.outcome(of: check, within: .seconds(5))
        #expect(answer.problem == "6 connections refused in the last 60 s (over 5)", "\(answer)")
    }
}
