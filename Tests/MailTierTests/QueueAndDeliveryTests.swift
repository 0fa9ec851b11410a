import Crypto
import Foundation
import Logging
import NIOCore
import NIOPosix
import SMTPNIO
import SMTPProtocol
import Testing

@testable import MailTier
@testable import MailTierArgon2
@testable import MailTierFiles
import MailTierPostgres
@testable import MailTierSQLite

// The ingress and delivery services against real parts: a SQLite file or a PostgreSQL schema (each
// case runs on both), a spool directory and maildirs in a temporary directory, and libargon2
// (cheap parameters).

/// Everything embedded mode wires together, in a temporary directory, on `database`.
struct Embedded {
    let directory: String
    let configuration: Configuration
    let database: TestDatabase
    let queue: any MessageQueue
    let spool: SpoolBlobStore
    let mailboxes: MaildirStore
    let accounts: AccountService
    let ingress: IngressService
    let delivery: DeliveryService
    let quota: QuotaChecker

    init(database: TestDatabase, localDomains: [String] = ["example.test"]) throws {
        var template = Array((NSTemporaryDirectory() + "/mailtier-queue-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw POSIXError(.EIO) }
        directory = String(cString: made)
        var configuration = Configuration()
        configuration.hostname = "mail.example.test"
        configuration.localDomains = localDomains
        configuration.dbPath = directory + "/smtp.db"
        configuration.spoolPath = directory + "/spool"
        configuration.storagePath = directory + "/mail"
        self.configuration = configuration
        let pool = NIOThreadPool.singleton
        self.database = database
        queue = database.queue
        spool = try SpoolBlobStore(directory: configuration.spoolPath, threadPool: pool)
        mailboxes = MaildirStore(root: configuration.storagePath, hostname: "test-host", threadPool: pool)
        accounts = AccountService(
            users: database.users,
            hasher: Argon2idHasher(threadPool: pool, parameters: .init(timeCost: 1, memoryKiB: 1024, parallelism: 1)))
        let logger = Logger(label: "test")
        quota = QuotaChecker(mailboxes: mailboxes, cacheLifetime: .zero)
        ingress = IngressService(
            configuration: configuration, accounts: accounts, queue: queue, spool: spool, newMail: nil, quota: quota, logger: logger)
        delivery = DeliveryService(
            queue: queue, spool: spool, mailboxes: mailboxes, settings: .init(exclusive: true, pollInterval: .seconds(1)),
            doorbell: Doorbell(), quota: (accounts.users, quota), logger: logger)
    }

    func remove() { try? FileManager.default.removeItem(atPath: directory) }

    func envelope(from: String = "bob@example.org", to recipients: [String], user: String? = nil) -> Envelope {
        func mailbox(_ address: String) -> Mailbox {
            let parts = address.split(separator: "@")
            return Mailbox(localPart: String(parts[0]), domain: String(parts[1]))
        }
        return Envelope(
            reversePath: .mailbox(mailbox(from)), recipients: recipients.map { .mailbox(mailbox($0)) },
            parameters: MailParameters(), heloName: "client.example", usedEHLO: true, authenticatedUser: user,
            tlsActive: false, chunked: false)
    }

    let session = SMTPSessionInfo(clientAddress: "192.0.2.7", clientPort: 40000)

    func count(_ sql: String) async throws -> Int64 {
        try await database.int(sql) ?? -1
    }

    func maildir(_ email: String) throws -> [String] { try mailboxes.messageFiles(of: email) }
}

func withEmbedded(_ backend: DatabaseBackend, _ body: (Embedded) async throws -> Void) async throws {
    try await withTestDatabase(backend) { database in
        let embedded = try Embedded(database: database)
        defer { embedded.remove() }
        try await body(embedded)
    }
}

@Suite("Queue and delivery") struct QueueAndDeliveryTests {
    @Test("routing: local users, local domains, relaying, postmaster", arguments: DatabaseBackend.allCases)
    func routing(_ backend: DatabaseBackend) async throws {
        try await withEmbedded(backend) { e in
            _ = try await e.accounts.create(username: "admin", email: "admin@example.test", password: "Adm1n-Passw0rd", quotaMB: 10, isAdmin: true)
            _ = try await e.accounts.create(username: "alice", email: "alice@example.test", password: "Al1ce-Passw0rd", quotaMB: 10, isAdmin: false)
            _ = try await e.accounts.create(username: "carol", email: "carol@elsewhere.example", password: "Car0l-Passw0rd", quotaMB: 10, isAdmin: false)
            _ = try await e.accounts.create(username: "dave", email: "dave@example.test", password: "Dav3-Passw0rd!", quotaMB: 10, isAdmin: false)
            try await e.accounts.setEnabled(username: "dave", enabled: false)
            func route(_ address: String, auth: Bool = false) async throws -> IngressService.Route {
                let parts = address.split(separator: "@")
                return try await e.ingress.route(.mailbox(Mailbox(localPart: String(parts[0]), domain: String(parts[1]))), authenticated: auth)
            }
            #expect(try await route("alice@example.test") == .local(mailbox: "alice@example.test"))
            #expect(try await route("ALICE@Example.Test") == .local(mailbox: "alice@example.test"))
            #expect(try await route("carol@elsewhere.example") == .local(mailbox: "carol@elsewhere.example"))
            #expect(try await route("nobody@example.test") == .rejected(.userUnknown("nobody@example.test")))
            #expect(try await route("nobody@example.test", auth: true) == .rejected(.userUnknown("nobody@example.test")))
            #expect(try await route("dave@example.test") == .rejected(.userUnknown("dave@example.test")))
            #expect(try await route("x@remote.example") == .rejected(.relayDenied("x@remote.example")))
            #expect(try await route("x@remote.example", auth: true) == .remote(domain: "remote.example"))
            #expect(try await route("postmaster@example.test") == .local(mailbox: "admin@example.test"))
            #expect(try await e.ingress.route(.postmaster, authenticated: false) == .local(mailbox: "admin@example.test"))
        }
    }

    @Test("accept: blob first with a Received header, then the rows; then delivery into maildir, once", arguments: DatabaseBackend.allCases)
    func acceptAndDeliver(_ backend: DatabaseBackend) async throws {
        try await withEmbedded(backend) { e in
            _ = try await e.accounts.create(username: "alice", email: "alice@example.test", password: "Al1ce-Passw0rd", quotaMB: 10, isAdmin: false)
            let content = ByteBuffer(string: "Subject: Hello\r\n there\r\n\r\nBody line\r\n")
            guard case .queued(let id) = await e.ingress.deliver(e.envelope(to: ["alice@example.test"]), content: content, session: e.session) else {
                Issue.record("not queued")
                return
            }
            #expect(id.hasPrefix("msg_") && id.count == 24)
            let blob = try await e.spool.get(key: id)
            let text = String(buffer: blob)
            #expect(text.hasPrefix("Received: from client.example ([192.0.2.7])\r\n\tby mail.example.test (MailTier) with ESMTP id \(id)\r\n\tfor <alice@example.test>; "))
            #expect(text.hasSuffix("\r\nSubject: Hello\r\n there\r\n\r\nBody line\r\n"))
            let row = "FROM queue_messages WHERE id = '\(id)'"
            #expect(try await e.database.text("SELECT subject \(row)") == "Hello there")
            #expect(try await e.database.text("SELECT client_ip \(row)") == "192.0.2.7")
            #expect(try await e.database.int("SELECT size_bytes \(row)") == Int64(blob.readableBytes))
            let digest = SHA256.hash(data: Array(blob.readableBytesView)).map { String(format: "%02x", $0) }.joined()
            #expect(try await e.database.text("SELECT sha256 \(row)") == digest)
            #expect(try await e.count("SELECT COUNT(*) AS n FROM queue_recipients WHERE status = 'pending'") == 1)

            #expect(try await e.delivery.runOnce() == 1)
            let files = try e.maildir("alice@example.test")
            #expect(files.count == 1)
            let stored = try Data(contentsOf: URL(fileURLWithPath: files[0]))
            #expect(stored == Data("Return-Path: <bob@example.org>\r\n".utf8) + Data(blob.readableBytesView))
            #expect(try await e.count("SELECT COUNT(*) AS n FROM queue_messages") == 0, "rows removed once delivered")
            #expect(try await e.spool.list().isEmpty, "blob removed once delivered")
            #expect(try await e.delivery.runOnce() == 0)
        }
    }

    @Test("a spool failure is a 451 and leaves no rows", arguments: DatabaseBackend.allCases)
    func spoolFailure(_ backend: DatabaseBackend) async throws {
        try await withEmbedded(backend) { e in
            _ = try await e.accounts.create(username: "alice", email: "alice@example.test", password: "Al1ce-Passw0rd", quotaMB: 10, isAdmin: false)
            try FileManager.default.removeItem(atPath: e.configuration.spoolPath)
            try Data().write(to: URL(fileURLWithPath: e.configuration.spoolPath))  // a file where the directory was
            let outcome = await e.ingress.deliver(e.envelope(to: ["alice@example.test"]), content: ByteBuffer(string: "x\r\n"), session: e.session)
            guard case .rejected(let reply) = outcome else { Issue.record("queued"); return }
            #expect(reply == .storageFailure)
            #expect(try await e.count("SELECT COUNT(*) AS n FROM queue_messages") == 0)
        }
    }

    @Test("a database failure after the blob is a 451; the orphan blob is collected after the grace period", arguments: DatabaseBackend.allCases)
    func databaseFailure(_ backend: DatabaseBackend) async throws {
        try await withEmbedded(backend) { e in
            _ = try await e.accounts.create(username: "alice", email: "alice@example.test", password: "Al1ce-Passw0rd", quotaMB: 10, isAdmin: false)
            try await e.database.execute("DROP TABLE queue_recipients")
            let outcome = await e.ingress.deliver(e.envelope(to: ["alice@example.test"]), content: ByteBuffer(string: "x\r\n"), session: e.session)
            guard case .rejected(let reply) = outcome else { Issue.record("queued"); return }
            #expect(reply == .storageFailure)
            #expect(try await e.count("SELECT COUNT(*) AS n FROM queue_messages") == 0, "the transaction rolled back")
            #expect(try await e.spool.list().count == 1, "blob first: an orphan is left")
            await e.delivery.collectOrphanBlobs(now: Date())
            #expect(try await e.spool.list().count == 1, "not before the grace period")
            await e.delivery.collectOrphanBlobs(now: Date().addingTimeInterval(3600))
            #expect(try await e.spool.list().isEmpty)
        }
    }

    @Test("a crash between the maildir write and the result does not deliver twice", arguments: DatabaseBackend.allCases)
    func idempotentRetry(_ backend: DatabaseBackend) async throws {
        try await withEmbedded(backend) { e in
            _ = try await e.accounts.create(username: "alice", email: "alice@example.test", password: "Al1ce-Passw0rd", quotaMB: 10, isAdmin: false)
            guard case .queued = await e.ingress.deliver(e.envelope(to: ["alice@example.test"]), content: ByteBuffer(string: "x\r\n"), session: e.session) else {
                Issue.record("not queued")
                return
            }
            // The worker claims, stores into the maildir, and dies before recording the result.
            let jobs = try await e.queue.claimDue(now: Date(), limit: 10, lease: .seconds(300), localOnly: true, makeDeliveryKey: { e.mailboxes.makeDeliveryKey() })
            #expect(jobs.count == 1)
            let crashed = MailboxDelivery(
                mailbox: jobs[0].recipient, messageID: jobs[0].messageID, deliveryKey: jobs[0].deliveryKey, sender: jobs[0].mailFrom,
                receivedAt: jobs[0].receivedAt)
            #expect(try await e.mailboxes.deliver(ByteBuffer(string: "x"), crashed))
            #expect(try await e.delivery.runOnce() == 0, "the lease still holds")
            // Restart: embedded mode releases the dead worker's leases.
            try await e.queue.releaseAllLeases()
            #expect(try await e.delivery.runOnce() == 1)
            #expect(try e.maildir("alice@example.test").count == 1)
            #expect(try await e.count("SELECT COUNT(*) AS n FROM queue_messages") == 0)
        }
    }

    @Test("results are fenced by the lease token", arguments: DatabaseBackend.allCases)
    func fencing(_ backend: DatabaseBackend) async throws {
        try await withEmbedded(backend) { e in
            _ = try await e.accounts.create(username: "alice", email: "alice@example.test", password: "Al1ce-Passw0rd", quotaMB: 10, isAdmin: false)
            _ = await e.ingress.deliver(e.envelope(to: ["alice@example.test"]), content: ByteBuffer(string: "x\r\n"), session: e.session)
            let first = try await e.queue.claimDue(now: Date(), limit: 10, lease: .seconds(1), localOnly: true, makeDeliveryKey: { "key-1" })
            // The lease expires; another worker claims the same job, with the same delivery key.
            let second = try await e.queue.claimDue(now: Date().addingTimeInterval(5), limit: 10, lease: .seconds(300), localOnly: true, makeDeliveryKey: { "key-2" })
            #expect(first.count == 1 && second.count == 1)
            #expect(second[0].deliveryKey == "key-1")
            #expect(first[0].leaseToken != second[0].leaseToken)
            _ = try await e.queue.record([(first[0], .failed(error: "stale worker"))], now: Date())
            #expect(try await e.count("SELECT COUNT(*) AS n FROM queue_recipients WHERE status = 'pending'") == 1, "the stale result was ignored")
            let finished = try await e.queue.record([(second[0], .delivered)], now: Date())
            #expect(finished.count == 1)
        }
    }

    @Test("retries back off and then fail; attempts are counted", arguments: DatabaseBackend.allCases)
    func retries(_ backend: DatabaseBackend) async throws {
        try await withEmbedded(backend) { e in
            _ = try await e.accounts.create(username: "alice", email: "alice@example.test", password: "Al1ce-Passw0rd", quotaMB: 10, isAdmin: false)
            guard case .queued(let id) = await e.ingress.deliver(e.envelope(to: ["alice@example.test"]), content: ByteBuffer(string: "x\r\n"), session: e.session) else {
                Issue.record("not queued")
                return
            }
            try await e.spool.delete(key: id)  // delivery now fails: the blob is gone
            var now = Date()
            for attempt in 1...5 {
                #expect(try await e.delivery.runOnce(now: now) == 1)
                #expect(try await e.database.int("SELECT attempts FROM queue_recipients") == Int64(attempt))
                #expect(try await e.database.text("SELECT status FROM queue_recipients") == (attempt < 5 ? "retry" : "failed"))
                #expect(try await e.delivery.runOnce(now: now) == 0, "not due yet")
                now = now.addingTimeInterval(40_000)
            }
        }
    }

    @Test("quota: a full mailbox is refused at RCPT (452 4.2.2); a message that would overflow it is deferred, then failed", arguments: DatabaseBackend.allCases)
    func quota(_ backend: DatabaseBackend) async throws {
        try await withEmbedded(backend) { e in
            _ = try await e.accounts.create(username: "alice", email: "alice@example.test", password: "Al1ce-Passw0rd", quotaMB: 1, isAdmin: false)
            let alice = ForwardPath.mailbox(Mailbox(localPart: "alice", domain: "example.test"))
            // 0.6 MB fits; a second one would not: deferred.
            let big = ByteBuffer(repeating: UInt8(ascii: "a"), count: 600_000)
            for _ in 0..<2 {
                guard case .queued = await e.ingress.deliver(e.envelope(to: ["alice@example.test"]), content: big, session: e.session) else {
                    Issue.record("not queued")
                    return
                }
            }
            #expect(try await e.delivery.runOnce() == 2)
            #expect(try e.maildir("alice@example.test").count == 1)
            #expect(try await e.database.text("SELECT status FROM queue_recipients") == "retry")
            #expect(try await e.database.text("SELECT last_error FROM queue_recipients") == "mailbox full (quota 1 MB)")
            #expect(await e.ingress.checkRecipient(alice, envelope: e.envelope(to: []), session: e.session) == nil, "not full yet")
            // Fill it: now RCPT is refused.
            try await e.accounts.setQuota(username: "alice", quotaMB: 0)
            let third = ByteBuffer(repeating: UInt8(ascii: "b"), count: 500_000)
            _ = await e.ingress.deliver(e.envelope(to: ["alice@example.test"]), content: third, session: e.session)
            #expect(try await e.delivery.runOnce(now: Date().addingTimeInterval(100_000)) == 2, "quota 0 is unlimited")
            try await e.accounts.setQuota(username: "alice", quotaMB: 1)
            #expect(await e.ingress.checkRecipient(alice, envelope: e.envelope(to: []), session: e.session) == .mailboxFull("alice@example.test"))
        }
    }

    @Test("ETRN makes waiting recipients of a domain due; ATRN checks entitlement", arguments: DatabaseBackend.allCases)
    func etrnAndAtrn(_ backend: DatabaseBackend) async throws {
        try await withEmbedded(backend) { e in
            _ = try await e.accounts.create(username: "alice", email: "alice@example.test", password: "Al1ce-Passw0rd", quotaMB: 10, isAdmin: false)
            _ = await e.ingress.deliver(e.envelope(to: ["x@remote.example"], user: "alice"), content: ByteBuffer(string: "x\r\n"), session: e.session)
            #expect(try await e.queue.waitingCount(domain: "remote.example") == 1)
            try await e.database.execute("UPDATE queue_recipients SET next_retry = 9999999999")
            #expect(await e.ingress.etrn(domain: "remote.example", session: e.session) == .queuingStarted("remote.example"))
            #expect(try await e.count("SELECT COUNT(*) AS n FROM queue_recipients WHERE next_retry < 9999999999") == 1)
            #expect(await e.ingress.atrn(domains: ["remote.example"], user: "alice", session: e.session).reply == .atrnRefused("remote.example"))
            #expect(await e.ingress.atrn(domains: ["example.test"], user: "alice", session: e.session).reply == .noMail)
            #expect(try await e.delivery.runOnce() == 0, "remote recipients wait for the outbound transport")
        }
    }
    @Test("PostgreSQL unreachable: RCPT and the end of data get 451 4.3.0 within the bound; 250 again once it is back, without a restart")
    func postgresOutage() async throws {
        guard let url = ExternalBackends.variable("MAILTIER_TEST_POSTGRES_URL"), var parts = URLComponents(string: url) else { return }
        // The shared PostgreSQL keeps running: the client reaches it through a proxy, which goes away.
        let proxy = TCPProxy(to: parts.host ?? "127.0.0.1", port: parts.port ?? 5432)
        try await proxy.start()
        parts.port = proxy.port
        let proxied = try #require(parts.string)
        // The schema is made (and dropped) directly; the node under test reaches it through the
        // proxy, with the production bounds. It connects (and migrates, finding nothing to do)
        // before the outage, with retries: on a loaded test machine a first connection may take
        // longer than the bound.
        // Each step is logged: a run that never ends shows where it stopped.
        func step(_ text: String) { print("postgresOutage: \(text)") }
        step("proxy on port \(proxy.port)")
        try await withPostgresSchema(url: url) { setup in
            step("schema \(setup.schema ?? "") migrated")
            let postgres = try MailTierPostgres.PostgresDatabase(url: proxied, schema: setup.schema, limits: .init())
            try await withThrowingDiscardingTaskGroup { group in
                group.addTask { await postgres.run() }
                defer { group.cancelAll() }
                let warm = ContinuousClock.now
                while (try? await postgres.migrate()) == nil {
                    try #require(ContinuousClock.now - warm < .seconds(30), "no connection through the proxy within 30 s")
                }
                step("connected through the proxy")
                try await outage(through: proxy, postgres, step: step)
                step("done; stopping the client")
            }
        }
        step("schema dropped")
        await proxy.stop()
    }

    private func outage(through proxy: TCPProxy, _ postgres: MailTierPostgres.PostgresDatabase, step: (String) -> Void) async throws {
        let e = try Embedded(database: TestDatabase(backend: .postgres, sqlite: nil, postgres: postgres))
        defer { e.remove() }
        _ = try await e.accounts.create(username: "alice", email: "alice@example.test", password: "Al1ce-Passw0rd", quotaMB: 10, isAdmin: false)
        let alice = ForwardPath.mailbox(Mailbox(localPart: "alice", domain: "example.test"))
        let content = ByteBuffer(string: "Subject: outage\r\n\r\nx\r\n")
        guard case .queued = await e.ingress.deliver(e.envelope(to: ["alice@example.test"]), content: content, session: e.session) else {
            Issue.record("not queued while PostgreSQL is reachable")
            return
        }
        step("queued before the outage")

        await proxy.stop()
        let bound = postgres.limits.connectionWait
        let clock = ContinuousClock()
        var reply: SMTPReply?
        let rcptTime = await clock.measure {
            reply = await e.ingress.checkRecipient(alice, envelope: e.envelope(to: []), session: e.session)
        }
        #expect(reply?.code == 451 && reply?.enhancedCode == EnhancedStatusCode(4, 3, 0), "RCPT: \(String(describing: reply))")
        #expect(rcptTime < bound + .seconds(2), "RCPT answered after \(rcptTime)")
        var outcome: SMTPDeliveryOutcome?
        let dataTime = await clock.measure {
            outcome = await e.ingress.deliver(e.envelope(to: ["alice@example.test"]), content: content, session: e.session)
        }
        guard case .rejected(let rejection) = outcome else {
            Issue.record("queued while PostgreSQL is unreachable")
            return
        }
        #expect(rejection == .storageFailure && rejection.code == 451 && rejection.enhancedCode == EnhancedStatusCode(4, 3, 0))
        #expect(dataTime < bound + .seconds(2), "the end of data was answered after \(dataTime)")
        #expect(try await e.spool.list().count == 1, "nothing was spooled for the refused message")

        step("refused during the outage")
        // Back: the pool reconnects by itself.
        try await proxy.start()
        let reconnect = clock.now
        var queued = false
        while !queued && clock.now - reconnect < .seconds(30) {
            if case .queued = await e.ingress.deliver(e.envelope(to: ["alice@example.test"]), content: content, session: e.session) {
                queued = true
            } else {
                try await Task.sleep(for: .milliseconds(200))
            }
        }
        #expect(queued, "still refused 30 s after PostgreSQL came back")
        #expect(try await e.count("SELECT COUNT(*) AS n FROM queue_messages") >= 2)
    }
}
