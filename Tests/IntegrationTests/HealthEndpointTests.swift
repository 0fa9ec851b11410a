// GET /health over HTTP on SMTP_HEALTH_PORT, against the real smtp-server in its roles.

import Foundation
import Testing

/// One HTTP answer: status, lower-cased header names, the body parsed as a JSON object.
struct HealthAnswer {
    var status: Int
    var headers: [String: String]
    var body: [String: Any]
    var text: String

    var checks: [String: String] { body["checks"] as? [String: String] ?? [:] }
    var connections: [String: Int] { body["connections"] as? [String: Int] ?? [:] }
}

/// `GET http://127.0.0.1:<port><path>` with curl (10 s limit): status, lower-cased header names,
/// body. Throws when nothing answers.
func httpGet(port: Int, _ path: String) async throws -> (status: Int, headers: [String: String], body: String) {
    try await httpRequest(port: port, "GET", path)
}

/// One request to `http://127.0.0.1:<port><path>` with curl (10 s limit): Basic credentials when
/// `user` is given, `json` as the body. Throws when nothing answers.
func httpRequest(
    port: Int, _ method: String, _ path: String, user: (name: String, password: String)? = nil, json: String? = nil
) async throws -> (status: Int, headers: [String: String], body: String) {
    var arguments = ["-s", "-i", "--max-time", "10", "-X", method]
    if let user { arguments += ["-u", "\(user.name):\(user.password)"] }
    if let json { arguments += ["-H", "Content-Type: application/json", "--data-binary", json] }
    let result = try await runProcess(
        try Tools.path("curl"), arguments + ["http://127.0.0.1:\(port)\(path)"],
        environment: cleanEnvironment(), timeout: .seconds(30))
    guard result.status == 0, let split = result.stdout.range(of: "\r\n\r\n") else {
        throw HarnessError("no HTTP answer on port \(port) (curl status \(result.status)):\n\(result.output)")
    }
    let head = result.stdout[..<split.lowerBound].split(separator: "\r\n")
    let status = head.first.flatMap { Int($0.split(separator: " ").dropFirst().first ?? "") } ?? 0
    var headers: [String: String] = [:]
    for line in head.dropFirst() {
        guard let colon = line.firstIndex(of: ":") else { continue }
        headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
    }
    return (status, headers, String(result.stdout[split.upperBound...]))
}

extension ServerHarness {
    /// `GET path` on the health port; throws when nothing answers.
    func getHealth(_ path: String = "/health") async throws -> HealthAnswer {
        try await http("GET", path)
    }

    /// One request to the health port (the admin API); throws when nothing answers or the body
    /// is not a JSON object.
    func http(_ method: String, _ path: String, user: (name: String, password: String)? = nil, json: String? = nil) async throws
        -> HealthAnswer
    {
        let (status, headers, text) = try await httpRequest(port: healthPort, method, path, user: user, json: json)
        let body = (try? JSONSerialization.jsonObject(with: Data(text.utf8))) as? [String: Any]
        guard let body else { throw HarnessError("not a JSON object from \(method) \(path): \(text)") }
        return HealthAnswer(status: status, headers: headers, body: body, text: text)
    }
}

@Suite("GET /health", .timeLimit(.minutes(3)))
struct HealthEndpointIntegrationTests {
    @Test("embedded mode: 200, API.md's fields and checks, connections.total counts SMTP connections")
    func embedded() async throws {
        try await withServer { h in
            let first = try await h.getHealth()
            #expect(first.status == 200, "\(first.text)")
            #expect(first.headers["x-api-version"] == "1.0")
            #expect(first.headers["content-type"]?.hasPrefix("application/json") == true)
            #expect(first.body["status"] as? String == "healthy")
            #expect((first.body["version"] as? String)?.isEmpty == false)
            #expect(first.body["uptime_seconds"] is Int)
            let memory = first.body["memory"] as? [String: Double] ?? [:]
            #expect(Set(memory.keys) == ["allocated_mb", "heap_mb"], "\(first.text)")
            #expect(memory["allocated_mb", default: 0] > 0)
            #expect(first.checks == ["database": "ok", "spool": "ok", "memory": "ok", "disk": "ok", "connections": "ok"], "\(first.text)")
            #expect(Set(first.connections.keys) == ["active", "total"])

            let before = first.connections["total", default: 0]
            let port = h.smtpPort
            let greeting = await onBackgroundThread { Ports.probeGreeting(port: port) }
            #expect(greeting?.hasPrefix("220 ") == true)
            let after = try await h.getHealth()
            #expect(after.connections["total", default: 0] >= before + 1, "before: \(first.text)\nafter: \(after.text)")

            let missing = try await h.getHealth("/nothing-here")
            #expect(missing.status == 404)
            #expect(missing.headers["x-api-version"] == "1.0")
            #expect(missing.body["error"] as? String == "not_found")
        }
    }

