// Black-box tests of delivery workers: `smtp-server` processes with SMTP_ROLE=delivery sharing one
// queue on the test PostgreSQL (a database of their own per test), one spool directory and one
// maildir root. Two workers share 1000 messages; a worker killed with SIGKILL, one paused with
// SIGSTOP past its lease, one stopped with SIGTERM. No project module is imported: psql reads the
// queue, the maildir files and the workers' logs say what was delivered.
//
// Every message has one extra recipient, keep@example.test, whose row is already `failed`: the
// message is never finished, so the rows of the delivered recipients stay, and their `attempts`
// show how many results were recorded for each (exactly one: a stale worker's result is fenced).

import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("Delivery workers: claiming, leases, fencing, shutdown", .serialized, .timeLimit(.minutes(4)))
struct DeliveryWorkerTests {
    @Test("two workers on 1000 messages (1250 recipients): every recipient delivered exactly once, both worked, leases mirrored in Redis and released")
    func twoWorkers() async throws {
        guard let redis = try serviceVariables(["MAILTIER_TEST_REDIS_URL"])?["MAILTIER_TEST_REDIS_URL"] else { return }
        try await withWorkerQueue { q in
            let first = try q.startWorker("first", ["SMTP_REDIS_URL": redis])
            let second = try q.startWorker("second", ["SMTP_REDIS_URL": redis])
            try await q.waitUntilStarted([first, second])
            let expected = try await q.enqueue(count: 1000)
            let done = await q.waitUntilDelivered(expected, timeout: .seconds(150))
            let logs = [await q.stop(first), await q.stop(second)]
            #expect(done, "not everything delivered within 150 s:\n\(q.tails(logs))")
            try await q.verify(expected, logs: logs)
            let stored = logs.map { Delivered(log: $0.stdout) }
            #expect(stored.allSatisfy { $0.stored > 0 }, "a worker delivered nothing: \(stored.map(\.stored))")
            #expect(stored.map(\.stored).reduce(0, +) == expected.total, "delivered log lines: \(stored.map(\.stored))")
            #expect(stored.map(\.suppressed).reduce(0, +) == 0, "duplicates in normal operation: \(stored.map(\.suppressed))")
            #expect(logs.allSatisfy { $0.status == 0 && !$0.timedOut }, "\(q.tails(logs))")
            let left = try await redisKeys(redis, "mailtier:lease:job:msg_\(q.tag)*")
            #expect(left.isEmpty, "Redis leases left after recording: \(left.prefix(5))")
        }
    }

    @Test("a worker killed with SIGKILL mid-batch: its leased jobs are delivered by another after the lease (10 s) expires, none lost, none twice")
    func killedWorker() async throws {
        try await withWorkerQueue { q in
            let doomed = try q.startWorker("doomed")
            try await q.waitUntilStarted([doomed])
            let expected = try await q.enqueue(count: 400)
            try await q.waitForMaildirFiles(atLeast: 60, log: doomed)
            doomed.signal(SIGKILL)
            let killed = await doomed.wait(timeout: .seconds(10))
            #expect(killed.signalled, "\(killed.output)")
            let leased = try await q.leasedRows()
            #expect(!leased.isEmpty, "the killed worker held no lease (not killed mid-batch)")

            let survivor = try q.startWorker("survivor")
            let done = await q.waitUntilDelivered(expected, timeout: .seconds(120))
            let log = await q.stop(survivor)
            #expect(done, "not everything delivered within 120 s:\n\(q.tails([killed, log]))")
            try await q.verify(expected, logs: [killed, log])
            let counts = [Delivered(log: killed.stdout), Delivered(log: log.stdout)]
            // A job stored by the killed worker but not recorded is delivered again with the same
            // delivery key: the maildir suppresses the copy (counted here, and checked above).
            #expect(counts[1].stored + counts[1].suppressed > 0)
            #expect(counts.map(\.stored).reduce(0, +) <= expected.total, "stored: \(counts.map(\.stored)), suppressed: \(counts.map(\.suppressed))")
        }
    }

