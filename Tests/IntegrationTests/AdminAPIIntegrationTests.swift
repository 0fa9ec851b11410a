// The admin REST API over real HTTP (curl) against the built smtp-server: embedded mode, and two
// admin nodes of a cluster sharing PostgreSQL.

import Foundation
import Testing

@Suite("Admin REST API over HTTP", .timeLimit(.minutes(4)))
struct AdminAPIIntegrationTests {
    static let admin = (name: "admin", password: ServerHarness.adminPassword)
    static let carol = (name: "carol", password: "Carol-Passw0rd")

    @Test("embedded mode: an account made through the API receives mail, shows it, changes its password and is deleted")
    func embedded() async throws {
        // Mail from outside without AUTH (TLS-less AUTH is refused), to a local account.
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            let created = try await h.http(
                "POST", "/api/users", user: Self.admin,
                json: #"{"username":"carol","email":"carol@example.test","password":"Carol-Passw0rd","quota_mb":50}"#)
            #expect(created.status == 201, "\(created.text)")
            #expect(created.headers["x-api-version"] == "1.0")
            #expect(created.body["quota_mb"] as? Int == 50 && created.body["enabled"] as? Bool == true)
            // The account is real: user-cli verifies its password.
            let verify = try await h.userCLI(["verify", "carol", Self.carol.password])
            #expect(verify.status == 0, "\(verify.output)")

            let body = Array("From: a@example.test\r\nTo: carol@example.test\r\nSubject: hello\r\n\r\nhi\r\n".utf8)
            let sent = try await smtplibSend(h, from: "a@example.test", to: ["carol@example.test"], body: body)
            let id = try #require(sent.queueID, "\(sent.replies)")
            _ = try await h.waitForStoredMessage(for: "carol@example.test", containing: id)

            let own = try await h.http("GET", "/api/users/carol", user: Self.carol)
            #expect(own.status == 200, "\(own.text)")
            #expect((own.body["statistics"] as? [String: Any])?["messages_received"] as? Int == 1, "\(own.text)")
            #expect(own.headers["x-ratelimit-limit"] == nil, "the harness turns request limits off")
            #expect(try await h.http("GET", "/api/users", user: Self.carol).status == 403)
            #expect(try await h.http("GET", "/api/queue", user: Self.carol).status == 403)

            let queue = try await h.http("GET", "/api/queue?status=failed", user: Self.admin)
            #expect(queue.status == 200 && queue.body["total"] as? Int == 0, "\(queue.text)")
            let stats = try await h.http("GET", "/stats", user: Self.admin)
            #expect(stats.status == 200, "\(stats.text)")
            #expect(((stats.body["storage"] as? [String: Any])?["messages_stored"] as? Int ?? 0) >= 1, "\(stats.text)")
            // This process's counters: the message received and delivered, its processing time.
            let messages = stats.body["messages"] as? [String: Int] ?? [:]
            #expect(messages["received"] == 1 && messages["sent"] == 1 && messages["queued"] == 0, "\(stats.text)")
            let performance = stats.body["performance"] as? [String: Double] ?? [:]
            #expect(performance["avg_processing_ms", default: 0] > 0, "\(stats.text)")
            #expect((stats.body["connections"] as? [String: Int])?["total"] ?? 0 >= 1, "\(stats.text)")

            let anonymous = try await h.http("GET", "/api/users/carol")
            #expect(anonymous.status == 401 && anonymous.headers["www-authenticate"]?.hasPrefix("Basic realm=\"mailtier\"") == true)
            let wrong = try await h.http("GET", "/api/users/carol", user: (name: "carol", password: "Wrong-Passw0rd"))
            #expect(wrong.status == 401 && wrong.body["error"] as? String == "unauthorized", "\(wrong.text)")

            let changed = try await h.http("PUT", "/api/users/carol", user: Self.carol, json: #"{"password":"New-Carol-Passw0rd"}"#)
            #expect(changed.status == 200, "\(changed.text)")
            #expect(try await h.http("GET", "/api/users/carol", user: Self.carol).status == 401)
            #expect(try await h.http("GET", "/api/users/carol", user: (name: "carol", password: "New-Carol-Passw0rd")).status == 200)

            let deleted = try await h.http("DELETE", "/api/users/carol", user: Self.admin)
            #expect(deleted.status == 200 && deleted.body["success"] as? Bool == true, "\(deleted.text)")
            #expect(try await h.http("GET", "/api/users/carol", user: Self.admin).status == 404)
            #expect(h.maildirFiles(for: "carol@example.test").isEmpty, "the mailbox went with the account")
        }
    }

    @Test("cluster mode: two admin nodes on one PostgreSQL; a change made through one holds on the other at once")
    func clusterAdminNodes() async throws {
        guard let cluster = try await Cluster.make() else { return }
        do {
            let first = try await cluster.addNode(role: "admin")
            let second = try await cluster.addNode(role: "admin")
            // The first admin is created once PostgreSQL is migrated.
            var last: HealthAnswer?
            let ready = try await poll(timeout: .seconds(30), interval: .milliseconds(250)) {
                last = try await first.http("GET", "/api/users", user: Self.admin)
                return last?.status == 200
            }
            #expect(ready, "\(last?.text ?? "no answer")")
            let created = try await first.http(
                "POST", "/api/users", user: Self.admin, json: #"{"username":"carol","email":"carol@example.test","password":"Carol-Passw0rd"}"#)
            #expect(created.status == 201, "\(created.text)")
            // Verified (and remembered) on the second node, then disabled through the first.
            #expect(try await second.http("GET", "/api/users/carol", user: Self.carol).status == 200)
            let disabled = try await first.http("PUT", "/api/users/carol", user: Self.admin, json: #"{"enabled":false}"#)
            #expect(disabled.status == 200, "\(disabled.text)")
            #expect(try await second.http("GET", "/api/users/carol", user: Self.carol).status == 401)
            let listed = try await second.http("GET", "/api/users", user: Self.admin)
            #expect((listed.body["users"] as? [[String: Any]])?.first { $0["username"] as? String == "carol" }?["enabled"] as? Bool == false)
            #expect(try await second.http("GET", "/api/queue", user: Self.admin).status == 200)
        } catch {
            Issue.record("logs:\n\(cluster.nodes.map { $0.logTail(30) }.joined(separator: "\n"))")
            await cluster.cleanup()
            throw error
        }
        await cluster.cleanup()
    }

    @Test("schemathesis against /openapi.json with admin credentials: no 5xx, every status, header and body as described")
    func schemathesis() async throws {
        let python = try await Tools.python()
        let probe = try await runProcess(python, ["-c", "import schemathesis"], environment: cleanEnvironment())
        try #require(probe.status == 0, "schemathesis is not installed (make test installs it): \(probe.output)")
        try await withServer { h in
            // Something in the queue and a mailbox, so that the examples meet real rows too.
            try await h.createUser("alice", "alice@example.test", alicePassword)
            let result = try await runProcess(
                python,
                [
                    "-m", "schemathesis.cli", "run", "http://127.0.0.1:\(h.healthPort)/openapi.json",
                    "--auth", "\(Self.admin.name):\(Self.admin.password)",
                    "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
                    "--max-examples", "30", "--seed", "1", "--workers", "1", "--request-timeout", "20",
                    "--exclude-path-regex", "^/health$", "--warnings", "off", "--no-color",
                ],
                environment: cleanEnvironment(), timeout: .seconds(300))
            #expect(result.status == 0 && !result.timedOut, "schemathesis found problems:\n\(result.output.suffix(8000))")
            #expect(h.isRunning, "the server died under schemathesis")
        }
    }
}
