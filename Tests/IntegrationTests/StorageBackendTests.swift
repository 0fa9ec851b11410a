// Black-box tests of the mailbox storage backends (`SMTP_STORAGE_TYPE`): the real
// `smtp-server` stores a message sent with smtplib, and the test reads what landed on disk,
// in SQLite, in PostgreSQL or in the S3 bucket, byte for byte (Support/storage_probe.py reads
// SQLite, S3 and sealed files; psql reads PostgreSQL). No project module is imported.
//
// PostgreSQL and S3 come from `scripts/test-services.sh start` (`.test-services/env`). Without
// them those tests are skipped with a note, unless MAILTIER_REQUIRE_SERVICES=1: then they fail.

import Foundation
import Testing

@Suite("Storage backends, black box", .timeLimit(.minutes(3)))
struct StorageBackendTests {
    static let alice = "alice@example.test"
    static let sender = "bob@example.org"

    // MARK: 1. mbox

    @Test("mbox: From_ line, LF endings, mboxrd escaping, 0600, index, append; user-cli info counts it")
    func mbox() async throws {
        try await withServer(["SMTP_STORAGE_TYPE": "mbox", "SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", Self.alice, alicePassword)
            let mboxPath = h.mailDirectory.appendingPathComponent(Self.alice).path
            let indexPath = h.mailDirectory.appendingPathComponent(".\(Self.alice).index").path

            // 1st message: `From ` and `>From ` lines, dot-stuffed lines on the wire.
            let body = sampleMessage(subject: "mbox format", word: "quokka")
            let before = Date()
            let r = try await smtplibSend(h, from: Self.sender, to: [Self.alice], body: body)
            expectReply(r, "data", [SMTP.queued])
            let id = try #require(r.queueID)
            let index1 = try await waitForLines(indexPath, count: 1, harness: h)
            let after = Date()
            let file1 = try readBytes(mboxPath)

            // From_ line: sender and asctime (UTC) of a second within the exchange.
            let firstLF = try #require(file1.firstIndex(of: 10), "mbox has no line feed: \(SMTPScript.describe(file1))")
            let fromLine = String(decoding: file1[..<firstLF], as: UTF8.self)
            let allowedFromLines = asctimeCandidates(from: before, to: after).map { "From \(Self.sender) \($0)" }
            #expect(allowedFromLines.contains(fromLine), "From_ line \(fromLine.debugDescription); expected one of \(allowedFromLines)")
            #expect(!file1.contains(13), "mbox holds a CR: \(SMTPScript.describe(file1))")

            // The rest is the stored message (LF, escaped) and an empty line.
            let entry = Array(file1[(firstLF + 1)...])
            try #require(entry.count >= 2 && entry.suffix(2) == [10, 10], "entry does not end in LF LF: \(SMTPScript.describe(entry))")
            let stored = mboxUnescape(Array(entry.dropLast()))
            expectStoredMessage(stored, sender: Self.sender, helo: "client.test", queueID: id, recipient: Self.alice, body: body)
            // Exactly: From_ line LF, the stored message with LF endings and mboxrd escaping, LF.
            let expected = Array((fromLine + "\n").utf8) + mboxEscape(stored) + [10]
            #expect(file1 == expected, "mbox bytes differ:\n  expected \(SMTPScript.describe(expected))\n  actual   \(SMTPScript.describe(file1))")
            let text = String(decoding: file1, as: UTF8.self)
            for line in ["\n>From the start of a line\n", "\n>>From an escaped line\n", "\n.leading dot\n", "\n.\n", "\n..two dots\n"] {
                #expect(text.contains(line), "mbox lacks the line \(line.debugDescription)")
            }
            #expect(fileMode(mboxPath) == 0o600, "mbox mode is \(octal(fileMode(mboxPath)))")
            #expect(fileMode(indexPath) == 0o600, "index mode is \(octal(fileMode(indexPath)))")
            expectIndexLine(index1[0], id: id, offset: 0, length: file1.count, from: before, to: after)

            // 2nd message (~120 KB, so that `Used:` shows at least 0.1 MB): appended.
            let big = sampleMessage(subject: "mbox append", word: "wombat", filler: 1_600)
            let before2 = Date()
            let r2 = try await smtplibSend(h, from: Self.sender, to: [Self.alice], body: big)
            expectReply(r2, "data", [SMTP.queued])
            let id2 = try #require(r2.queueID)
            let index2 = try await waitForLines(indexPath, count: 2, harness: h)
            let after2 = Date()
            let file2 = try readBytes(mboxPath)
            #expect(Array(file2.prefix(file1.count)) == file1, "the first entry changed when the second was appended")
            let second = Array(file2.dropFirst(file1.count))
            let secondLF = try #require(second.firstIndex(of: 10))
            let fromLine2 = String(decoding: second[..<secondLF], as: UTF8.self)
            #expect(asctimeCandidates(from: before2, to: after2).map { "From \(Self.sender) \($0)" }.contains(fromLine2), "2nd From_ line \(fromLine2.debugDescription)")
            let entry2 = Array(second[(secondLF + 1)...])
            try #require(entry2.suffix(2) == [10, 10], "2nd entry does not end in LF LF")
            let stored2 = mboxUnescape(Array(entry2.dropLast()))
            expectStoredMessage(stored2, sender: Self.sender, helo: "client.test", queueID: id2, recipient: Self.alice, body: big)
            #expect(second == Array((fromLine2 + "\n").utf8) + mboxEscape(stored2) + [10], "2nd entry bytes differ")
            #expect(index2[0] == index1[0], "the first index line changed: \(index2)")
            expectIndexLine(index2[1], id: id2, offset: file1.count, length: second.count, from: before2, to: after2)
            #expect(!FileManager.default.fileExists(atPath: h.mailDirectory.appendingPathComponent("\(Self.alice)/new").path))

            // user-cli info measures the mailbox (README: `SMTP_STORAGE_PATH` for `Used:`).
            let info = try await h.userCLI(["info", "alice"])
            #expect(info.status == 0, "user-cli info failed: \(info.output)")
            let used = usedMB(info.stdout)
            #expect(
                used != nil && used != "0.0",
                "user-cli info shows Used: \(used ?? "(none)") MB for an mbox of \(file2.count) bytes (SMTP_STORAGE_TYPE=mbox):\n\(info.output)")
        }
    }

    // MARK: 2. database (SQLite)

    @Test("database (SQLite): one messages row with the stored bytes; FTS finds a body word")
    func databaseSQLite() async throws {
        try await withServer(["SMTP_STORAGE_TYPE": "database", "SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", Self.alice, alicePassword)
            let subject = "database row"
            let body = sampleMessage(subject: subject, word: "axolotl")
            let before = Date()
            let r = try await smtplibSend(h, from: Self.sender, to: [Self.alice], body: body)
            expectReply(r, "data", [SMTP.queued])
            let id = try #require(r.queueID)
            let row = try await waitForRow(h, "SELECT * FROM messages WHERE message_id = ?", [id])
            let after = Date()

            #expect(row.text("user") == Self.alice)
            #expect(row.text("folder") == "INBOX")
            #expect(row.text("message_id") == id)
            #expect(row.text("subject") == subject)
            #expect(row.text("from_addr") == "Bob <bob@example.org>")
            #expect(row.text("to_addrs") == "Alice <alice@example.test>")
            #expect(row.text("flags") == "")
            #expect(row.isNull("location"), "an inline row has no location: \(row.values["location"] ?? "nil")")
            expectSeconds(row.int("date"), from: before, to: after)
            let stored = try #require(row.blob("body"), "body is not a BLOB: \(row.values["body"] ?? "nil")")
            #expect(row.int("size") == stored.count)
            expectStoredMessage(stored, sender: Self.sender, helo: "client.test", queueID: id, recipient: Self.alice, body: body)
            #expect(try await sqliteRows(h, "SELECT COUNT(*) AS n FROM messages").first?.int("n") == 1)

            // Full text: a body word finds the row, an absent word nothing.
            let hits = try await sqliteRows(h, "SELECT rowid AS rowid FROM messages_fts WHERE messages_fts MATCH 'axolotl'")
            #expect(hits.map { $0.int("rowid") } == [row.int("id")], "FTS hits for axolotl: \(hits.map(\.values))")
            let misses = try await sqliteRows(h, "SELECT rowid AS rowid FROM messages_fts WHERE messages_fts MATCH 'narwhal'")
            #expect(misses.isEmpty)
            // Nothing in the file system mailbox.
            #expect(!FileManager.default.fileExists(atPath: h.mailDirectory.appendingPathComponent(Self.alice).path))
        }
    }

    // MARK: 3. database (PostgreSQL)

    @Test("database (PostgreSQL): the row holds the body; a second start migrates idempotently")
    func databasePostgres() async throws {
        // Users and the queue are in PostgreSQL too: a database of this test's own.
        try await withPrivatePostgresDatabase { url in try await databasePostgres(url: url) }
    }

    private func databasePostgres(url: String) async throws {
        // A domain of our own.
        let email = "alice@pg-\(uniqueSuffix()).example.test"
        let cleanup = #"DELETE FROM messages WHERE "user" = '\#(email)'"#
        let select = """
            SELECT json_agg(t ORDER BY t.id) FROM (SELECT id, message_id, "user" AS mailbox, folder, subject, from_addr, size, flags,
                location, translate(encode(body, 'base64'), E'\n', '') AS body, extract(epoch FROM date)::bigint AS date,
                search @@ plainto_tsquery('simple', 'pangolin') AS found
                FROM messages WHERE "user" = '\(email)') t
            """
        do {
            try await withServer(["SMTP_STORAGE_TYPE": "database", "SMTP_ENABLE_AUTH": "false", "SMTP_DATABASE_URL": url]) { h in
                try await h.createUser("alice", email, alicePassword)
                let subject = "postgres row"
                let body = sampleMessage(subject: subject, word: "pangolin", to: email)
                let before = Date()
                let r = try await smtplibSend(h, from: Self.sender, to: [email], body: body)
                expectReply(r, "data", [SMTP.queued])
                let id = try #require(r.queueID)
                var rows: [Row] = []
                var lastError = "none"
                let read = { () async -> [Row] in
                    do { return try await psqlRows(url, select) } catch {
                        lastError = "\(error)"
                        return []
                    }
                }
                let stored = await poll(timeout: .seconds(20), interval: .milliseconds(100)) {
                    rows = await read()
                    return !rows.isEmpty
                }
                try #require(stored, "no PostgreSQL row for \(email) within 20 s (last psql error: \(lastError)); log tail:\n\(h.logTail())")
                let after = Date()
                #expect(rows.count == 1)
                let row = rows[0]
                #expect(row.text("message_id") == id)
                #expect(row.text("mailbox") == email)
                #expect(row.text("folder") == "INBOX")
                #expect(row.text("subject") == subject)
                #expect(row.text("from_addr") == "Bob <bob@example.org>")
                #expect(row.text("flags") == "")
                #expect(row.isNull("location"))
                #expect(row.values["found"] as? Bool == true, "the search vector does not match a body word")
                expectSeconds(row.int("date"), from: before, to: after)
                let bytes = try #require(row.text("body").flatMap { Data(base64Encoded: $0) }.map { Array($0) }, "body is NULL")
                #expect(row.int("size") == bytes.count)
                expectStoredMessage(bytes, sender: Self.sender, helo: "client.test", queueID: id, recipient: email, body: body)
                // Users and the queue are in PostgreSQL: no SQLite file at all.
                let sqlite = h.environment["SMTP_DB_PATH"]!
                #expect(!FileManager.default.fileExists(atPath: sqlite), "a SQLite file was created at \(sqlite)")

                // A second start on the migrated database: it starts, and stores again.
                try await h.restart()
                let r2 = try await smtplibSend(h, from: Self.sender, to: [email], body: sampleMessage(subject: "again", word: "pangolin", to: email))
                expectReply(r2, "data", [SMTP.queued])
                let id2 = try #require(r2.queueID)
                let again = await poll(timeout: .seconds(20), interval: .milliseconds(100)) {
                    rows = await read()
                    return rows.count >= 2
                }
                try #require(again, "\(rows.count) PostgreSQL row(s) after the restart, expected 2 (last psql error: \(lastError)); log tail:\n\(h.logTail())")
                #expect(rows.map { $0.text("message_id") } == [id, id2])
                let versions = try await psqlRows(url, "SELECT json_agg(json_build_object('v', version) ORDER BY version) FROM schema_migrations")
                    .compactMap { $0.int("v") }
                #expect(!versions.isEmpty && versions == Array(1...versions.count), "schema_migrations holds \(versions)")
            }
        } catch {
            _ = try? await psqlRows(url, cleanup + " RETURNING json_build_object('id', id)")
            throw error
        }
        _ = try await psqlRows(url, cleanup + " RETURNING json_build_object('id', id)")
        let left = try await psqlRows(url, #"SELECT json_build_object('n', COUNT(*)) FROM messages WHERE "user" = '\#(email)'"#)
        #expect(left.first?.int("n") == 0, "rows left behind for \(email)")
    }

    // MARK: 4. timeseries, plain

    @Test("timeseries: YYYY/MM/DD/<queue id>.eml holds the stored bytes, 0600; an index row points at it")
    func timeseriesPlain() async throws {
        try await withServer(["SMTP_STORAGE_TYPE": "timeseries", "SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", Self.alice, alicePassword)
            let subject = "timeseries plain"
            let body = sampleMessage(subject: subject, word: "echidna")
            let before = Date()
            let r = try await smtplibSend(h, from: Self.sender, to: [Self.alice], body: body)
            expectReply(r, "data", [SMTP.queued])
            let id = try #require(r.queueID)
            let row = try await waitForRow(h, "SELECT * FROM messages WHERE message_id = ?", [id])
            let after = Date()

            let location = try #require(row.text("location"), "index row without location: \(row.values)")
            let allowed = Set([before, after].map { "\(utcDayPath($0))/\(id).eml" })
            #expect(allowed.contains(location), "location \(location); expected one of \(allowed)")
            let path = h.mailDirectory.appendingPathComponent(location).path
            let stored = try readBytes(path)
            expectStoredMessage(stored, sender: Self.sender, helo: "client.test", queueID: id, recipient: Self.alice, body: body)
            #expect(fileMode(path) == 0o600, "file mode is \(octal(fileMode(path)))")
            let day = URL(fileURLWithPath: path).deletingLastPathComponent()
            for dir in [day, day.deletingLastPathComponent(), day.deletingLastPathComponent().deletingLastPathComponent()] {
                #expect(fileMode(dir.path) == 0o700, "\(dir.path) mode is \(octal(fileMode(dir.path)))")
            }
            #expect((try? FileManager.default.contentsOfDirectory(atPath: day.path)) == ["\(id).eml"], "day directory holds more than the message")

            #expect(row.text("user") == Self.alice)
            #expect(row.text("folder") == "INBOX")
            #expect(row.text("subject") == subject)
            #expect(row.int("size") == stored.count)
            #expect(row.isNull("body"), "an index row has no body")
            expectSeconds(row.int("date"), from: before, to: after)
        }
    }

    // MARK: 5. timeseries, sealed

    @Test("timeseries + SMTP_ENCRYPTION_KEY: MTENC v1 file, no plaintext, AES-256-GCM opens to the stored bytes")
    func timeseriesSealed() async throws {
        let key = Data((0..<32).map { _ in UInt8.random(in: 0...255) }).base64EncodedString()
        try await withServer(["SMTP_STORAGE_TYPE": "timeseries", "SMTP_ENABLE_AUTH": "false", "SMTP_ENCRYPTION_KEY": key]) { h in
            try await h.createUser("alice", Self.alice, alicePassword)
            let subject = "sealed secret subject"
            let body = sampleMessage(subject: subject, word: "platypus")
            let before = Date()
            let r = try await smtplibSend(h, from: Self.sender, to: [Self.alice], body: body)
            expectReply(r, "data", [SMTP.queued])
            let id = try #require(r.queueID)
            let row = try await waitForRow(h, "SELECT * FROM messages WHERE message_id = ?", [id])
            let after = Date()
            let location = try #require(row.text("location"))
            let allowed = Set([before, after].map { "\(utcDayPath($0))/\(id).eml" })
            #expect(allowed.contains(location), "location \(location); expected one of \(allowed)")
            let path = h.mailDirectory.appendingPathComponent(location).path
            let sealed = try readBytes(path)

            #expect(sealed.starts(with: Array("MTENC".utf8) + [1]), "sealed file starts \(sealed.prefix(6))")
            for plain in [subject, "platypus", "Return-Path", Self.sender] {
                #expect(!String(decoding: sealed, as: UTF8.self).contains(plain), "sealed file contains \(plain.debugDescription)")
            }
            #expect(fileMode(path) == 0o600, "file mode is \(octal(fileMode(path)))")
            let size = try #require(row.int("size"))
            #expect(sealed.count == 18 + size + 16, "sealed size \(sealed.count), plaintext size \(size)")

            let opened = try await probeJSON(["decrypt", key, path])
            let plain = try #require((opened as? [String: Any])?["b64"] as? String).flatMap { Data(base64Encoded: $0) }
            let stored = try #require(plain.map { Array($0) })
            expectStoredMessage(stored, sender: Self.sender, helo: "client.test", queueID: id, recipient: Self.alice, body: body)
            #expect(stored.count == size)

            // Another key does not open it.
            let other = Data((0..<32).map { _ in UInt8.random(in: 0...255) }).base64EncodedString()
            let wrong = try await probe(["decrypt", other, path])
            #expect(wrong.status == 1 && wrong.stderr.contains("decryption failed"), "a wrong key: \(wrong.output)")
        }
    }

    @Test("SMTP_ENCRYPTION_KEY that is not base64 of 32 bytes: exit 2, one line naming it")
    func badEncryptionKey() async throws {
        let short = Data((0..<16).map { _ in UInt8.random(in: 0...255) }).base64EncodedString()
        try await expectConfigurationError(
            ["SMTP_STORAGE_TYPE": "timeseries", "SMTP_ENCRYPTION_KEY": short], naming: "SMTP_ENCRYPTION_KEY", secret: short)
        try await expectConfigurationError(
            ["SMTP_STORAGE_TYPE": "timeseries", "SMTP_ENCRYPTION_KEY": "not base64 at all!"], naming: "SMTP_ENCRYPTION_KEY",
            secret: "not base64 at all!")
    }

    // MARK: 6. s3

    @Test("s3: object YYYY/MM/DD/<queue id>.eml holds the stored bytes; the spool object is gone; an index row")
    func s3() async throws {
        let names = ["MAILTIER_TEST_S3_ENDPOINT", "MAILTIER_TEST_S3_REGION", "MAILTIER_TEST_S3_ACCESS_KEY", "MAILTIER_TEST_S3_SECRET_KEY"]
        guard let s = try serviceVariables(names) else { return }
        let bucket = "mailtier-it-\(uniqueSuffix())"
        _ = try await probeJSON(["s3", "create", bucket])
        do {
            try await withServer([
                "SMTP_STORAGE_TYPE": "s3", "SMTP_ENABLE_AUTH": "false", "SMTP_S3_BUCKET": bucket,
                "SMTP_S3_ENDPOINT": s["MAILTIER_TEST_S3_ENDPOINT"]!, "SMTP_S3_REGION": s["MAILTIER_TEST_S3_REGION"]!,
                "SMTP_S3_ACCESS_KEY": s["MAILTIER_TEST_S3_ACCESS_KEY"]!, "SMTP_S3_SECRET_KEY": s["MAILTIER_TEST_S3_SECRET_KEY"]!,
            ]) { h in
                try await h.createUser("alice", Self.alice, alicePassword)
                let subject = "s3 object"
                let body = sampleMessage(subject: subject, word: "quoll")
                let before = Date()
                let r = try await smtplibSend(h, from: Self.sender, to: [Self.alice], body: body)
                expectReply(r, "data", [SMTP.queued])
                let id = try #require(r.queueID)
                let row = try await waitForRow(h, "SELECT * FROM messages WHERE message_id = ?", [id])
                let after = Date()
                let location = try #require(row.text("location"))
                let allowed = Set([before, after].map { "\(utcDayPath($0))/\(id).eml" })
                #expect(allowed.contains(location), "location \(location); expected one of \(allowed)")
                #expect(row.text("user") == Self.alice)
                #expect(row.text("folder") == "INBOX")
                #expect(row.text("subject") == subject)
                #expect(row.isNull("body"))

                let object = try await probeJSON(["s3", "get", bucket, location]) as? [String: Any]
                #expect(object?["found"] as? Bool == true, "no object \(location) in \(bucket)")
                if let b64 = object?["b64"] as? String, let data = Data(base64Encoded: b64) {
                    expectStoredMessage(Array(data), sender: Self.sender, helo: "client.test", queueID: id, recipient: Self.alice, body: body)
                    #expect(row.int("size") == data.count)
                }

                // The spool was in the bucket, and is emptied once delivered.
                var spool: [String] = []
                let emptied = await poll(timeout: .seconds(10), interval: .milliseconds(200)) {
                    spool = ((try? await probeJSON(["s3", "list", bucket, "spool/"])) as? [String]) ?? ["(list failed)"]
                    return spool.isEmpty
                }
                #expect(emptied, "spool objects left after delivery: \(spool)")
                let spoolObject = try await probeJSON(["s3", "get", bucket, "spool/\(id)"]) as? [String: Any]
                #expect(spoolObject?["found"] as? Bool == false, "spool/\(id) still exists")
                let all = try await probeJSON(["s3", "list", bucket, ""]) as? [String]
                #expect(all == [location], "bucket holds \(all ?? [])")
                let localSpool = h.directory.appendingPathComponent("spool").path
                let spoolFiles = (try? FileManager.default.contentsOfDirectory(atPath: localSpool)) ?? []
                #expect(spoolFiles.allSatisfy { $0.hasPrefix(".") }, "the local spool was used: \(spoolFiles)")
            }
        } catch {
            _ = try? await probeJSON(["s3", "destroy", bucket])
            throw error
        }
        _ = try await probeJSON(["s3", "destroy", bucket])
    }

    // MARK: 7. quota

    @Test("quota: a maildir over its 1 MB quota gets 452 4.2.2 at RCPT")
    func quota() async throws {
        try await withServer(["SMTP_ENABLE_AUTH": "false"]) { h in
            try await h.createUser("alice", Self.alice, alicePassword)
            // ~1.1 MB, delivered while the quota is still the default, then the quota drops to 1 MB.
            let big = sampleMessage(subject: "big", word: "dugong", filler: 14_500)
            #expect(big.count > 1_100_000)
            let r = try await smtplibSend(h, from: Self.sender, to: [Self.alice], body: big)
            expectReply(r, "data", [SMTP.queued])
            let id = try #require(r.queueID)
            let stored = try await h.waitForStoredMessage(for: Self.alice, containing: id)
            #expect(stored.bytes.count > 1_048_576)
            let set = try await h.userCLI(["set-quota", "alice", "1"])
            #expect(set.status == 0, "set-quota failed: \(set.output)")

            let expected = "452 4.2.2 <\(Self.alice)>: Mailbox full, try again later"
            var last = ""
            let refused = try await poll(timeout: .seconds(15), interval: .milliseconds(500)) {
                let reply = try await probeJSON(["rcpt", "\(h.smtpPort)", Self.alice]) as? [String: Any]
                last = "\(reply?["code"] as? Int ?? 0) \(reply?["text"] as? String ?? "")"
                return last.hasPrefix("452 ")
            }
            #expect(refused && last == expected, "RCPT TO:<\(Self.alice)> got \(last.debugDescription), expected \(expected.debugDescription)")

            let info = try await h.userCLI(["info", "alice"])
            #expect(info.stdout.contains("  Quota: 1 MB\n"), "\(info.output)")
            #expect(usedMB(info.stdout) == "1.1", "user-cli info: \(info.output)")
        }
    }

    // MARK: 8. configuration errors

    @Test("configuration errors: s3 without SMTP_S3_BUCKET, a non-PostgreSQL SMTP_DATABASE_URL")
    func configurationErrors() async throws {
        try await expectConfigurationError(["SMTP_STORAGE_TYPE": "s3"], naming: "SMTP_S3_BUCKET")
        try await expectConfigurationError(["SMTP_DATABASE_URL": "mysql://x"], naming: "SMTP_DATABASE_URL")
        // The URL may carry a password: it is never echoed.
        try await expectConfigurationError(
            ["SMTP_DATABASE_URL": "mysql://mail:Hunter2-Secret@db.test/mail"], naming: "SMTP_DATABASE_URL",
            secret: "Hunter2-Secret")
    }
}

