import Foundation
import Testing

// Webhooks end to end (API.md "WebHooks", README "Webhooks"): the built smtp-server in
// embedded mode posts to a receiver on 127.0.0.1 (Support/webhook_receiver.py) that checks
// every signature. Events made while the receiver is down arrive once it is back; every
// event arrives exactly once by id.

/// One post the receiver logged.
private struct ReceivedPost: Decodable {
    var id: String?
    var type: String?
    var timestamp: String
    var signature_ok: Bool
    var status: Int
    var content_type: String?
    var path: String
    var body: String
}

/// The receiver, as a child process on a fixed port (so that it can stop and start again).
private final class Receiver {
    let port: Int
    let secret: String
    let log: URL
    private var child: ChildProcess?
    private let directory: URL

    init(directory: URL, secret: String) throws {
        self.port = try Ports.free()
        self.secret = secret
        self.directory = directory
        self.log = directory.appendingPathComponent("webhooks.jsonl")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
    }

    /// Starts answering every post with `status`.
    func start(status: Int = 200) async throws {
        let python = try await Tools.python()
        let script = try Tools.script("webhook_receiver.py")
        let run = try ChildProcess(
            python, [script, "--port", "\(port)", "--secret", secret, "--log", log.path, "--status", "\(status)"],
            environment: cleanEnvironment(), outputDirectory: directory, name: "receiver")
        child = run
        let ready = await poll(timeout: .seconds(20)) { run.stdout.contains("listening") || !run.isRunning }
        guard ready, run.isRunning else { throw HarnessError("webhook receiver did not start: \(run.stdout)\(run.stderr)") }
    }

    func stop() async {
        guard let child else { return }
        child.signal(SIGTERM)
        _ = await child.wait(timeout: .seconds(10))
        self.child = nil
    }

    var posts: [ReceivedPost] {
        let text = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").compactMap { try? JSONDecoder().decode(ReceivedPost.self, from: Data($0.utf8)) }
    }
}

/// Runs `body` with a receiver started (answering `status`) in a scratch directory; stops it and
/// removes the directory afterwards, also when `body` throws.
private func withReceiver(status: Int = 200, _ body: (Receiver) async throws -> Void) async throws {
    let scratch = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-webhooks-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: scratch, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: scratch) }
    let receiver = try Receiver(directory: scratch, secret: "whsec-\(UUID().uuidString)")
    try await receiver.start(status: status)
    do {
        try await body(receiver)
    } catch {
        await receiver.stop()
        throw error
    }
    await receiver.stop()
}

@Suite("Webhooks", .serialized) struct WebhookTests {
    @Test("every event arrives once by id, signed; those made while the receiver was down arrive when it is back")
    func eventsArriveOnceSigned() async throws {
        try await withReceiver { try await run($0) }
    }

