import Foundation
import PostgresNIO
import Testing

@testable import MailTier
@testable import MailTierPostgres

// The queue and the user store on a real PostgreSQL, where several processes share them: claims
// under SKIP LOCKED, fenced results, messages finished by two workers at once, duplicate users.
// The cases they share with SQLite run on both in MailTierTests (QueueAndDeliveryTests,
// AccountTests); these are PostgreSQL's own. Every test has a schema of its own, dropped at the end.

private let now = Date(timeIntervalSince1970: 1_761_220_800)

private func message(_ id: String, at date: Date = now) -> QueuedMessage {
    QueuedMessage(
        id: id, blobKey: "blob-\(id)", sha256: String(repeating: "0", count: 64), sizeBytes: 10, mailFrom: "bob@example.org",
        subject: "Subject \(id)", smtputf8: false, bodyType: nil, deliverBy: nil, deliverByMode: nil, clientAddress: "192.0.2.7",
        heloName: "client.example", authenticatedUser: nil, createdAt: date)
}

private func recipients(_ count: Int, of id: String) -> [QueuedRecipient] {
    (0..<count).map { QueuedRecipient(address: "user\($0)@example.test", domain: "example.test", isLocal: true) }
}

@Suite(TestServices.postgres) struct PostgresQueueTests {
    @Test func enqueueWritesTheMessageAndEveryRecipientInOneStatement() async throws {
        try await withPostgresDatabases(count: 1) { databases in
            let queue = PostgresMessageQueue(database: databases[0])
            var queued = message("msg_one")
            queued.subject = "with a NUL\u{0} in it"
            queued.deliverBy = now.addingTimeInterval(3600)
            try await queue.enqueue(queued, recipients: recipients(3, of: "msg_one"), maxAttempts: 7)
            let rows = try await databases[0].query(
                """
                SELECT m.subject, m.created_at, r.recipient, r.status, r.attempts, r.max_attempts, r.next_retry, r.deliver_by
                FROM queue_messages m JOIN queue_recipients r ON r.message_id = m.id ORDER BY r.id
                """)
            #expect(rows.count == 3)
            for (index, row) in rows.enumerated() {
                let (subject, created, recipient, status, attempts, maxAttempts, nextRetry, deliverBy) = try row.decode(
                    (String, Int64, String, String, Int, Int, Int64, Int64?).self)
                #expect(subject == "with a NUL  in it")
                #expect(created == now.unixSeconds && nextRetry == now.unixSeconds)
                #expect(recipient == "user\(index)@example.test")
                #expect(status == "pending" && attempts == 0 && maxAttempts == 7)
                #expect(deliverBy == now.unixSeconds + 3600)
            }
            // A failing recipient insert takes the message with it.
            await #expect(throws: PostgresDatabaseError.self) {
                try await queue.enqueue(message("msg_two"), recipients: recipients(1, of: "x") + recipients(1, of: "x"), maxAttempts: 5)
            }
            #expect(try await queue.referencedBlobKeys() == ["blob-msg_one"])
            // Durable before the 250, whatever the server's default.
            #expect(try await databases[0].query("SHOW synchronous_commit").first?.decode(String.self) == "on")
        }
    }

    @Test func concurrentClaimersNeverGetTheSameJob() async throws {
        try await withPostgresDatabases(count: 3) { databases in
            let queue = PostgresMessageQueue(database: databases[0])
            for index in 0..<20 {
                try await queue.enqueue(message("msg_\(index)"), recipients: recipients(10, of: "msg_\(index)"), maxAttempts: 5)
            }
            // Two workers (two pools, as two processes) claim in small batches until nothing is left.
            let claimed = try await withThrowingTaskGroup(of: [Int64].self) { group in
                for database in databases.dropFirst() {
                    group.addTask {
                        let worker = PostgresMessageQueue(database: database)
                        var ids: [Int64] = []
                        while true {
                            let jobs = try await worker.claimDue(
                                now: now, limit: 7, lease: .seconds(300), localOnly: true, makeDeliveryKey: { MessageID.make() })
                            if jobs.isEmpty { return ids }
                            ids += jobs.map(\.id)
                        }
                    }
                }
                return try await group.reduce(into: [[Int64]]()) { $0.append($1) }
            }
            let all = claimed.flatMap { $0 }
            #expect(all.count == 200)
            #expect(Set(all).count == 200, "a job was claimed twice")
            #expect(claimed.allSatisfy { !$0.isEmpty }, "both workers claimed: \(claimed.map(\.count))")
        }
    }

    @Test func claimingSkipsRowsLockedByAnotherTransactionWithoutWaiting() async throws {
        try await withPostgresDatabases(count: 2) { databases in
            let queue = PostgresMessageQueue(database: databases[0])
            try await queue.enqueue(message("msg_locked"), recipients: recipients(4, of: "msg_locked"), maxAttempts: 5)
            let ids = try await databases[0].query("SELECT id FROM queue_recipients ORDER BY id").map { try $0.decode(Int64.self) }
            let locked = Array(ids.prefix(2))
            // Another worker's claim in progress: it holds two rows until its transaction ends.
            let holding = AsyncStream<Void>.makeStream()
            let release = AsyncStream<Void>.makeStream()
            async let holder: Void = {
                defer { holding.continuation.finish() }  // also when the transaction fails: nothing waits forever
                try await databases[1].transaction { transaction in
                    try await transaction.query("SELECT id FROM queue_recipients WHERE id = ANY(\(locked)) FOR UPDATE")
                    holding.continuation.yield()
                    for await _ in release.stream {}
                }
            }()
            for await _ in holding.stream { break }
            let clock = ContinuousClock()
            var jobs: [DeliveryJob] = []
            let took = try await clock.measure {
                jobs = try await queue.claimDue(now: now, limit: 10, lease: .seconds(300), localOnly: true, makeDeliveryKey: { "k" })
            }
            release.continuation.finish()
            try await holder
            #expect(Set(jobs.map(\.id)) == Set(ids.dropFirst(2)))
            #expect(took < .seconds(2), "the claim waited for the lock: \(took)")
            // Once the other transaction ended without claiming, its rows are due again.
            let rest = try await queue.claimDue(now: now, limit: 10, lease: .seconds(300), localOnly: true, makeDeliveryKey: { "k" })
            #expect(Set(rest.map(\.id)) == Set(locked))
        }
    }

    @Test func aResultWithAStaleLeaseTokenIsIgnored() async throws {
        try await withPostgresDatabases(count: 2) { databases in
            let first = PostgresMessageQueue(database: databases[0])
            let second = PostgresMessageQueue(database: databases[1])
            try await first.enqueue(message("msg_fenced"), recipients: recipients(1, of: "msg_fenced"), maxAttempts: 5)
            let stale = try await first.claimDue(now: now, limit: 10, lease: .seconds(1), localOnly: true, makeDeliveryKey: { "key-1" })
            #expect(try await second.claimDue(now: now, limit: 10, lease: .seconds(300), localOnly: true, makeDeliveryKey: { "key-2" }).isEmpty,
                    "the lease holds")
            // The lease expires; the other worker claims the job again, keeping its delivery key.
            let fresh = try await second.claimDue(
                now: now.addingTimeInterval(5), limit: 10, lease: .seconds(300), localOnly: true, makeDeliveryKey: { "key-2" })
            try #require(stale.count == 1 && fresh.count == 1)
            #expect(fresh[0].deliveryKey == "key-1")
            #expect(fresh[0].leaseToken != stale[0].leaseToken)

            #expect(try await first.record([(stale[0], .failed(error: "stale worker"))], now: now) == [])
            let row = try #require(try await databases[0].query("SELECT status, attempts, last_error, lease_token FROM queue_recipients").first)
            let (status, attempts, lastError, token) = try row.decode((String, Int, String?, String?).self)
            #expect(status == "pending" && attempts == 0 && lastError == nil && token == fresh[0].leaseToken, "the stale result changed the row")

            #expect(try await second.record([(fresh[0], .retry(error: "try later", at: now.addingTimeInterval(60)))], now: now) == [])
            let retried = try #require(try await databases[0].query("SELECT status, attempts, next_retry, lease_token FROM queue_recipients").first)
            let (retryStatus, retryAttempts, nextRetry, leaseToken) = try retried.decode((String, Int, Int64, String?).self)
            #expect(retryStatus == "retry" && retryAttempts == 1 && nextRetry == now.unixSeconds + 60 && leaseToken == nil)
            // Recording again with the used token changes nothing either.
            #expect(try await second.record([(fresh[0], .delivered)], now: now) == [])
            #expect(try await count(databases[0], "SELECT COUNT(*) FROM queue_recipients WHERE status = 'retry'") == 1)
        }
    }

    @Test func twoWorkersFinishingOneMessageRemoveItExactlyOnce() async throws {
        try await withPostgresDatabases(count: 3) { databases in
            let queue = PostgresMessageQueue(database: databases[0])
            for index in 0..<15 {
                try await queue.enqueue(message("msg_pair\(index)"), recipients: recipients(2, of: "msg_pair\(index)"), maxAttempts: 5)
            }
            let jobs = try await queue.claimDue(now: now, limit: 100, lease: .seconds(300), localOnly: true, makeDeliveryKey: { "k" })
            #expect(jobs.count == 30)
            // Each message's two recipients are recorded by two workers at the same time.
            let byMessage = Dictionary(grouping: jobs, by: \.messageID)
            let finished = try await withThrowingTaskGroup(of: [String].self) { group in
                for (worker, database) in databases.dropFirst().enumerated() {
                    let mine = byMessage.values.map { $0[worker] }
                    group.addTask {
                        var keys: [String] = []
                        for job in mine {
                            keys += try await PostgresMessageQueue(database: database).record([(job, .delivered)], now: now)
                        }
                        return keys
                    }
                }
                return try await group.reduce(into: [String]()) { $0 += $1 }
            }
            #expect(finished.sorted() == (0..<15).map { "blob-msg_pair\($0)" }.sorted())
            #expect(try await count(databases[0], "SELECT COUNT(*) FROM queue_messages") == 0)
            #expect(try await count(databases[0], "SELECT COUNT(*) FROM queue_recipients") == 0)
        }
    }

    @Test func leasesDomainsAndBlobKeys() async throws {
        try await withPostgresDatabases(count: 1) { databases in
            let queue = PostgresMessageQueue(database: databases[0])
            try await queue.enqueue(
                message("msg_remote"),
                recipients: [
                    QueuedRecipient(address: "x@remote.example", domain: "remote.example", isLocal: false),
                    QueuedRecipient(address: "alice@example.test", domain: "example.test", isLocal: true),
                ], maxAttempts: 5)
            #expect(try await queue.claimDue(now: now, limit: 10, lease: .seconds(300), localOnly: true, makeDeliveryKey: { "k" })
                .map(\.recipient) == ["alice@example.test"])
            #expect(try await queue.claimDue(now: now, limit: 10, lease: .seconds(300), localOnly: false, makeDeliveryKey: { "k" })
                .map(\.recipient) == ["x@remote.example"])
            #expect(try await queue.claimDue(now: now, limit: 10, lease: .seconds(300), localOnly: false, makeDeliveryKey: { "k" }).isEmpty)
            try await queue.releaseAllLeases()
            #expect(try await queue.claimDue(now: now, limit: 10, lease: .seconds(300), localOnly: false, makeDeliveryKey: { "k" }).count == 2)
            #expect(try await queue.waitingCount(domain: "remote.example") == 1)
            try await databases[0].query("UPDATE queue_recipients SET next_retry = 9999999999")
            #expect(try await queue.makeDue(domain: "remote.example", now: now) == 1)
            #expect(try await queue.makeDue(domain: "nowhere.example", now: now) == 0)
            #expect(try await count(databases[0], "SELECT COUNT(*) FROM queue_recipients WHERE next_retry = \(now.unixSeconds)") == 1)
            #expect(try await queue.referencedBlobKeys() == ["blob-msg_remote"])
        }
    }

    @Test func usersDuplicatesMapToTheStoreErrors() async throws {
        try await withPostgresDatabases(count: 1) { databases in
            let store = PostgresUserStore(database: databases[0])
            _ = try await store.create(username: "john", email: "John@Example.com", passwordHash: "h", quotaMB: 1, isAdmin: false)
            // Concurrent creators of one name: exactly one wins, the others get duplicateUsername.
            let results = await withTaskGroup(of: Result<User, UserStoreError>.self) { group in
                for index in 0..<8 {
                    group.addTask {
                        do {
                            return .success(try await store.create(
                                username: "jane", email: "jane\(index)@example.com", passwordHash: "h", quotaMB: 1, isAdmin: false))
                        } catch let error as UserStoreError {
                            return .failure(error)
                        } catch {
                            Issue.record("unexpected error \(String(reflecting: error))")
                            return .failure(.notFound)
                        }
                    }
                }
                return await group.reduce(into: [Result<User, UserStoreError>]()) { $0.append($1) }
            }
            #expect(results.filter { (try? $0.get()) != nil }.count == 1)
            #expect(results.filter { $0 == .failure(.duplicateUsername) }.count == 7)
            // Email addresses ignore ASCII case only, as SQLite's NOCASE: Ü and ü are different letters there.
            await #expect(throws: UserStoreError.duplicateEmail) {
                _ = try await store.create(username: "johnny", email: "JOHN@EXAMPLE.COM", passwordHash: "h", quotaMB: 1, isAdmin: false)
            }
            _ = try await store.create(username: "mueller1", email: "müller@example.de", passwordHash: "h", quotaMB: 1, isAdmin: false)
            _ = try await store.create(username: "mueller2", email: "MÜLLER@example.de", passwordHash: "h", quotaMB: 1, isAdmin: false)
            #expect(try await store.user(email: "MüLLER@EXAMPLE.DE")?.username == "mueller1")
            #expect(try await store.count() == 4)
        }
    }
}

@Suite("PostgreSQL writes are committed before they are reported")
struct PostgresWriteCommitTests {
    /// Anything but a plain SELECT goes through BEGIN … COMMIT (see `PostgresDatabase.query`).
    @Test func onlyPlainSelectsRunWithoutATransaction() {
        for read in ["SELECT 1", "  select id FROM users", "SELECT\n*", "SELECT(1)"] {
            #expect(PostgresDatabase.isReadOnly(read), "\(read)")
        }
        for write in [
            "INSERT INTO t VALUES (1)", "UPDATE t SET a = 1", "DELETE FROM t", "WITH m AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM m",
            "SELECTED", "", "  ",
        ] {
            #expect(!PostgresDatabase.isReadOnly(write), "\(write)")
        }
    }
}
