// Process lifecycle: durability across kill -9, graceful shutdown, start-up and
// configuration errors, the first admin account, and logging.

import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension SMTPServerTests {

    // MARK: 15. Durability across kill -9

    @Test("durability: every message acknowledged with 250 before kill -9 is delivered exactly once after restart")
    func durabilityAcrossKill9() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            let python = try await Tools.python()
            let sender = try ChildProcess(
                python,
                [try Tools.script("crash_sender.py"), "\(h.smtpPort)", "300", "5", "bob@example.org", "alice@example.test"],
                environment: cleanEnvironment(), outputDirectory: h.directory, name: "crash-sender")
            func acks() -> [String] {
                sender.stdout.split(separator: "\n").filter { $0.hasPrefix("ACK ") }.map { String($0.dropFirst(4)) }
            }

            // Kill once >= 40 messages were acknowledged and delivery has started (or the
            // sender is done, which means delivery is still catching up).
            let reached = await poll(timeout: .seconds(90), interval: .milliseconds(10)) {
                let count = acks().count
                if count >= 40 && (!h.maildirFiles(for: "alice@example.test").isEmpty || !sender.isRunning) { return true }
                return !sender.isRunning
            }
            let ackedAtKill = acks().count
            let deliveredAtKill = h.maildirFiles(for: "alice@example.test").count
            await h.kill9()
            let senderResult = await sender.wait(timeout: .seconds(40))
            try #require(reached && ackedAtKill >= 40, "only \(ackedAtKill) ACKs before the sender stopped:\n\(senderResult.output)\n\(h.logTail())")
            let acked = acks()
            print("durability: \(ackedAtKill) ACKs and \(deliveredAtKill) delivered at SIGKILL, \(acked.count) ACKs in all")
            #expect(!acked.isEmpty)

            try await h.restart()
            // Wait until the mailbox holds at least every ACKed message and is stable for 2 s.
            var last = -1
            var stableSince = ContinuousClock.now
            let settled = await poll(timeout: .seconds(90)) {
                let count = h.maildirFiles(for: "alice@example.test").count
                if count != last {
                    last = count
                    stableSince = ContinuousClock.now
                }
                return count >= acked.count && ContinuousClock.now - stableSince >= .seconds(2)
            }
            let files = h.maildirFiles(for: "alice@example.test")
            #expect(settled, "mailbox holds \(files.count) files for \(acked.count) ACKs\n\(h.logTail())")

            let tokenPattern = try Regex(#"tok[0-9a-f]{6}c[0-9]{2}n[0-9]{4}"#)
            var filesByToken: [String: Set<String>] = [:]
            for file in files {
                let text = String(decoding: try Data(contentsOf: file), as: UTF8.self)
                for match in text.matches(of: tokenPattern) {
                    filesByToken[String(text[match.range]), default: []].insert(file.lastPathComponent)
                }
            }
            let lost = acked.filter { filesByToken[$0] == nil }
            let duplicated = filesByToken.filter { $0.value.count > 1 }
            #expect(lost.isEmpty, "\(lost.count) acknowledged messages lost: \(lost.prefix(10))")
            #expect(duplicated.isEmpty, "messages stored twice: \(duplicated.prefix(10))")
            #expect(files.count == filesByToken.count, "\(files.count) files for \(filesByToken.count) distinct tokens")
        }
    }

    // MARK: 16. Graceful shutdown

    @Test("graceful shutdown: idle session gets 421 4.3.2, a session in DATA finishes its message, exit 0")
    func gracefulShutdown() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            let go = h.directory.appendingPathComponent("go").path
            let shuttingDown = "421 4.3.2 \(SMTP.hostname) Service shutting down"

            var s = SMTPScript()
            s.greeting(conn: "idle")
            s.cmd("EHLO idle.test", SMTP.ehlo(), conn: "idle")
            s.greeting(conn: "data")
            s.cmd("EHLO client.test", SMTP.ehlo(), conn: "data")
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk, conn: "data")
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk, conn: "data")
            s.cmd("DATA", SMTP.startData, conn: "data")
            s.send("Subject: graceful\r\n\r\nfirst half\r\n", conn: "data")
            s.mark("ready")
            s.waitForFile(go)
            s.expect([shuttingDown], conn: "idle", timeout: 15)
            s.expectClosed(conn: "idle")
            s.send("second half\r\n.\r\n", expect: [SMTP.queued, shuttingDown], conn: "data", timeout: 15)
            s.expectClosed(conn: "data")
            let running = try await s.start(port: h.smtpPort)
            try await running.waitForMark("ready")
            h.signal(SIGTERM)
            _ = FileManager.default.createFile(atPath: go, contents: nil)
            let t = try await running.finish(harness: h)
            let exit = await h.waitForExit(timeout: .seconds(30))
            #expect(exit?.timedOut == false, "the server did not exit after SIGTERM")
            #expect(exit?.signalled == false && exit?.status == 0, "exit status \(exit?.status ?? -1)\n\(h.logTail())")

            let id = try #require(t.queueIDs.first)
            // Delivered before the exit, or after a restart.
            if h.maildirFiles(for: "alice@example.test").isEmpty {
                try await h.start()
            }
            let stored = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
            expectStoredMessage(
                stored.bytes, sender: "bob@example.org", helo: "client.test", queueID: id,
                recipient: "alice@example.test", body: crlf("Subject: graceful", "", "first half", "second half"))
        }
    }

    // MARK: 17. Start-up

    static let documentedVariables = [
        "SMTP_PORT", "SMTP_HOST", "SMTP_MAX_CONNECTIONS", "SMTP_MAX_MESSAGE_SIZE", "SMTP_TIMEOUT_SECONDS",
        "SMTP_HOSTNAME", "SMTP_DB_PATH", "SMTP_STORAGE_TYPE", "SMTP_STORAGE_PATH", "SMTP_ENABLE_TLS",
        "SMTP_TLS_CERT", "SMTP_TLS_KEY", "SMTP_ENABLE_AUTH", "SMTP_HEALTH_PORT", "SMTP_METRICS_PORT",
        "SMTP_LOG_LEVEL", "SMTP_ENABLE_SPAMASSASSIN", "SMTP_SPAMASSASSIN_HOST", "SMTP_SPAMASSASSIN_PORT",
        "SMTP_ENABLE_CLAMAV", "SMTP_CLAMAV_HOST", "SMTP_CLAMAV_PORT",
    ]

    @Test("start-up: --help lists every documented variable; a bad SMTP_PORT exits 2 with one stderr line")
    func startupHelpAndBadConfiguration() async throws {
        let harness = try ServerHarness()
        defer { try? FileManager.default.removeItem(at: harness.directory) }
        let exe = try ServerHarness.executable("smtp-server")

        let help = try await runProcess(exe, ["--help"], environment: harness.environment, timeout: .seconds(30))
        #expect(help.status == 0 && !help.signalled, "--help exited \(help.status):\n\(help.output)")
        let helpText = help.stdout + help.stderr
        for variable in Self.documentedVariables {
            #expect(helpText.contains(variable), "--help does not list \(variable)")
        }

        var env = harness.environment
        env["SMTP_PORT"] = "abc"
        let bad = try await runProcess(exe, [], environment: env, timeout: .seconds(30))
        #expect(bad.status == 2 && !bad.signalled && !bad.timedOut, "SMTP_PORT=abc: exit \(bad.status)\n\(bad.output)")
        let lines = bad.stderr.split(separator: "\n", omittingEmptySubsequences: true)
        #expect(lines.count == 1, "expected exactly one stderr line, got:\n\(bad.stderr)")
        #expect(lines.first?.contains("SMTP_PORT") == true, "stderr does not name SMTP_PORT:\n\(bad.stderr)")
    }

    @Test("start-up: without SMTP_ADMIN_PASSWORD the first start creates 'admin' and prints its password once")
    func firstAdminPassword() async throws {
        try await withServer(unset: ["SMTP_ADMIN_PASSWORD"]) { h in
            let prefix = "Created admin user 'admin' with password: "
            var password: String?
            _ = await poll(timeout: .seconds(10)) {
                let lines = h.log(run: 1).split(separator: "\n").filter { $0.contains(prefix) }
                if let line = lines.first, let range = line.range(of: prefix) {
                    password = line[range.upperBound...].trimmingCharacters(in: .whitespacesAndNewlines)
                }
                return password != nil
            }
            let pw = try #require(password, "no \"\(prefix)<pw>\" line in the log:\n\(h.log)")
            #expect(!pw.isEmpty)
            let verify = try await h.userCLI(["verify", "admin", pw])
            #expect(verify.status == 0, "user-cli verify admin <printed password> failed:\n\(verify.output)")

            try await h.restart()
            await h.stop()
            #expect(h.log(run: 1).components(separatedBy: prefix).count - 1 == 1, "printed more than once in the first run")
            #expect(!h.log(run: 2).contains("Created admin user"), "the restart printed it again:\n\(h.log(run: 2))")
        }
    }

    // MARK: 18. Logging

    @Test("logging: the accepted message's queue id and the client IP on one line; the rejected one logged with the IP")
    func logging() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", "alice@example.test", alicePassword)
            var s = SMTPScript()
            s.greeting()
            s.cmd("EHLO client.test", SMTP.ehlo())
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: logged\r\n\r\naccepted\r\n.\r\n", expect: [SMTP.queued])
            s.cmd("MAIL FROM:<bob@example.org>", SMTP.senderOk)
            s.cmd("RCPT TO:<alice@example.test>", SMTP.recipientOk)
            s.cmd("DATA", SMTP.startData)
            s.send("Subject: rejected\r\n\r\nbare\nLF\r\n.\r\n", expect: ["554 5.6.0 Message contains bare CR or LF, lines must end with CRLF"])
            s.cmd("QUIT", SMTP.bye)
            let t = try await s.run(h)
            let id = try #require(t.queueIDs.first)
            _ = try await h.waitForStoredMessage(for: "alice@example.test", containing: id)
            await h.stop()

            let lines = h.log.split(separator: "\n").map(String.init)
            let accepted = lines.filter { $0.contains(id) && $0.contains("127.0.0.1") }
            #expect(accepted.count == 1, "lines with \(id) and 127.0.0.1: \(accepted)\n\(h.logTail())")
            let rejected = lines.filter { line in
                line.contains("127.0.0.1") && !line.contains(id)
                    && ["554", "5.6.0", "reject", "Reject", "refused", "bare"].contains { line.contains($0) }
            }
            #expect(!rejected.isEmpty, "no log line with 127.0.0.1 for the rejected message\n\(h.logTail())")
        }
    }
}