// MARK: - Helpers

/// The test message (CRLF): a body line starting with `From `, one with `>From ` (mboxrd
/// escapes both), lines that smtplib dot-stuffs, `word` for full-text search, and `filler`
/// 76-octet lines to make it bigger.
func sampleMessage(subject: String, word: String, to recipient: String = StorageBackendTests.alice, filler: Int = 0) -> [UInt8] {
    var lines = [
        "From: Bob <bob@example.org>", "To: Alice <\(recipient)>", "Subject: \(subject)", "",
        "Hello Alice, here is a \(word) for you.", "From the start of a line", ">From an escaped line",
        ".leading dot", ".", "..two dots",
    ]
    let pattern = Array("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-_=+.,;:!?()[]{}".utf8)
    for i in 0..<filler {
        lines.append(String(decoding: (0..<76).map { pattern[($0 + i) % pattern.count] }, as: UTF8.self))
    }
    lines += ["", "last line"]
    return Array(lines.map { $0 + "\r\n" }.joined().utf8)
}

/// True for a line matching `^>*From `.
private func isMboxFromLine<C: Collection>(_ line: C) -> Bool where C.Element == UInt8 {
    let rest = line.drop { $0 == UInt8(ascii: ">") }
    return rest.starts(with: "From ".utf8)
}