    @Test("a worker paused (SIGSTOP) past its lease and resumed (SIGCONT) cannot record over the newer attempt")
    func pausedWorker() async throws {
        guard let redis = try serviceVariables(["MAILTIER_TEST_REDIS_URL"])?["MAILTIER_TEST_REDIS_URL"] else { return }
        try await withWorkerQueue { q in
            let paused = try q.startWorker("paused", ["SMTP_REDIS_URL": redis])
            try await q.waitUntilStarted([paused])
            let expected = try await q.enqueue(count: 400)
            try await q.waitForMaildirFiles(atLeast: 60, log: paused)
            paused.signal(SIGSTOP)
            // Every lease now is the paused worker's (it is the only one).
            let held = try await q.leasedRows()
            try #require(!held.isEmpty, "the paused worker held no lease")

            let newer = try q.startWorker("newer", ["SMTP_REDIS_URL": redis])
            // Generous: the full suite on 2 busy cores; the paused worker's rows may also stay
            // locked until PostgreSQL ends its idle transaction (15 s).
            let done = await q.waitUntilDelivered(expected, timeout: .seconds(180))
            if !done {
                let rows = (try? await psqlRows(
                    q.url,
                    "SELECT json_build_object('id', id, 'status', status, 'attempts', attempts, 'lease', lease_token, 'until', lease_until, 'next', next_retry, 'now', extract(epoch from now())::bigint) FROM queue_recipients WHERE status <> 'delivered' ORDER BY id LIMIT 10"
                )) ?? []
                let sessions = (try? await psqlRows(
                    q.url,
                    "SELECT json_build_object('pid', pid, 'state', state, 'wait', wait_event_type || '/' || wait_event, 'query', left(query, 120)) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )) ?? []
                Issue.record("undelivered rows: \(rows.map(\.values))\nsessions: \(sessions.map(\.values))")
            }
            #expect(done, "the newer worker did not deliver everything (the paused worker's jobs after its lease) within 180 s; the newer worker's log:\n\(newer.stdout.suffix(6000))")
            paused.signal(SIGCONT)
            // The resumed worker finishes its batch and tries to record it: refused, one line per
            // job. (Paused inside its recording transaction instead, it held row locks until
            // PostgreSQL ended its session — idle_in_transaction_session_timeout — rolling it
            // back: it then logs the lost connection and has recorded nothing either.)
            let fenced = "result not recorded: the lease was lost"
            let answered = await poll(timeout: .seconds(30), interval: .milliseconds(200)) {
                Self.lines(paused.stdout, containing: fenced).count >= held.count
                    || !Self.lines(paused.stdout, containing: "delivery loop error").isEmpty
            }
            let logs = [await q.stop(paused), await q.stop(newer)]
            let refused = Self.lines(logs[0].stdout, containing: fenced).count
            let cut = Self.lines(logs[0].stdout, containing: "delivery loop error").count
            #expect(answered && (refused == held.count || (refused < held.count && cut > 0)),
                    "held \(held.count), fenced \(refused), transaction errors \(cut):\n\(q.tails(logs))")
            // The rows it held show the newer attempt's result only: delivered once, one attempt.
            for row in held {
                let now = try await psqlRows(
                    q.url, "SELECT json_build_object('status', status, 'attempts', attempts, 'lease', lease_token) FROM queue_recipients WHERE id = \(row)")
                #expect(now.first?.text("status") == "delivered" && now.first?.int("attempts") == 1 && now.first?.isNull("lease") == true,
                        "row \(row): \(now.first?.values ?? [:])")
            }
            try await q.verify(expected, logs: logs)
        }
    }

    @Test("SIGTERM: the worker stops claiming, finishes its batch, exits 0 and leaves no lease: another worker delivers the rest at once (lease 300 s)")
    func gracefulShutdown() async throws {
        try await withWorkerQueue { q in
            let stopping = try q.startWorker("stopping", ["SMTP_LEASE_SECONDS": "300", "SMTP_SHUTDOWN_GRACE_SECONDS": "20"])
            try await q.waitUntilStarted([stopping])
            let expected = try await q.enqueue(count: 400)
            try await q.waitForMaildirFiles(atLeast: 60, log: stopping)
            let asked = ContinuousClock.now
            stopping.signal(SIGTERM)
            let stopped = await stopping.wait(timeout: .seconds(40))
            #expect(stopped.status == 0 && !stopped.timedOut && !stopped.signalled, "\(stopped.output)")
            #expect(ContinuousClock.now - asked < .seconds(35), "stopping took \(ContinuousClock.now - asked)")
            #expect(stopped.stdout.contains("delivery stopped"), "\(stopped.output)")
            #expect(try await q.leasedRows().isEmpty, "the stopped worker left leases behind")
            #expect(try await q.undelivered(expected) > 0, "the worker delivered everything before the test could stop it")

            // With a 300 s lease, only released leases let the next worker finish within the bound.
            let next = try q.startWorker("next", ["SMTP_LEASE_SECONDS": "300"])
            let done = await q.waitUntilDelivered(expected, timeout: .seconds(120))
            let log = await q.stop(next)
            #expect(done, "not everything delivered within 120 s:\n\(q.tails([stopped, log]))")
            try await q.verify(expected, logs: [stopped, log])
        }
    }

