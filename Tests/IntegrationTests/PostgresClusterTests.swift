// Black-box tests of cluster mode's database: with SMTP_DATABASE_URL, the real `smtp-server` and
// `user-cli` keep users, the queue and the messages in PostgreSQL and open no SQLite file;
// `smtp-server migrate`; and a server whose PostgreSQL cannot be reached. No project module is
// imported; psql reads PostgreSQL, Support/storage_probe.py the S3 bucket.
//
// Each test has a database of its own on the test PostgreSQL (`scripts/test-services.sh
// start`), dropped at the end. Without the services these tests are skipped with a note, unless
// MAILTIER_REQUIRE_SERVICES=1: then they fail.

import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#endif

@Suite("PostgreSQL cluster mode, black box", .timeLimit(.minutes(3)))
struct PostgresClusterTests {
    static let alice = "alice@example.test"
    static let sender = "bob@example.org"

    // MARK: smtp-server migrate

    @Test("smtp-server migrate: applies the versions once (also when two run at once), then says the schema is current")
    func migratePostgres() async throws {
        try await withPrivatePostgresDatabase { url in
            let first = try await migrate(["SMTP_DATABASE_URL": url])
            #expect(first.status == 0 && first.stdout == "PostgreSQL: applied migrations 1, 2 (schema version 2)\n", "\(first.output)")
            let again = try await migrate(["SMTP_DATABASE_URL": url])
            #expect(again.status == 0 && again.stdout == "PostgreSQL: schema is current (version 2)\n", "\(again.output)")
            let versions = try await psqlRows(url, "SELECT json_agg(json_build_object('v', version) ORDER BY version) FROM schema_migrations")
            #expect(versions.compactMap { $0.int("v") } == [1, 2])
        }
        try await withPrivatePostgresDatabase { url in
            async let one = migrate(["SMTP_DATABASE_URL": url])
            async let two = migrate(["SMTP_DATABASE_URL": url])
            let outputs = try await [one, two]
            #expect(outputs.allSatisfy { $0.status == 0 }, "\(outputs.map(\.output))")
            #expect(
                outputs.map(\.stdout).sorted()
                    == ["PostgreSQL: applied migrations 1, 2 (schema version 2)\n", "PostgreSQL: schema is current (version 2)\n"],
                "two migrators at once: \(outputs.map(\.output))")
        }
    }

    @Test("smtp-server migrate on SQLite (no SMTP_DATABASE_URL): creates and migrates SMTP_DB_PATH, once")
    func migrateSQLite() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-migrate-\(uniqueSuffix())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let path = directory.appendingPathComponent("smtp.db").path
        let first = try await migrate(["SMTP_DB_PATH": path])
        #expect(first.status == 0 && first.stdout == "SQLite \(path): applied migrations 1, 2, 3, 4 (schema version 4)\n", "\(first.output)")
        let again = try await migrate(["SMTP_DB_PATH": path])
        #expect(again.status == 0 && again.stdout == "SQLite \(path): schema is current (version 4)\n", "\(again.output)")
        let tables = try await probeJSON(["sqlite", path, "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'events'"])
        #expect((tables as? [[String: Any]])?.count == 1, "no events table: \(tables)")
    }

    @Test("smtp-server migrate with PostgreSQL unreachable: exit 1 within the bound, one line naming the variable, no password; --help mentions migrate")
    func migrateUnreachable() async throws {
        let url = "postgres://mailtier:Sup3r-Secret-Pw@127.0.0.1:\(try Ports.free())/mail"
        let started = ContinuousClock.now
        let result = try await migrate(["SMTP_DATABASE_URL": url])
        let took = ContinuousClock.now - started
        #expect(result.status == 1 && !result.timedOut, "\(result.output)")
        #expect(took < .seconds(15), "migrate took \(took)")
        let lines = result.stderr.split(separator: "\n").map(String.init)
        #expect(lines.count == 1, "\(result.output)")
        #expect(
            lines.first?.hasPrefix("smtp-server: SMTP_DATABASE_URL: cannot migrate PostgreSQL: no connection to PostgreSQL within 3 s") == true,
            "\(result.output)")
        #expect(!result.output.contains("Sup3r-Secret-Pw"), "the password was shown: \(result.output)")

        let help = try await runProcess(try ServerHarness.executable("smtp-server"), ["--help"], environment: cleanEnvironment())
        #expect(help.status == 0 && help.stdout.contains("Usage: smtp-server [migrate | webhooks [retry-failed] | --help]") && help.stdout.contains("smtp-server migrate"))
        let unknown = try await runProcess(try ServerHarness.executable("smtp-server"), ["migrate", "now"], environment: cleanEnvironment())
        #expect(unknown.status == 2 && unknown.stderr.contains("unknown argument migrate"), "\(unknown.output)")
    }

    // MARK: user-cli

    @Test("user-cli against PostgreSQL: create, duplicates, list, verify, update-password, set-quota, info, delete; no SQLite file")
    func userCLIRoundTrip() async throws {
        try await withPrivatePostgresDatabase { url in
            let directory = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-cli-pg-\(uniqueSuffix())")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(at: directory) }
            let sqlitePath = directory.appendingPathComponent("smtp.db").path
            var environment = cleanEnvironment()
            environment["SMTP_DATABASE_URL"] = url
            environment["SMTP_DB_PATH"] = sqlitePath
            environment["SMTP_STORAGE_PATH"] = directory.appendingPathComponent("mail").path
            let cli = try ServerHarness.executable("user-cli")
            func run(_ arguments: String...) async throws -> ProcessResult {
                try await runProcess(cli, arguments, environment: environment)
            }
            func expectOK(_ result: ProcessResult, _ stdout: String, sourceLocation: SourceLocation = #_sourceLocation) {
                #expect(result.status == 0 && result.stdout == stdout && result.stderr.isEmpty, "\(result.output)", sourceLocation: sourceLocation)
            }
            func expectError(_ result: ProcessResult, _ message: String, sourceLocation: SourceLocation = #_sourceLocation) {
                #expect(result.status == 1 && result.stdout.isEmpty && result.stderr == "user-cli: \(message)\n", "\(result.output)", sourceLocation: sourceLocation)
            }

            expectOK(try await run("list"), "Users:\nTotal: 0\n")
            expectOK(try await run("create", "john", "john@example.com", "MyP@ssw0rd"), "User created successfully:\n  Username: john\n  Email: john@example.com\n  ID: 1\n")
            expectOK(try await run("create", "jane", "jane@example.com", "SecureP@ssw0rd"), "User created successfully:\n  Username: jane\n  Email: jane@example.com\n  ID: 2\n")
            expectError(try await run("create", "john", "other@example.com", "MyP@ssw0rd"), "username already exists")
            expectError(try await run("create", "johnny", "JOHN@Example.COM", "MyP@ssw0rd"), "email address already in use")
            let list = try await run("list")
            #expect(list.status == 0 && list.stdout.hasPrefix("Users:\n  1. john (john@example.com) - Created: ") && list.stdout.contains("\n  2. jane (jane@example.com) - Created: ") && list.stdout.hasSuffix("\nTotal: 2\n"), "\(list.output)")
            expectOK(try await run("verify", "john", "MyP@ssw0rd"), "Authentication successful for user: john\n")
            expectOK(try await run("update-password", "john", "NewP@ssw0rd1"), "Password updated successfully for user: john\n")
            expectError(try await run("verify", "john", "MyP@ssw0rd"), "authentication failed for user: john")
            expectOK(try await run("verify", "john", "NewP@ssw0rd1"), "Authentication successful for user: john\n")
            expectOK(try await run("set-quota", "john", "5"), "Quota set to 5 MB for user: john\n")
            let info = try await run("info", "john")
            #expect(info.status == 0 && info.stdout.hasPrefix("User Information:\n  Username: john\n  Email: john@example.com\n  ID: 1\n  Created: "), "\(info.output)")
            #expect(info.stdout.hasSuffix("  Last Login: Never\n  Quota: 5 MB\n  Used: 0.0 MB (0.0%)\n  Status: Enabled\n"), "\(info.output)")
            expectOK(try await run("delete", "jane"), "User deleted successfully: jane\n")
            expectError(try await run("info", "jane"), "unknown user: jane")

            let rows = try await psqlRows(url, "SELECT json_agg(json_build_object('username', username, 'quota', quota_mb) ORDER BY id) FROM users")
            #expect(rows.map { $0.text("username") } == ["john"] && rows.first?.int("quota") == 5)
            #expect(!FileManager.default.fileExists(atPath: sqlitePath), "user-cli created a SQLite file with SMTP_DATABASE_URL set")
        }
    }

    // MARK: The server

    @Test("ingress and delivery as two stateless processes: PostgreSQL rows and the S3 spool, then the database store; no SQLite file")
    func ingressAndDeliveryProcesses() async throws {
        let names = ["MAILTIER_TEST_S3_ENDPOINT", "MAILTIER_TEST_S3_REGION", "MAILTIER_TEST_S3_ACCESS_KEY", "MAILTIER_TEST_S3_SECRET_KEY"]
        guard let s = try serviceVariables(names) else { return }
        try await withPrivatePostgresDatabase { url in
            let bucket = "mailtier-pg-\(uniqueSuffix())"
            _ = try await probeJSON(["s3", "create", bucket])
            do {
                try await ingressThenDelivery(url: url, bucket: bucket, s3: s)
            } catch {
                _ = try? await probeJSON(["s3", "destroy", bucket])
                throw error
            }
            _ = try await probeJSON(["s3", "destroy", bucket])
        }
    }

    private func ingressThenDelivery(url: String, bucket: String, s3 s: [String: String]) async throws {
        let cluster = [
            "SMTP_DATABASE_URL": url, "SMTP_STORAGE_TYPE": "database", "SMTP_ENABLE_AUTH": "false", "SMTP_S3_BUCKET": bucket,
            "SMTP_S3_ENDPOINT": s["MAILTIER_TEST_S3_ENDPOINT"]!, "SMTP_S3_REGION": s["MAILTIER_TEST_S3_REGION"]!,
            "SMTP_S3_ACCESS_KEY": s["MAILTIER_TEST_S3_ACCESS_KEY"]!, "SMTP_S3_SECRET_KEY": s["MAILTIER_TEST_S3_SECRET_KEY"]!,
        ]
        var ingress = cluster
        ingress["SMTP_ROLE"] = "ingress"
        try await withServer(ingress) { h in
            try await h.createUser("alice", Self.alice, alicePassword)
            let body = sampleMessage(subject: "cluster", word: "okapi")
            let r = try await smtplibSend(h, from: Self.sender, to: [Self.alice], body: body)
            expectReply(r, "data", [SMTP.queued])
            let id = try #require(r.queueID)

            // The 250 came after the commit: the rows are there, and the blob in the bucket.
            let message = try await psqlRows(
                url,
                """
                SELECT json_build_object('id', id, 'blob_key', blob_key, 'size', size_bytes, 'from', mail_from,
                    'subject', subject, 'client', client_ip, 'helo', helo) FROM queue_messages
                """)
            #expect(message.count == 1)
            #expect(message.first?.text("id") == id && message.first?.text("blob_key") == id)
            #expect(message.first?.text("from") == Self.sender && message.first?.text("subject") == "cluster")
            #expect(message.first?.text("client") == "127.0.0.1" && message.first?.text("helo") == "client.test")
            let recipients = try await psqlRows(
                url,
                """
                SELECT json_build_object('message', message_id, 'to', recipient, 'local', is_local, 'status', status,
                    'attempts', attempts, 'lease', lease_token) FROM queue_recipients
                """)
            #expect(recipients.count == 1)
            #expect(recipients.first?.text("message") == id && recipients.first?.text("to") == Self.alice)
            #expect(recipients.first?.values["local"] as? Bool == true && recipients.first?.text("status") == "pending")
            #expect(recipients.first?.int("attempts") == 0 && recipients.first?.isNull("lease") == true, "an ingress does not deliver")
            let spooled = try await probeJSON(["s3", "get", bucket, "spool/\(id)"]) as? [String: Any]
            #expect(spooled?["found"] as? Bool == true, "no spool/\(id) in the bucket")
            if let size = message.first?.int("size"), let b64 = spooled?["b64"] as? String {
                #expect(Data(base64Encoded: b64)?.count == size)
            }

            // A delivery process, elsewhere, with the same configuration.
            let deliveryDirectory = h.directory.appendingPathComponent("delivery")
            try FileManager.default.createDirectory(at: deliveryDirectory, withIntermediateDirectories: true)
            var environment = h.environment
            environment["SMTP_ROLE"] = "delivery"
            // Every role serves GET /health and /metrics: the delivery process needs ports of its own.
            environment["SMTP_HEALTH_PORT"] = "\(try Ports.free())"
            environment["SMTP_METRICS_PORT"] = "\(try Ports.free())"
            for (name, file) in [("SMTP_DB_PATH", "smtp.db"), ("SMTP_SPOOL_PATH", "spool"), ("SMTP_STORAGE_PATH", "mail")] {
                environment[name] = deliveryDirectory.appendingPathComponent(file).path
            }
            let delivery = try ChildProcess(
                try ServerHarness.executable("smtp-server"), [], environment: environment, outputDirectory: deliveryDirectory,
                name: "delivery")
            var stored: [Row] = []
            let delivered = await poll(timeout: .seconds(30), interval: .milliseconds(200)) {
                stored = (try? await psqlRows(
                    url,
                    #"SELECT json_build_object('id', message_id, 'user', "user", 'subject', subject) FROM messages"#)) ?? []
                return !stored.isEmpty
            }
            let queueEmptied = await poll(timeout: .seconds(10), interval: .milliseconds(200)) {
                (try? await psqlRows(url, "SELECT json_build_object('n', COUNT(*)) FROM queue_messages"))?.first?.int("n") == 0
            }
            let spoolEmptied = await poll(timeout: .seconds(10), interval: .milliseconds(200)) {
                ((try? await probeJSON(["s3", "get", bucket, "spool/\(id)"])) as? [String: Any])?["found"] as? Bool == false
            }
            delivery.signal(SIGTERM)
            let ended = await delivery.wait(timeout: .seconds(20))
            #expect(delivered, "the delivery process stored nothing within 30 s:\n\(ended.output)")
            #expect(stored.first?.text("id") == id && stored.first?.text("user") == Self.alice && stored.first?.text("subject") == "cluster")
            #expect(queueEmptied, "queue rows left after delivery")
            #expect(spoolEmptied, "spool/\(id) left in the bucket after delivery")
            #expect(ended.status == 0 && !ended.timedOut, "delivery process: \(ended.output)")

            for directory in [h.directory, deliveryDirectory] {
                let path = directory.appendingPathComponent("smtp.db").path
                #expect(!FileManager.default.fileExists(atPath: path), "a SQLite file was created at \(path)")
            }
        }
    }

    @Test("PostgreSQL unreachable: the server starts, RCPT gets 451 4.3.0 within the bound, the log says why and shows no password")
    func serverWithUnreachableDatabase() async throws {
        let url = "postgres://mailtier:Sup3r-Secret-Pw@127.0.0.1:\(try Ports.free())/mail"
        try await withServer(["SMTP_DATABASE_URL": url, "SMTP_ENABLE_AUTH": "false"]) { h in
            let started = ContinuousClock.now
            let reply = try await probeJSON(["rcpt", "\(h.smtpPort)", Self.alice]) as? [String: Any]
            let took = ContinuousClock.now - started
            let answer = "\(reply?["code"] as? Int ?? 0) \(reply?["text"] as? String ?? "")"
            #expect(answer == "451 4.3.0 Temporary lookup failure, try again later", "RCPT got \(answer.debugDescription)")
            #expect(took < .seconds(10), "RCPT was answered after \(took)")
            let logged = await poll(timeout: .seconds(10)) { h.log.contains("PostgreSQL is not available") }
            #expect(logged, "the log does not say that PostgreSQL is unavailable:\n\(h.logTail())")
            #expect(!h.log.contains("Sup3r-Secret-Pw"), "the log shows the password")
            #expect(!FileManager.default.fileExists(atPath: h.directory.appendingPathComponent("smtp.db").path))
        }
    }
}

// MARK: - Helpers

/// `smtp-server migrate` with `variables` on a clean environment (no other SMTP_* variable).
private func migrate(_ variables: [String: String]) async throws -> ProcessResult {
    var environment = cleanEnvironment()
    environment.merge(variables) { _, new in new }
    return try await runProcess(try ServerHarness.executable("smtp-server"), ["migrate"], environment: environment, timeout: .seconds(60))
}

/// Runs `body` with the URL of a new, empty database on the test PostgreSQL, dropped afterwards:
/// one test's users, queue and messages, apart from every other test's. Skips (or fails, when
/// services are required) without MAILTIER_TEST_POSTGRES_URL.
func withPrivatePostgresDatabase(_ body: (String) async throws -> Void) async throws {
    guard let services = try serviceVariables(["MAILTIER_TEST_POSTGRES_URL"]) else { return }
    let server = services["MAILTIER_TEST_POSTGRES_URL"]!
    let name = "mailtier_it_\(uniqueSuffix())"
    var parts = try #require(URLComponents(string: server))
    parts.path = "/\(name)"
    let url = try #require(parts.string)
    _ = try await psqlRows(server, "CREATE DATABASE \(name)")
    do {
        try await body(url)
    } catch {
        _ = try? await psqlRows(server, "DROP DATABASE \(name) WITH (FORCE)")
        throw error
    }
    _ = try await psqlRows(server, "DROP DATABASE \(name) WITH (FORCE)")
}