/// mboxrd, independently of the server: CRLF (or LF) line ends become LF, a line matching
/// `^>*From ` gets one more `>`, the last line gets an LF if it lacks one.
func mboxEscape(_ message: [UInt8]) -> [UInt8] {
    var out: [UInt8] = []
    var lines = message.split(separator: 10, omittingEmptySubsequences: false)
    if message.last == 10 { lines.removeLast() }
    for var line in lines {
        if line.last == 13 { line = line.dropLast() }
        if isMboxFromLine(line) { out.append(UInt8(ascii: ">")) }
        out += line
        out.append(10)
    }
    return out
}

/// The inverse for an entry body ending in LF: one `>` off `^>+From ` lines, LF → CRLF.
func mboxUnescape(_ entry: [UInt8]) -> [UInt8] {
    var out: [UInt8] = []
    var lines = entry.split(separator: 10, omittingEmptySubsequences: false)
    if entry.last == 10 { lines.removeLast() }
    for var line in lines {
        if line.first == UInt8(ascii: ">"), isMboxFromLine(line) { line = line.dropFirst() }
        out += line
        out += [13, 10]
    }
    return out
}

/// `Tue Nov  5 09:26:00 2025` (C asctime, UTC) for every second from `start` to `end`,
/// a second of slack each side.
func asctimeCandidates(from start: Date, to end: Date) -> [String] {
    var calendar = Calendar(identifier: .gregorian)
    calendar.timeZone = TimeZone(identifier: "UTC")!
    let days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
    let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    let two = { (n: Int) in n < 10 ? "0\(n)" : "\(n)" }
    let first = Int(start.timeIntervalSince1970.rounded(.down)) - 1
    let last = Int(end.timeIntervalSince1970.rounded(.up)) + 1
    return (first...last).map { second in
        let c = calendar.dateComponents(
            [.weekday, .month, .day, .hour, .minute, .second, .year], from: Date(timeIntervalSince1970: TimeInterval(second)))
        let day = c.day! < 10 ? " \(c.day!)" : "\(c.day!)"
        return "\(days[c.weekday! - 1]) \(months[c.month! - 1]) \(day) \(two(c.hour!)):\(two(c.minute!)):\(two(c.second!)) \(c.year!)"
    }
}