    @Test("SIGTERM while a remote peer is slow: past SMTP_SHUTDOWN_GRACE_SECONDS the delivery is cut, its lease released, the attempt not counted")
    func shutdownGraceCutsSlowDelivery() async throws {
        let peer = try await SMTPPeer(arguments: ["--delay", "60"])
        do {
            try await cutSlowDelivery(peer)
        } catch {
            await peer.stop()
            throw error
        }
        await peer.stop()
    }

    private func cutSlowDelivery(_ peer: SMTPPeer) async throws {
        try await withWorkerQueue { q in
            let worker = try q.startWorker(
                "cut", ["SMTP_LEASE_SECONDS": "300", "SMTP_SHUTDOWN_GRACE_SECONDS": "2", "SMTP_RELAY_HOST": "127.0.0.1:\(peer.port)"])
            try await q.waitUntilStarted([worker])
            try await q.enqueueRemote("carol@remote.test")
            // The worker is in the middle of the SMTP transaction (the peer sits 60 s on MAIL).
            let connected = await poll(timeout: .seconds(60), interval: .milliseconds(100)) { peer.connectionCount > 0 }
            try #require(connected, "the worker never connected to the peer:\n\(worker.stdout.suffix(3000))")
            try await Task.sleep(for: .seconds(1))
            try #require(try await q.leasedRows().count == 1)
            let asked = ContinuousClock.now
            worker.signal(SIGTERM)
            let stopped = await worker.wait(timeout: .seconds(40))
            let took = ContinuousClock.now - asked
            #expect(stopped.status == 0 && !stopped.timedOut, "\(stopped.output)")
            #expect(took < .seconds(30), "stopping took \(took) with a grace of 2 s and a peer that answers after 60 s")
            #expect(stopped.stdout.contains("shutdown grace over, cutting deliveries in flight"), "\(stopped.output)")
            #expect(stopped.stdout.contains("released the leases of unfinished deliveries"), "\(stopped.output)")
            let row = try await psqlRows(
                q.url, "SELECT json_build_object('status', status, 'attempts', attempts, 'lease', lease_token) FROM queue_recipients")
            #expect(row.count == 1 && row.first?.text("status") == "pending" && row.first?.int("attempts") == 0
                    && row.first?.isNull("lease") == true, "\(row.map(\.values))")
            #expect(peer.messages().isEmpty)
        }
    }

    @Test("a delivery that outlasts its lease (a peer taking 3 × 6 s, lease 10 s) keeps it by renewal: the second worker never takes it, the peer gets it once")
    func leaseRenewedDuringSlowDelivery() async throws {
        let peer = try await SMTPPeer(arguments: ["--delay", "6"])
        do {
            try await renewDuringSlowDelivery(peer)
        } catch {
            await peer.stop()
            throw error
        }
        await peer.stop()
    }

    private func renewDuringSlowDelivery(_ peer: SMTPPeer) async throws {
        try await withWorkerQueue { q in
            let relay = ["SMTP_RELAY_HOST": "127.0.0.1:\(peer.port)", "SMTP_LEASE_SECONDS": "10"]
            let first = try q.startWorker("slow-first", relay)
            try await q.waitUntilStarted([first])
            let id = try await q.enqueueRemote("carol@remote.test")
            let connected = await poll(timeout: .seconds(60), interval: .milliseconds(100)) { peer.connectionCount > 0 }
            try #require(connected, "the worker never connected to the peer:\n\(first.stdout.suffix(3000))")
            // A second worker polls every second while the first one's delivery runs past its lease.
            let second = try q.startWorker("slow-second", relay)
            try await q.waitUntilStarted([second])
            // Delivered, the message leaves the queue.
            let delivered = await poll(timeout: .seconds(90), interval: .milliseconds(200)) {
                (try? await psqlRows(q.url, "SELECT json_build_object('n', COUNT(*)) FROM queue_messages"))?.first?.int("n") == 0
            }
            try await Task.sleep(for: .seconds(3))
            let logs = [await q.stop(first), await q.stop(second)]
            #expect(delivered, "not delivered within 90 s:\n\(q.tails(logs))")
            #expect(peer.messages().count == 1, "the peer got \(peer.messages().count) copies:\n\(q.tails(logs))")
            #expect(Self.lines(logs[1].stdout, containing: id).isEmpty, "the second worker touched the job:\n\(logs[1].stdout.suffix(3000))")
            #expect(Self.lines(logs[0].stdout, containing: "lease lost").isEmpty, "\(logs[0].stdout.suffix(3000))")
            #expect(try await q.leasedRows().isEmpty)
        }
    }

    static func lines(_ log: String, containing needle: String) -> [Substring] {
        log.split(separator: "\n").filter { $0.contains(needle) }
    }
}