    private func run(_ receiver: Receiver) async throws {
        let secret = receiver.secret
        try await withServer([
            "SMTP_WEBHOOK_URL": "http://127.0.0.1:\(receiver.port)/hooks/mailtier",
            "SMTP_WEBHOOK_SECRET": secret,
            "SMTP_WEBHOOK_RETRY_SECONDS": "1",
        ]) { h in
            /// Waits until the receiver holds `count` posts (of `types`, when given).
            func waitForPosts(_ count: Int, _ what: String) async throws {
                let arrived = await poll(timeout: .seconds(60), interval: .milliseconds(200)) { receiver.posts.count >= count }
                if !arrived {
                    throw HarnessError(
                        "\(what): \(receiver.posts.count) of \(count) posts arrived: \(receiver.posts.map { $0.type ?? "?" })\nlog:\n\(h.logTail(40))")
                }
            }

            // Up: the first admin (created at start), a user made with user-cli, a message, a failed AUTH.
            try await h.createUser("alice", "alice@example.test", "Alice-Passw0rd!")
            let body = Array("Subject: Webhook one\r\n\r\nHello\r\n".utf8)
            let sent = try await smtplibSend(
                h, from: "alice@example.test", to: ["alice@example.test"], body: body,
                options: SMTPClientOptions(auth: ("PLAIN", "alice", "Alice-Passw0rd!")))
            let firstID = try #require(sent.queueID, "\(sent.replies)")
            let refused = try await smtplibSend(
                h, from: "alice@example.test", to: ["alice@example.test"], body: body,
                options: SMTPClientOptions(auth: ("PLAIN", "alice", "wrong password")))
            #expect(refused.reply("auth")?.code == 535)
            // user.created ×2, message.received, message.sent, auth.failed.
            try await waitForPosts(5, "while the receiver is up")

            // Down: more events; the sender's posts fail and are retried.
            await receiver.stop()
            try await h.createUser("carol", "carol@example.test", "Carol-Passw0rd!")
            let second = try await smtplibSend(
                h, from: "carol@example.test", to: ["carol@example.test"], body: Array("Subject: Webhook two\r\n\r\nHi\r\n".utf8),
                options: SMTPClientOptions(auth: ("LOGIN", "carol", "Carol-Passw0rd!")))
            let secondID = try #require(second.queueID, "\(second.replies)")
            _ = try await smtplibSend(
                h, from: "carol@example.test", to: ["carol@example.test"], body: body,
                options: SMTPClientOptions(auth: ("LOGIN", "mallory", "guess")))
            try await h.waitForMaildirFiles(for: "carol@example.test", count: 1)
            let failedPosts = await poll(timeout: .seconds(30), interval: .milliseconds(200)) {
                h.log.contains("webhook post failed; will retry")
            }
            #expect(failedPosts, "the sender tried while the receiver was down:\n\(h.logTail(30))")

            // Back: everything arrives.
            try await receiver.start()
            try await waitForPosts(9, "after the receiver came back")
            // A little longer: nothing arrives twice.
            try await Task.sleep(for: .seconds(3))

            let posts = receiver.posts
            #expect(posts.count == 9, "\(posts.map { "\($0.type ?? "?") \($0.id ?? "?")" })")
            #expect(posts.allSatisfy { $0.signature_ok }, "every signature verifies")
            let ids = posts.compactMap(\.id)
            #expect(ids.count == posts.count && Set(ids).count == ids.count, "each event exactly once by id: \(ids)")
            #expect(ids.allSatisfy { $0.hasPrefix("evt_") })
            #expect(posts.allSatisfy { $0.content_type == "application/json" && $0.path == "/hooks/mailtier" })
            let now = Date().timeIntervalSince1970
            #expect(posts.allSatisfy { Double($0.timestamp).map { abs($0 - now) < 300 } ?? false }, "X-MailTier-Timestamp is Unix seconds")

            var byType: [String: [[String: Any]]] = [:]
            for post in posts {
                let object = try #require(
                    try JSONSerialization.jsonObject(with: Data(post.body.utf8)) as? [String: Any], "body: \(post.body)")
                #expect(Set(object.keys) == ["event", "timestamp", "data"], "API.md's envelope: \(post.body)")
                #expect(object["event"] as? String == post.type, "the header names the body's event")
                let timestamp = try #require(object["timestamp"] as? String)
                #expect(timestamp.count == 20 && timestamp.hasSuffix("Z"), "ISO 8601 UTC: \(timestamp)")
                byType[post.type ?? "", default: []].append(try #require(object["data"] as? [String: Any]))
            }
            #expect(byType.mapValues(\.count) == ["user.created": 3, "message.received": 2, "message.sent": 2, "auth.failed": 2])

            let created = (byType["user.created"] ?? []).compactMap { $0["username"] as? String }
            #expect(Set(created) == ["admin", "alice", "carol"])
            for data in byType["user.created"] ?? [] {
                #expect(Set(data.keys) == ["id", "username", "email", "quota_mb", "is_admin", "enabled", "created_at"])
            }
            let received = byType["message.received"] ?? []
            #expect(Set(received.compactMap { $0["message_id"] as? String }) == [firstID, secondID])
            for data in received {
                #expect(Set(data.keys) == ["message_id", "from", "to", "subject", "size_bytes"], "API.md's data: \(data)")
                #expect((data["size_bytes"] as? Int ?? 0) > body.count)
            }
            let first = try #require(received.first { $0["message_id"] as? String == firstID })
            #expect(first["from"] as? String == "alice@example.test" && first["to"] as? [String] == ["alice@example.test"])
            #expect(first["subject"] as? String == "Webhook one")
            #expect(Set((byType["message.sent"] ?? []).compactMap { $0["message_id"] as? String }) == [firstID, secondID])
            let failures = (byType["auth.failed"] ?? []).map { ($0["username"] as? String ?? "", $0["client_ip"] as? String ?? "") }
            #expect(Set(failures.map(\.0)) == ["alice", "mallory"] && failures.allSatisfy { $0.1 == "127.0.0.1" })
            #expect(!posts.contains { $0.body.contains("wrong password") || $0.body.contains("guess") }, "no password in any event")
        }
    }