/// `YYYY/MM/DD` of `date` in UTC.
func utcDayPath(_ date: Date) -> String {
    var calendar = Calendar(identifier: .gregorian)
    calendar.timeZone = TimeZone(identifier: "UTC")!
    let c = calendar.dateComponents([.year, .month, .day], from: date)
    let two = { (n: Int) in n < 10 ? "0\(n)" : "\(n)" }
    return "\(c.year!)/\(two(c.month!))/\(two(c.day!))"
}

/// A mbox index line: `<id> <offset> <length> - <receivedAt>` (no flags yet).
func expectIndexLine(
    _ line: String, id: String, offset: Int, length: Int, from start: Date, to end: Date,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    let fields = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
    guard fields.count == 5 else {
        Issue.record("index line \(line.debugDescription) has \(fields.count) fields, expected 5", sourceLocation: sourceLocation)
        return
    }
    #expect(fields[0] == id, "index line \(line.debugDescription): id", sourceLocation: sourceLocation)
    #expect(fields[1] == "\(offset)", "index line \(line.debugDescription): offset, expected \(offset)", sourceLocation: sourceLocation)
    #expect(fields[2] == "\(length)", "index line \(line.debugDescription): length, expected \(length)", sourceLocation: sourceLocation)
    #expect(fields[3] == "-", "index line \(line.debugDescription): flags", sourceLocation: sourceLocation)
    let received = Double(fields[4]) ?? -1
    #expect(
        received >= start.timeIntervalSince1970.rounded(.down) - 1 && received <= end.timeIntervalSince1970 + 1,
        "index line \(line.debugDescription): receivedAt outside the exchange", sourceLocation: sourceLocation)
}

