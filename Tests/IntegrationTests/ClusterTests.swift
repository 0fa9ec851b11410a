// Cluster mode through its real parts: smtp-server processes in their roles, sharing one
// PostgreSQL database, one S3 bucket and one Redis, behind a real haproxy in TCP mode with
// send-proxy-v2 — the set-up of `make cluster`, one per test.
import Foundation
import Testing

@Suite("Cluster mode, black box", .serialized, .timeLimit(.minutes(5)))
struct ClusterTests {
    static let alice = "alice@example.test"

    // MARK: Durability across nodes

    @Test("200 messages through haproxy, spread over both ingress nodes: every 250 has its S3 object with the recorded SHA-256 and its rows; no row without an object")
    func messagesThroughTheLoadBalancer() async throws {
        guard let cluster = try await Cluster.make() else { return }
        do {
            let first = try await cluster.addNode(role: "ingress")
            let second = try await cluster.addNode(role: "ingress")
            try await first.createUser("alice", Self.alice, alicePassword)
            try await cluster.startHaproxy(in: [first, second])

            let results = try await cluster.load(["--count", "200", "--threads", "8", "--source", "127.0.0.10"])
            let ids = results.compactMap { $0.code == 250 ? $0.id : nil }
            #expect(results.count == 200)
            #expect(ids.count == 200, "not every message got 250: \(results.filter { $0.code != 250 }.prefix(5))")
            #expect(Set(ids).count == ids.count)

            // Both nodes took their share.
            let accepted = [first, second].map { $0.log.components(separatedBy: "message accepted").count - 1 }
            #expect(accepted.allSatisfy { $0 > 0 } && accepted.reduce(0, +) == 200, "accepted per node: \(accepted)")

            let rows = try await psqlRows(
                cluster.databaseURL, "SELECT json_agg(t) FROM (SELECT id, sha256, blob_key, size_bytes FROM queue_messages) t")
            let recipients = try await psqlRows(
                cluster.databaseURL, "SELECT json_agg(t) FROM (SELECT message_id, recipient FROM queue_recipients) t")
            #expect(Set(rows.compactMap { $0.text("id") }) == Set(ids))
            #expect(recipients.count == 200 && recipients.allSatisfy { $0.text("recipient") == Self.alice })
            let objects = try #require(try await probeJSON(["s3", "sha256", cluster.bucket, "spool/"]) as? [String: String])
            for row in rows {
                let key = "spool/\(row.text("blob_key") ?? "?")"
                #expect(objects[key] != nil, "row \(row.text("id") ?? "?") has no object \(key)")
                #expect(objects[key] == row.text("sha256"), "object \(key) does not match its row's SHA-256")
            }
            #expect(objects.count == 200)
        } catch {
            await cluster.cleanup()
            throw error
        }
        await cluster.cleanup()
    }