// MARK: - Helpers

/// The `delivered` lines of a worker's log: stored in a maildir, or a repeated delivery that the
/// maildir suppressed (same delivery key).
extension [String: Set<String>] {
    /// Deliveries expected in all.
    var total: Int { values.reduce(0) { $0 + $1.count } }
}

private struct Delivered {
    var stored = 0
    var suppressed = 0

    init(log: String) {
        for line in log.split(separator: "\n") where line.hasSuffix("] delivered") {
            if line.contains("duplicate_suppressed=true") { suppressed += 1 } else { stored += 1 }
        }
    }
}

/// One test's queue: a PostgreSQL database of its own (migrated), a directory with the shared
/// spool and maildir root, and a tag that makes its message ids unique.
private struct WorkerQueue {
    let url: String
    let directory: URL
    let tag = "w" + uniqueSuffix()

    var spool: URL { directory.appendingPathComponent("spool") }
    var mail: URL { directory.appendingPathComponent("mail") }

    func startWorker(_ name: String, _ overrides: [String: String] = [:]) throws -> ChildProcess {
        var environment = cleanEnvironment()
        environment.merge([
            "SMTP_ROLE": "delivery", "SMTP_DATABASE_URL": url, "SMTP_HOST": "127.0.0.1", "SMTP_HOSTNAME": "mail.example.test",
            "SMTP_PORT": "\(try Ports.free())", "SMTP_HEALTH_PORT": "\(try Ports.free())", "SMTP_METRICS_PORT": "\(try Ports.free())",
            "SMTP_SPOOL_PATH": spool.path, "SMTP_STORAGE_PATH": mail.path,
            "SMTP_DB_PATH": directory.appendingPathComponent("\(name).db").path, "SMTP_LOCAL_DOMAINS": "example.test",
            "SMTP_QUEUE_POLL_SECONDS": "1", "SMTP_LOG_LEVEL": "info", "SMTP_LEASE_SECONDS": "10",
            "SMTP_ADMIN_PASSWORD": "Adm1n-Passw0rd!",
            // Events are written only for a webhook: message.sent rows show how many results were
            // recorded. Nobody listens on port 9; the posts fail and are retried, which is harmless here.
            "SMTP_WEBHOOK_URL": "http://127.0.0.1:9/", "SMTP_WEBHOOK_EVENTS": "message.sent,message.failed",
        ]) { _, new in new }
        environment.merge(overrides) { _, new in new }
        return try ChildProcess(try ServerHarness.executable("smtp-server"), [], environment: environment, outputDirectory: directory, name: name)
    }

    func waitUntilStarted(_ workers: [ChildProcess]) async throws {
        for worker in workers {
            let started = await poll(timeout: .seconds(60), interval: .milliseconds(100)) {
                worker.stdout.contains("delivery started") || !worker.isRunning
            }
            guard started && worker.isRunning else { throw HarnessError("a worker did not start:\n\(worker.stdout)\n\(worker.stderr)") }
        }
    }