/// Unix seconds within the exchange (a second of slack each side).
func expectSeconds(_ value: Int?, from start: Date, to end: Date, sourceLocation: SourceLocation = #_sourceLocation) {
    let low = Int(start.timeIntervalSince1970.rounded(.down)) - 1
    let high = Int(end.timeIntervalSince1970.rounded(.up)) + 1
    #expect(value.map { (low...high).contains($0) } == true, "date \(value.map(String.init) ?? "nil") not in \(low)...\(high)", sourceLocation: sourceLocation)
}

/// The `Used: X MB` figure of `user-cli info`.
func usedMB(_ output: String) -> String? {
    for line in output.split(separator: "\n") {
        let trimmed = line.trimmingCharacters(in: .whitespaces)
        if trimmed.hasPrefix("Used: "), let end = trimmed.range(of: " MB") {
            return String(trimmed[trimmed.index(trimmed.startIndex, offsetBy: 6)..<end.lowerBound])
        }
    }
    return nil
}

func readBytes(_ path: String) throws -> [UInt8] {
    guard let data = FileManager.default.contents(atPath: path) else { throw HarnessError("cannot read \(path)") }
    return Array(data)
}

func fileMode(_ path: String) -> Int? {
    (try? FileManager.default.attributesOfItem(atPath: path))?[.posixPermissions] as? Int
}