    @Test("cluster mode: two nodes on one PostgreSQL both run senders, and every event is still posted once")
    func clusterSendersPostOnce() async throws {
        try await withPrivatePostgresDatabase { url in
            try await withReceiver { try await runCluster(url: url, $0) }
        }
    }

    private func runCluster(url: String, _ receiver: Receiver) async throws {
        let settings = [
            "SMTP_DATABASE_URL": url, "SMTP_ENABLE_AUTH": "false",
            "SMTP_WEBHOOK_URL": "http://127.0.0.1:\(receiver.port)/", "SMTP_WEBHOOK_SECRET": receiver.secret,
            "SMTP_WEBHOOK_EVENTS": "message.received,message.sent,user.created", "SMTP_LOG_LEVEL": "debug",
        ]
        try await withServer(settings) { h in
            // A second node (delivery role: its own worker and webhook sender) on the same database and spool.
            var environment = h.environment
            environment["SMTP_ROLE"] = "delivery"
            environment["SMTP_HEALTH_PORT"] = "\(try Ports.free())"
            let second = try ChildProcess(
                try ServerHarness.executable("smtp-server"), [], environment: environment, outputDirectory: h.directory, name: "node2")
            try await h.createUser("alice", "alice@example.test", "Alice-Passw0rd!")
            let messages = 12
            for index in 0..<messages {
                let r = try await smtplibSend(
                    h, from: "bob@example.org", to: ["alice@example.test"], body: Array("Subject: n\(index)\r\n\r\nx\r\n".utf8))
                #expect(r.queueID != nil, "\(r.replies)")
            }
            let expected = 2 + 2 * messages  // user.created (admin, alice), then received and sent per message
            let arrived = await poll(timeout: .seconds(60), interval: .milliseconds(200)) { receiver.posts.count >= expected }
            try await Task.sleep(for: .seconds(3))
            second.signal(SIGTERM)
            let secondRun = await second.wait(timeout: .seconds(20))
            let posts = receiver.posts
            #expect(arrived && posts.count == expected, "\(posts.count) of \(expected) posts; node 2:\n\(secondRun.output.suffix(3000))")
            let ids = posts.compactMap(\.id)
            #expect(Set(ids).count == posts.count, "each event exactly once by id")
            #expect(posts.allSatisfy { $0.signature_ok })
            let types = Dictionary(grouping: posts.compactMap(\.type), by: { $0 }).mapValues(\.count)
            #expect(types == ["user.created": 2, "message.received": messages, "message.sent": messages])
            let byNode = [h.log(run: 1), secondRun.stdout].map { $0.components(separatedBy: "webhook delivered").count - 1 }
            #expect(byNode.reduce(0, +) == expected, "posts per node: \(byNode)")
        }
    }

    @Test("an event that fails for good stays visible (smtp-server webhooks) and retry-failed sends it")
    func failedEventsStayVisible() async throws {
        try await withReceiver(status: 503) { try await runFailing($0) }
    }