    /// Writes `count` blobs and queues them: message n goes to user<n % 10>, every fourth also to
    /// all@example.test, and every one to keep@example.test (already failed). Returns the
    /// expected deliveries: mailbox → the X-Seq values it must hold once each.
    func enqueue(count: Int) async throws -> [String: Set<String>] {
        var expected: [String: Set<String>] = [:]
        for n in 1...count {
            let seq = "\(tag)-\(n)"
            let to = "user\(n % 10)@example.test"
            let body = "From: bob@example.org\r\nTo: \(to)\r\nSubject: load \(n)\r\nX-Seq: \(seq)\r\n\r\nbody \(n)\r\n"
            try Data(body.utf8).write(to: spool.appendingPathComponent("msg_\(tag)_\(n)"))
            expected[to, default: []].insert(seq)
            if n % 4 == 0 { expected["all@example.test", default: []].insert(seq) }
        }
        let now = Int(Date().timeIntervalSince1970)
        let id = "'msg_\(tag)_' || g"
        func recipients(_ address: String, status: String, where condition: String = "true") -> String {
            """
            SELECT \(id), \(address), 'example.test', true, '\(status)', 0, 5, \(now)
            FROM generate_series(1, \(count)) g WHERE \(condition)
            """
        }
        _ = try await psqlRows(
            url,
            """
            INSERT INTO queue_messages (id, blob_key, sha256, size_bytes, mail_from, subject, created_at)
            SELECT \(id), \(id), repeat('0', 64), 100, 'bob@example.org', 'load ' || g, \(now) FROM generate_series(1, \(count)) g;
            INSERT INTO queue_recipients (message_id, recipient, domain, is_local, status, attempts, max_attempts, next_retry)
            \(recipients("'user' || (g % 10) || '@example.test'", status: "pending"))
            UNION ALL \(recipients("'all@example.test'", status: "pending", where: "g % 4 = 0"))
            UNION ALL \(recipients("'keep@example.test'", status: "failed"));
            """)
        return expected
    }

    /// Queues one message from `<>` (no bounce) to a remote `recipient`; returns its id.
    @discardableResult
    func enqueueRemote(_ recipient: String) async throws -> String {
        let id = "msg_\(tag)_remote"
        try Data("Subject: slow\r\n\r\nbody\r\n".utf8).write(to: spool.appendingPathComponent(id))
        let now = Int(Date().timeIntervalSince1970)
        let domain = recipient.split(separator: "@").last.map(String.init) ?? ""
        _ = try await psqlRows(
            url,
            """
            INSERT INTO queue_messages (id, blob_key, sha256, size_bytes, mail_from, subject, created_at)
            VALUES ('\(id)', '\(id)', repeat('0', 64), 24, '', 'slow', \(now));
            INSERT INTO queue_recipients (message_id, recipient, domain, is_local, status, attempts, max_attempts, next_retry)
            VALUES ('\(id)', '\(recipient)', '\(domain)', false, 'pending', 0, 5, \(now));
            """)
        return id
    }

    /// Recipients of `expected` not delivered yet.
    func undelivered(_ expected: [String: Set<String>]) async throws -> Int {
        try await psqlRows(
            url,
            "SELECT json_build_object('n', COUNT(*)) FROM queue_recipients WHERE status <> 'delivered' AND recipient <> 'keep@example.test'"
        ).first?.int("n") ?? -1
    }

    func waitUntilDelivered(_ expected: [String: Set<String>], timeout: Duration) async -> Bool {
        await poll(timeout: timeout, interval: .milliseconds(500)) { (try? await undelivered(expected)) == 0 }
    }

    /// Ids of the rows with a lease.
    func leasedRows() async throws -> [Int] {
        try await psqlRows(url, "SELECT json_build_object('id', id) FROM queue_recipients WHERE lease_token IS NOT NULL")
            .compactMap { $0.int("id") }
    }

    func maildirFileCount() -> Int {
        let boxes = (try? FileManager.default.contentsOfDirectory(atPath: mail.path)) ?? []
        return boxes.reduce(0) { total, box in
            total + ["new", "cur"].reduce(0) {
                $0 + ((try? FileManager.default.contentsOfDirectory(atPath: mail.appendingPathComponent(box).appendingPathComponent($1).path))?
                    .filter { !$0.hasPrefix(".") }.count ?? 0)
            }
        }
    }

    func waitForMaildirFiles(atLeast count: Int, log worker: ChildProcess) async throws {
        let ok = await poll(timeout: .seconds(60), interval: .milliseconds(20)) { maildirFileCount() >= count }
        guard ok else { throw HarnessError("fewer than \(count) deliveries within 60 s:\n\(worker.stdout.suffix(3000))") }
    }