func octal(_ mode: Int?) -> String { mode.map { "0" + String($0, radix: 8) } ?? "nil" }

func uniqueSuffix() -> String {
    String(UUID().uuidString.lowercased().replacingOccurrences(of: "-", with: "").prefix(12))
}

/// Polls until the file has at least `count` non-empty lines; returns them.
func waitForLines(_ path: String, count: Int, harness: ServerHarness, timeout: Duration = .seconds(20)) async throws -> [String] {
    var lines: [String] = []
    let ok = await poll(timeout: timeout) {
        let text = (try? String(contentsOfFile: path, encoding: .utf8)) ?? ""
        lines = text.split(separator: "\n").map(String.init)
        return lines.count >= count
    }
    guard ok else {
        throw HarnessError("\(path) has \(lines.count) line(s), expected \(count) within \(timeout); log tail:\n\(harness.logTail())")
    }
    return lines
}

/// One row of a probe query; SQLite BLOBs arrive as `{"b64": …}`.
struct Row: @unchecked Sendable {
    var values: [String: Any]
    func text(_ key: String) -> String? { values[key] as? String }
    func int(_ key: String) -> Int? {
        switch values[key] {
        case let value as Int: return value
        case let value as Int64: return Int(value)
        case let value as NSNumber: return value.intValue
        case let value as String: return Int(value)
        default: return nil
        }
    }
    func isNull(_ key: String) -> Bool { values[key] == nil || values[key] is NSNull }
    func blob(_ key: String) -> [UInt8]? {
        ((values[key] as? [String: Any])?["b64"] as? String).flatMap { Data(base64Encoded: $0) }.map { Array($0) }
    }
}