    private func runFailing(_ receiver: Receiver) async throws {
        try await withServer([
            "SMTP_WEBHOOK_URL": "http://127.0.0.1:\(receiver.port)/", "SMTP_WEBHOOK_SECRET": receiver.secret,
            "SMTP_WEBHOOK_EVENTS": "user.created", "SMTP_WEBHOOK_RETRY_SECONDS": "1", "SMTP_WEBHOOK_MAX_ATTEMPTS": "2",
        ]) { h in
            func webhooks(_ arguments: String...) async throws -> ProcessResult {
                try await runProcess(try ServerHarness.executable("smtp-server"), ["webhooks"] + arguments, environment: h.environment)
            }
            // The first admin's user.created: answered 503 twice, then failed for good.
            let gaveUp = await poll(timeout: .seconds(30), interval: .milliseconds(200)) {
                h.log.contains("webhook event failed for good")
            }
            #expect(gaveUp, "\(h.logTail(20))")
            let posts = receiver.posts
            #expect(posts.count == 2 && posts.allSatisfy { $0.status == 503 && $0.signature_ok } && Set(posts.compactMap(\.id)).count == 1)
            let id = try #require(posts.first?.id)

            let report = try await webhooks()
            #expect(report.status == 0, "\(report.output)")
            let lines = report.stdout.split(separator: "\n").map(String.init)
            #expect(lines.first == "webhook events: 0 waiting, 1 failed, 0 delivered", "\(report.output)")
            #expect(lines.count == 2 && lines[1].hasPrefix("failed: \(id) user.created ") && lines[1].hasSuffix(" attempts=2 HTTP 503"))

            // The receiver is fixed; the operator sends the failed event again.
            await receiver.stop()
            try await receiver.start()
            let retry = try await webhooks("retry-failed")
            #expect(retry.stdout.hasPrefix("made 1 failed webhook event(s) due again\nwebhook events: 1 waiting, 0 failed, 0 delivered\n"), "\(retry.output)")
            let arrived = await poll(timeout: .seconds(30), interval: .milliseconds(200)) { receiver.posts.contains { $0.status == 200 } }
            #expect(arrived)
            #expect(receiver.posts.filter { $0.status == 200 }.compactMap(\.id) == [id])
            let after = await poll(timeout: .seconds(10), interval: .milliseconds(200)) {
                (try? await webhooks())?.stdout == "webhook events: 0 waiting, 0 failed, 1 delivered\n"
            }
            #expect(after)
        }
    }

    @Test("no SMTP_WEBHOOK_URL: no events are written")
    func noURLNoEvents() async throws {
        try await withServer([:]) { h in
            try await h.createUser("dave", "dave@example.test", "Dave-Passw0rd!")
            _ = try await smtplibSend(
                h, from: "dave@example.test", to: ["dave@example.test"], body: Array("Subject: x\r\n\r\ny\r\n".utf8),
                options: SMTPClientOptions(auth: ("PLAIN", "dave", "Dave-Passw0rd!")))
            try await h.waitForMaildirFiles(for: "dave@example.test", count: 1)
            let count = try await runProcess(
                "/usr/bin/env", ["sqlite3", h.directory.appendingPathComponent("smtp.db").path, "SELECT COUNT(*) FROM events"])
            #expect(count.status == 0 && count.stdout == "0\n", "\(count.output)")
        }
    }

    @Test("a bad SMTP_WEBHOOK_EVENTS stops the server at start with one line naming it")
    func badEventsStopTheServer() async throws {
        let result = try await runProcess(
            try ServerHarness.executable("smtp-server"), [],
            environment: cleanEnvironment().merging(["SMTP_WEBHOOK_EVENTS": "message.received,mail.bounced"]) { _, new in new })
        #expect(result.status == 2)
        #expect(result.stderr.hasPrefix("smtp-server: SMTP_WEBHOOK_EVENTS: unknown event"), "\(result.output)")
        #expect(result.stderr.contains(#"got "mail.bounced""#))
    }
}