    @Test("SMTP_ROLE=admin: starts, serves /health with no SMTP listener")
    func adminRole() async throws {
        let h = try ServerHarness(overrides: ["SMTP_ROLE": "admin"])
        do {
            try await h.start(timeout: .seconds(60), readyLine: "Server started and listening")
            let answer = try await h.getHealth()
            #expect(answer.status == 200, "\(answer.text)")
            #expect(answer.body["status"] as? String == "healthy")
            #expect(answer.connections == ["active": 0, "total": 0])
            #expect(answer.checks == ["database": "ok", "spool": "ok", "memory": "ok", "disk": "ok"], "\(answer.text)")
            let port = h.smtpPort
            let greeting = await onBackgroundThread { Ports.probeGreeting(port: port) }
            #expect(greeting == nil, "admin opened an SMTP listener")
        } catch {
            Issue.record("log:\n\(h.logTail())")
            await h.cleanup()
            throw error
        }
        await h.cleanup()
    }

    @Test("PostgreSQL unreachable: 503 with the database check failing, within seconds; the process stays up")
    func databaseDown() async throws {
        let closed = try Ports.free()
        let h = try ServerHarness(overrides: ["SMTP_DATABASE_URL": "postgres://mailtier:secret@127.0.0.1:\(closed)/mailtier"])
        do {
            try await h.start(timeout: .seconds(60), readyLine: "Server started and listening")
            let started = ContinuousClock.now
            let answer = try await h.getHealth()
            let took = ContinuousClock.now - started
            #expect(answer.status == 503, "\(answer.text)")
            #expect(answer.body["status"] as? String == "unhealthy")
            #expect(answer.checks["database"].map { $0 != "ok" && !$0.isEmpty } == true, "\(answer.text)")
            #expect(answer.checks["spool"] == "ok")
            #expect(!answer.text.contains("secret"), "the URL's password leaked: \(answer.text)")
            // The check gives up after 2 s; a busy machine may add some.
            #expect(took < .seconds(15), "took \(took)")
            // A second probe (cached or a new round) says the same, and the server still runs.
            let again = try await h.getHealth()
            #expect(again.status == 503)
            #expect(h.isRunning)
        } catch {
            Issue.record("log:\n\(h.logTail())")
            await h.cleanup()
            throw error
        }
        await h.cleanup()
    }

    @Test("cluster mode: ingress, delivery and admin report PostgreSQL and S3 ok; a missing bucket gives 503 naming it")
    func clusterRoles() async throws {
        guard let cluster = try await Cluster.make() else { return }
        do {
            for role in ["ingress", "delivery", "admin"] {
                let node = try await cluster.addNode(role: role)
                // The schema is migrated beside the start: until then the database check fails.
                var last: HealthAnswer?
                let healthy = try await poll(timeout: .seconds(30), interval: .milliseconds(250)) {
                    last = try await node.getHealth()
                    return last?.status == 200
                }
                #expect(healthy, "\(role): \(last?.text ?? "no answer")")
                let checks = last?.checks ?? [:]
                #expect(checks["database"] == "ok" && checks["spool"] == "ok" && checks["memory"] == "ok", "\(role): \(last?.text ?? "")")
                #expect(checks.values.allSatisfy { $0 == "ok" }, "\(role): \(last?.text ?? "")")
                #expect((checks["connections"] != nil) == (role == "ingress"), "\(role): \(last?.text ?? "")")
                #expect(last?.headers["x-api-version"] == "1.0")
            }
            let missing = "mailtier-missing-\(UUID().uuidString.prefix(8).lowercased())"
            let node = try await cluster.addNode(role: "admin", ["SMTP_S3_BUCKET": missing])
            let answer = try await node.getHealth()
            #expect(answer.status == 503, "\(answer.text)")
            #expect(answer.body["status"] as? String == "unhealthy")
            #expect(answer.checks["spool"]?.contains("NoSuchBucket") == true, "\(answer.text)")
            #expect(node.isRunning)
        } catch {
            Issue.record("logs:\n\(cluster.nodes.map { $0.logTail(30) }.joined(separator: "\n"))")
            await cluster.cleanup()
            throw error
        }
        await cluster.cleanup()
    }
}