/// Runs Support/storage_probe.py (the S3 settings come from the inherited environment).
func probe(_ arguments: [String]) async throws -> ProcessResult {
    let python = try await Tools.python()
    let script = try Tools.script("storage_probe.py")
    return try await runProcess(python, [script] + arguments, environment: cleanEnvironment(), timeout: .seconds(30))
}

/// The probe's JSON output; throws with its output when it fails.
func probeJSON(_ arguments: [String]) async throws -> Any {
    let result = try await probe(arguments)
    guard result.status == 0, !result.timedOut else {
        let shown = arguments.first == "decrypt" ? ["decrypt", "<key>"] + arguments.dropFirst(2) : arguments
        throw HarnessError("storage_probe.py \(shown.joined(separator: " ")) failed (status \(result.status)):\n\(result.output)")
    }
    return try JSONSerialization.jsonObject(with: Data(result.stdout.utf8))
}

/// Rows of a query on the server's SQLite file (`SMTP_DB_PATH`).
func sqliteRows(_ harness: ServerHarness, _ sql: String, _ parameters: [String] = []) async throws -> [Row] {
    let db = harness.environment["SMTP_DB_PATH"]!
    let rows = try await probeJSON(["sqlite", db, sql] + parameters) as? [[String: Any]]
    return (rows ?? []).map { Row(values: $0) }
}