    /// SIGTERM and the exit.
    func stop(_ worker: ChildProcess) async -> ProcessResult {
        worker.signal(SIGTERM)
        return await worker.wait(timeout: .seconds(40))
    }

    func tails(_ logs: [ProcessResult]) -> String {
        logs.map { String($0.output.suffix(2500)) }.joined(separator: "\n-----\n")
    }

    /// Every expected (mailbox, X-Seq) is in the maildir exactly once (duplicates are reported by
    /// mailbox); every recipient row is delivered with exactly one attempt recorded and no lease;
    /// the `message.sent` events name each recipient once.
    func verify(_ expected: [String: Set<String>], logs: [ProcessResult], sourceLocation: SourceLocation = #_sourceLocation) async throws {
        var duplicates: [String: Int] = [:]
        for (mailbox, seqs) in expected.sorted(by: { $0.key < $1.key }) {
            var found: [String] = []
            for sub in ["new", "cur"] {
                let folder = mail.appendingPathComponent(mailbox).appendingPathComponent(sub)
                for name in (try? FileManager.default.contentsOfDirectory(atPath: folder.path)) ?? [] where !name.hasPrefix(".") {
                    let text = (try? String(contentsOf: folder.appendingPathComponent(name), encoding: .utf8)) ?? ""
                    if let line = text.split(separator: "\r\n").first(where: { $0.hasPrefix("X-Seq: ") }) {
                        found.append(String(line.dropFirst("X-Seq: ".count)))
                    }
                }
            }
            let unique = Set(found)
            if found.count != unique.count { duplicates[mailbox] = found.count - unique.count }
            #expect(unique == seqs, "\(mailbox): \(seqs.subtracting(unique).count) missing, \(unique.subtracting(seqs).count) unexpected",
                    sourceLocation: sourceLocation)
        }
        #expect(duplicates.isEmpty, "duplicate deliveries by mailbox: \(duplicates)", sourceLocation: sourceLocation)
        let total = expected.total
        let rows = try await psqlRows(
            url,
            """
            SELECT json_build_object('status', status, 'attempts', attempts, 'leased', lease_token IS NOT NULL, 'n', COUNT(*))
            FROM queue_recipients WHERE recipient <> 'keep@example.test' GROUP BY status, attempts, lease_token IS NOT NULL
            """)
        #expect(rows.count == 1 && rows.first?.text("status") == "delivered" && rows.first?.int("attempts") == 1
                && rows.first?.int("n") == total && rows.first?.values["leased"] as? Bool == false,
                "recipient rows: \(rows.map(\.values))\n\(tails(logs))", sourceLocation: sourceLocation)
        let named = try await psqlRows(
            url,
            """
            SELECT json_build_object('n', COUNT(*), 'distinct', COUNT(DISTINCT (message_id, recipient)))
            FROM (SELECT payload::json->'data'->>'message_id' AS message_id, json_array_elements_text(payload::json->'data'->'to') AS recipient
                  FROM events WHERE type = 'message.sent') AS sent
            """)
        #expect(named.first?.int("n") == total && named.first?.int("distinct") == total,
                "message.sent events: \(named.first?.values ?? [:]), expected \(total)", sourceLocation: sourceLocation)
    }
}

/// A queue for one test, dropped afterwards (with its directory).
private func withWorkerQueue(_ body: (WorkerQueue) async throws -> Void) async throws {
    try await withPrivatePostgresDatabase { url in
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-workers-\(uniqueSuffix())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        var environment = cleanEnvironment()
        environment["SMTP_DATABASE_URL"] = url
        let migrated = try await runProcess(try ServerHarness.executable("smtp-server"), ["migrate"], environment: environment)
        guard migrated.status == 0 else { throw HarnessError("smtp-server migrate: \(migrated.output)") }
        let queue = WorkerQueue(url: url, directory: directory)
        for folder in [queue.spool, queue.mail] {
            try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true, attributes: [.posixPermissions: 0o700])
        }
        try await body(queue)
    }
}

/// Keys of the test Redis matching `pattern`.
private func redisKeys(_ url: String, _ pattern: String) async throws -> [String] {
    let result = try await runProcess(try Tools.path("redis-cli"), ["-u", url, "--scan", "--pattern", pattern], environment: cleanEnvironment())
    guard result.status == 0 else { throw HarnessError("redis-cli: \(result.output)") }
    return result.stdout.split(separator: "\n").map(String.init)
}