    @Test("kill -9 of an ingress node under load: every acknowledged message is stored and then delivered")
    func ingressKilledUnderLoad() async throws {
        guard let cluster = try await Cluster.make() else { return }
        do {
            let first = try await cluster.addNode(role: "ingress")
            let second = try await cluster.addNode(role: "ingress")
            try await first.createUser("alice", Self.alice, alicePassword)
            try await cluster.startHaproxy(in: [first, second])

            let sender = try cluster.startLoad(["--duration", "8", "--threads", "4", "--source", "127.0.0.15"])
            try await Task.sleep(for: .seconds(3))
            await second.kill9()
            let results = try await cluster.finish(sender)
            let acknowledged = results.compactMap { $0.code == 250 ? $0.id : nil }
            #expect(acknowledged.count > 20, "too little load to mean anything: \(acknowledged.count)")
            // Sessions cut by the kill were never acknowledged; the survivor kept accepting.
            #expect(first.isRunning)

            // A delivery node then delivers every acknowledged message, once.
            _ = try await cluster.addNode(role: "delivery")
            var delivered: [String] = []
            let done = await poll(timeout: .seconds(60), interval: .milliseconds(500)) {
                delivered = ((try? await psqlRows(
                    cluster.databaseURL,
                    #"SELECT json_agg(t) FROM (SELECT message_id FROM messages WHERE "user" = 'alice@example.test') t"#)) ?? [])
                    .compactMap { $0.text("message_id") }
                return Set(acknowledged).isSubset(of: Set(delivered))
            }
            let missing = Set(acknowledged).subtracting(delivered)
            #expect(done && missing.isEmpty, "acknowledged but not delivered: \(missing.sorted().prefix(10))")
            #expect(delivered.count == Set(delivered).count, "a message was stored twice")
        } catch {
            await cluster.cleanup()
            throw error
        }
        await cluster.cleanup()
    }

    // MARK: Shared limits

    @Test("shared limit: from one client address the connection over the per-minute limit is refused by whichever node it reaches; concurrent ones too")
    func sharedConnectionLimit() async throws {
        guard let cluster = try await Cluster.make() else { return }
        do {
            let limit = ["SMTP_RATE_CONNECTIONS_PER_MINUTE": "4"]
            let first = try await cluster.addNode(role: "ingress", limit)
            let second = try await cluster.addNode(role: "ingress", limit)
            try await cluster.startHaproxy(in: [first, second])

            // One after another: haproxy alternates, so the refusals come from both nodes.
            // Fresh client addresses each run: the counters live in the shared Redis.
            let (one, other) = (randomLoopbackAddress(), randomLoopbackAddress())
            let sequential = try await cluster.greetings(count: 8, source: one, concurrent: false)
            #expect(sequential.prefix(4).allSatisfy { $0.hasPrefix("220 ") }, "\(sequential)")
            #expect(sequential.suffix(4).allSatisfy { $0.hasPrefix("421 4.7.0 ") && $0.contains("Too many connections") }, "\(sequential)")
            for node in [first, second] {
                #expect(node.log.contains("connection rate limit"), "a node let an over-limit connection in")
            }
            // Twenty at once from another address: exactly the limit gets in, across both nodes.
            let concurrent = try await cluster.greetings(count: 20, source: other, concurrent: true)
            #expect(concurrent.filter { $0.hasPrefix("220 ") }.count == 4, "\(concurrent)")
            #expect(concurrent.filter { $0.hasPrefix("421 4.7.0 ") }.count == 16, "\(concurrent)")
            if sequential.prefix(4).contains(where: { !$0.hasPrefix("220 ") }) || concurrent.filter({ $0.hasPrefix("220 ") }).count != 4 {
                Issue.record("node logs:\n\(first.logTail(40))\n\(second.logTail(40))")
            }
        } catch {
            await cluster.cleanup()
            throw error
        }
        await cluster.cleanup()
    }

    // MARK: Dependency failures

    @Test("PostgreSQL stopped under load: 451 4.3.0 and no 250 without a commit; restarted: accepting again, same process")
    func databaseOutage() async throws {
        guard let cluster = try await Cluster.make() else { return }
        let postgres = cluster.directory.appendingPathComponent("private-postgres").path
        let script = try Tools.script("private_postgres.sh")
        do {
            let port = try Ports.free()
            let started = try await runProcess(script, ["start", postgres, "\(port)"], timeout: .seconds(90))
            try #require(started.status == 0, "private PostgreSQL did not start: \(started.output)")
            let url = "postgres://postgres@127.0.0.1:\(port)/postgres"
            let node = try await cluster.addNode(role: "ingress", ["SMTP_DATABASE_URL": url])
            try await node.createUser("alice", Self.alice, alicePassword)

            let sender = try cluster.startLoad(
                ["--duration", "16", "--threads", "2", "--source", "127.0.0.14"], port: node.smtpPort)
            try await Task.sleep(for: .seconds(4))
            let crash = try await runProcess(script, ["crash", postgres], timeout: .seconds(60))
            try #require(crash.status == 0, "cannot stop PostgreSQL: \(crash.output)")
            let stoppedAt = Date().timeIntervalSince1970
            try await Task.sleep(for: .seconds(4))
            let restart = try await runProcess(script, ["start", postgres, "\(port)"], timeout: .seconds(90))
            try #require(restart.status == 0, "cannot restart PostgreSQL: \(restart.output)")
            let restartedAt = Date().timeIntervalSince1970
            let results = try await cluster.finish(sender)

            let acknowledged = results.compactMap { $0.code == 250 ? $0.id : nil }
            let refused = results.filter { $0.code == 451 }
            #expect(results.contains { $0.code == 250 && $0.start < stoppedAt }, "nothing accepted before the outage")
            #expect(!refused.isEmpty, "no 451 while PostgreSQL was down")
            #expect(refused.allSatisfy { $0.error?.contains("4.3.0") == true }, "\(refused.prefix(3))")
            #expect(results.contains { $0.code == 250 && $0.start > restartedAt + 1 }, "not accepting again after the restart")
            // Every answer is a 250 or a 451. A session cut while PostgreSQL went down may end
            // without an answer (never acknowledged, so nothing is owed); a few at most.
            let other = results.filter { $0.code != 250 && $0.code != 451 }
            #expect(other.allSatisfy { $0.code == nil } && other.count <= 2, "\(other.prefix(5))")
            #expect(node.isRunning && node.runCount == 1)

            let rows = try await psqlRows(url, "SELECT json_agg(t) FROM (SELECT id FROM queue_messages) t")
            let committed = Set(rows.compactMap { $0.text("id") })
            let uncommitted = Set(acknowledged).subtracting(committed)
            #expect(uncommitted.isEmpty, "250 without a committed row: \(uncommitted.sorted())")
        } catch {
            _ = try? await runProcess(script, ["stop", postgres], timeout: .seconds(60))
            await cluster.cleanup()
            throw error
        }
        _ = try? await runProcess(script, ["stop", postgres], timeout: .seconds(60))
        await cluster.cleanup()
    }

    @Test("S3 spool unreachable: 451 4.3.0 at the end of data within the client's patience, no queue row, the node keeps running")
    func spoolUnreachable() async throws {
        let closedPort = try Ports.free()
        try await withServer([
            "SMTP_ENABLE_AUTH": "false", "SMTP_S3_BUCKET": "unreachable", "SMTP_S3_ENDPOINT": "http://127.0.0.1:\(closedPort)",
            "SMTP_S3_ACCESS_KEY": "AK", "SMTP_S3_SECRET_KEY": "SK",
        ]) { h in
            try await h.createUser("alice", Self.alice, alicePassword)
            let started = Date()
            let r = try await smtplibSend(h, from: "bob@example.org", to: [Self.alice], body: Array("Subject: s3 down\r\n\r\nbody\r\n".utf8))
            expectReply(r, "data", ["451 4.3.0 Error: queue file write error, try again later"])
            #expect(Date().timeIntervalSince(started) < 60)
            let rows = try await sqliteRows(h, "SELECT id FROM queue_messages", [])
            #expect(rows.isEmpty)
            #expect(h.isRunning)
        }
    }
}

// MARK: - The cluster

/// A client address of 127.0.0.0/8 (Linux answers for all of it) that no other test uses.
func randomLoopbackAddress() -> String {
    "127.\(Int.random(in: 100...250)).\(Int.random(in: 0...255)).\(Int.random(in: 1...254))"
}

/// The outcome of one message of `load_sender.py`.
struct LoadResult: Sendable {
    var n: Int
    var code: Int?
    var id: String?
    var error: String?
    var start: Double
}

/// One cluster: a fresh PostgreSQL database and S3 bucket on the shared test services, the
/// shared Redis, nodes (each a `ServerHarness`) and a haproxy in front of the ingress nodes.
final class Cluster {
    let services: [String: String]
    let databaseName: String
    let databaseURL: String
    let bucket: String
    let directory: URL
    private(set) var nodes: [ServerHarness] = []
    private var haproxy: ChildProcess?
    private(set) var balancerPort = 0

    private init(services: [String: String], databaseName: String, databaseURL: String, bucket: String, directory: URL) {
        self.services = services
        self.databaseName = databaseName
        self.databaseURL = databaseURL
        self.bucket = bucket
        self.directory = directory
    }

    /// nil (after a failing issue under `make test`) when the services are not there.
    static func make(sourceLocation: SourceLocation = #_sourceLocation) async throws -> Cluster? {
        let names = [
            "MAILTIER_TEST_POSTGRES_URL", "MAILTIER_TEST_REDIS_URL", "MAILTIER_TEST_S3_ENDPOINT", "MAILTIER_TEST_S3_REGION",
            "MAILTIER_TEST_S3_ACCESS_KEY", "MAILTIER_TEST_S3_SECRET_KEY",
        ]
        guard let services = try serviceVariables(names, sourceLocation: sourceLocation) else { return nil }
        let suffix = uniqueSuffix()
        let name = "mt_cluster_\(suffix)"
        guard var components = URLComponents(string: services["MAILTIER_TEST_POSTGRES_URL"]!) else {
            throw HarnessError("MAILTIER_TEST_POSTGRES_URL is not a URL")
        }
        _ = try await psqlRows(components.string!, "CREATE DATABASE \(name)")
        components.path = "/\(name)"
        let bucket = "mailtier-cluster-\(suffix)"
        _ = try await probeJSON(["s3", "create", bucket])
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-cluster-\(suffix)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        return Cluster(services: services, databaseName: name, databaseURL: components.string!, bucket: bucket, directory: directory)
    }

    /// What every node runs with (a test's overrides come on top).
    var environment: [String: String] {
        [
            "SMTP_DATABASE_URL": databaseURL,
            "SMTP_REDIS_URL": services["MAILTIER_TEST_REDIS_URL"]!,
            "SMTP_S3_ENDPOINT": services["MAILTIER_TEST_S3_ENDPOINT"]!,
            "SMTP_S3_REGION": services["MAILTIER_TEST_S3_REGION"]!,
            "SMTP_S3_ACCESS_KEY": services["MAILTIER_TEST_S3_ACCESS_KEY"]!,
            "SMTP_S3_SECRET_KEY": services["MAILTIER_TEST_S3_SECRET_KEY"]!,
            "SMTP_S3_BUCKET": bucket,
            "SMTP_STORAGE_TYPE": "database",
            "SMTP_ENABLE_AUTH": "false",
            "SMTP_TRUSTED_PROXIES": "127.0.0.1/32",
        ]
    }

    /// Starts one node in `role` and waits until it is ready.
    @discardableResult
    func addNode(role: String, _ overrides: [String: String] = [:]) async throws -> ServerHarness {
        var settings = environment
        settings["SMTP_ROLE"] = role
        settings.merge(overrides) { _, new in new }
        let node = try ServerHarness(overrides: settings)
        nodes.append(node)
        let readyLine = ["delivery": "delivery started", "admin": "Server started and listening"][role]
        try await node.start(timeout: .seconds(60), readyLine: readyLine)
        return node
    }

    /// haproxy in TCP mode, round robin with send-proxy-v2 and fast health checks (which send
    /// PROXY v2 LOCAL headers), in front of `ingress`.
    func startHaproxy(in ingress: [ServerHarness]) async throws {
        balancerPort = try Ports.free()
        var lines = [
            "global", "    maxconn 2000",
            "defaults", "    mode tcp", "    timeout connect 2s", "    timeout client 60s", "    timeout server 60s",
            "frontend smtp", "    bind 127.0.0.1:\(balancerPort)", "    default_backend ingress",
            "backend ingress", "    balance roundrobin",
        ]
        for (index, node) in ingress.enumerated() {
            lines.append("    server ingress\(index + 1) 127.0.0.1:\(node.smtpPort) send-proxy-v2 check inter 200ms fall 1 rise 2")
        }
        let config = directory.appendingPathComponent("haproxy.cfg")
        try (lines.joined(separator: "\n") + "\n").write(to: config, atomically: true, encoding: .utf8)
        let executable = (try? Tools.path("haproxy")) ?? "/usr/sbin/haproxy"
        haproxy = try ChildProcess(executable, ["-db", "-f", config.path], outputDirectory: directory, name: "haproxy")
        let port = balancerPort
        let ready = await poll(timeout: .seconds(20), interval: .milliseconds(100)) {
            await onBackgroundThread { Ports.probeGreeting(port: port) }?.hasPrefix("220 ") == true
        }
        guard ready else {
            throw HarnessError("haproxy on \(port) does not greet; its output:\n\(haproxy?.stdout ?? "")\(haproxy?.stderr ?? "")")
        }
    }

    /// Starts `load_sender.py` against the load balancer (or `port`), to the test user.
    func startLoad(_ arguments: [String], port: Int? = nil) throws -> ChildProcess {
        let script = try Tools.script("load_sender.py")
        let python = (try? Tools.path("python3")) ?? "/usr/bin/python3"
        return try ChildProcess(
            python, [script, "--port", "\(port ?? balancerPort)", "--to", ClusterTests.alice] + arguments,
            environment: cleanEnvironment(), outputDirectory: directory, name: "load")
    }

    /// Waits for the sender and parses its report.
    func finish(_ sender: ChildProcess, timeout: Duration = .seconds(120)) async throws -> [LoadResult] {
        let result = await sender.wait(timeout: timeout)
        guard result.status == 0, result.stdout.contains("\"done\": true") else {
            throw HarnessError("load_sender failed (status \(result.status)):\n\(result.output)")
        }
        return try result.stdout.split(separator: "\n").compactMap { line -> LoadResult? in
            guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], let n = object["n"] as? Int
            else { return nil }
            return LoadResult(
                n: n, code: object["code"] as? Int, id: object["id"] as? String, error: object["error"] as? String,
                start: (object["start"] as? Double) ?? 0)
        }
    }

    func load(_ arguments: [String], port: Int? = nil) async throws -> [LoadResult] {
        try await finish(try startLoad(arguments, port: port))
    }

    /// The first line each of `count` connections from `source` saw through the load balancer.
    func greetings(count: Int, source: String, concurrent: Bool) async throws -> [String] {
        let sender = try startLoad(["--greetings", "\(count)", "--source", source, "--threads", concurrent ? "\(count)" : "1"])
        let result = await sender.wait(timeout: .seconds(60))
        guard result.status == 0 else { throw HarnessError("load_sender --greetings failed:\n\(result.output)") }
        var lines: [(Int, String)] = []
        for line in result.stdout.split(separator: "\n") {
            guard let object = try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any], let n = object["n"] as? Int
            else { continue }
            lines.append((n, object["line"] as? String ?? "(closed without a line)"))
        }
        return lines.sorted { $0.0 < $1.0 }.map(\.1)
    }

    /// Stops everything and removes the database, the bucket and the directory.
    func cleanup() async {
        if let haproxy {
            haproxy.signal(SIGTERM)
            _ = await haproxy.wait(timeout: .seconds(10))
        }
        for node in nodes { await node.cleanup() }
        if var components = URLComponents(string: services["MAILTIER_TEST_POSTGRES_URL"]!) {
            components.path = "/postgres"
            _ = try? await psqlRows(components.string!, "DROP DATABASE IF EXISTS \(databaseName) WITH (FORCE)")
        }
        _ = try? await probeJSON(["s3", "destroy", bucket])
        try? FileManager.default.removeItem(at: directory)
    }
}