/// Polls the SQLite file until `sql` returns a row.
func waitForRow(_ harness: ServerHarness, _ sql: String, _ parameters: [String], timeout: Duration = .seconds(20)) async throws -> Row {
    var row: Row?
    _ = await poll(timeout: timeout, interval: .milliseconds(100)) {
        row = (try? await sqliteRows(harness, sql, parameters))?.first
        return row != nil
    }
    guard let row else {
        throw HarnessError("no row for \(sql) \(parameters) within \(timeout); log tail:\n\(harness.logTail())")
    }
    return row
}

/// `sql` must return one JSON value per row (or one `json_agg` array, or NULL for none).
func psqlRows(_ url: String, _ sql: String) async throws -> [Row] {
    let psql = try Tools.path("psql")
    let result = try await runProcess(
        psql, ["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql], environment: cleanEnvironment(),
        timeout: .seconds(30))
    guard result.status == 0, !result.timedOut else {
        throw HarnessError("psql failed (status \(result.status)) on \(sql):\n\(result.output)")
    }
    // json_agg separates its elements with line breaks: the whole output is one value, or
    // there is one value per line.
    let text = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    if text.isEmpty { return [] }
    let values: [Any]
    if let whole = try? JSONSerialization.jsonObject(with: Data(text.utf8)) {
        values = [whole]
    } else {
        values = try text.split(separator: "\n").map { try JSONSerialization.jsonObject(with: Data($0.utf8)) }
    }
    var rows: [Row] = []
    for value in values {
        if let list = value as? [[String: Any]] {
            rows += list.map { Row(values: $0) }
        } else if let object = value as? [String: Any] {
            rows.append(Row(values: object))
        }
    }
    return rows
}

/// The values of `names`. When one is missing: nil after a failing issue if
/// MAILTIER_REQUIRE_SERVICES=1, otherwise the test is skipped (cancelled) with a note.
func serviceVariables(_ names: [String], sourceLocation: SourceLocation = #_sourceLocation) throws -> [String: String]? {
    let environment = ProcessInfo.processInfo.environment
    let missing = names.filter { (environment[$0] ?? "").isEmpty }
    if missing.isEmpty {
        return Dictionary(uniqueKeysWithValues: names.map { ($0, environment[$0]!) })
    }
    let how = "start them with scripts/test-services.sh start, then `set -a; . .test-services/env; set +a`"
    if environment["MAILTIER_REQUIRE_SERVICES"] == "1" {
        Issue.record("MAILTIER_REQUIRE_SERVICES=1 but \(missing.joined(separator: ", ")) not set: \(how)", sourceLocation: sourceLocation)
        return nil
    }
    try Test.cancel("skipped: \(missing.joined(separator: ", ")) not set (\(how))", sourceLocation: sourceLocation)
}

/// Runs smtp-server with the harness environment plus `overrides` and expects it to stop at
/// once with exit status 2 and one stderr line naming `variable` (and not showing `secret`).
func expectConfigurationError(
    _ overrides: [String: String], naming variable: String, secret: String? = nil,
    sourceLocation: SourceLocation = #_sourceLocation
) async throws {
    let harness = try ServerHarness(overrides: overrides)
    defer { try? FileManager.default.removeItem(at: harness.directory) }
    let result = try await runProcess(
        try ServerHarness.executable("smtp-server"), [], environment: harness.environment, timeout: .seconds(15))
    let lines = result.stderr.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
    let described = "with \(overrides.keys.sorted()): status \(result.status), signalled \(result.signalled), timed out \(result.timedOut)\n\(result.output)"
    #expect(!result.timedOut && !result.signalled && result.status == 2, "expected exit 2 \(described)", sourceLocation: sourceLocation)
    #expect(
        lines.count == 2 && lines[1].isEmpty && lines[0].contains(variable),
        "expected one stderr line naming \(variable) \(described)", sourceLocation: sourceLocation)
    if let secret {
        #expect(!result.output.contains(secret), "the error shows the value of \(variable)", sourceLocation: sourceLocation)
    }
}
