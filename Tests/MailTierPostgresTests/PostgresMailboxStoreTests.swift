import Foundation
import NIOCore
import PostgresNIO
import Testing

@testable import MailTier
@testable import MailTierPostgres

// The database mailbox store and index over a real PostgreSQL (scripts/test-services.sh). Each
// test has its own schema, dropped at the end.

/// PostgresNIO has a `PostgresDatabase` protocol of its own.
typealias Database = MailTierPostgres.PostgresDatabase

private let alice = "alice@example.test"
private let bob = "bob@example.test"
private let received = Date(timeIntervalSince1970: 1_761_220_800)

func uniqueSchema() -> String {
    "mailtier_test_" + String(UInt64.random(in: 0...UInt64.max), radix: 16)
}

/// Why a test's body failed, with PostgreSQL's details (`PSQLError.description` hides them).
struct PostgresTestFailure: Error, CustomStringConvertible {
    var description: String
}

/// Runs `body` with the clients of `count` databases on one fresh schema, each client running in
/// the task group until the end; drops the schema afterwards.
func withPostgresDatabases(
    count: Int, migrate: Bool = true, _ body: ([Database]) async throws -> Void
) async throws {
    guard let url = TestServices.requirePostgresURL() else { return }
    let schema = uniqueSchema()
    // Patient: dozens of tests open their pools at once on two cores (the bounds are tested elsewhere).
    let databases = try (0..<count).map { _ in try Database(url: url, schema: schema, limits: .init(connectionWait: .seconds(30))) }
    try await withThrowingDiscardingTaskGroup { group in
        for database in databases {
            group.addTask { await database.run() }
        }
        defer { group.cancelAll() }
        var failure: (any Error)?
        do {
            if migrate {
                // Every client checks the schema once (the first migrates), as each process does.
                for database in databases { try await database.migrate() }
            }
            try await body(databases)
        } catch {
            failure = error
        }
        try await databases[0].query("DROP SCHEMA IF EXISTS \(unescaped: schema) CASCADE")
        if let failure { throw PostgresTestFailure(description: String(reflecting: failure)) }
    }
}

/// One migrated database on a fresh schema; the store through its two ports, so that `list` is not ambiguous.
private func withPostgresStore(
    _ body: (_ store: any SearchableMailboxStore, _ index: any MailboxIndex, _ database: Database) async throws -> Void
) async throws {
    try await withPostgresDatabases(count: 1) { databases in
        let store = PostgresMailboxStore(database: databases[0])
        try await body(store, store, databases[0])
    }
}

private func pgDelivery(_ mailbox: String, _ id: String, folder: String = "INBOX", at date: Date = received) -> MailboxDelivery {
    MailboxDelivery(mailbox: mailbox, folder: folder, messageID: id, deliveryKey: MessageID.make(), sender: "bob@example.org", receivedAt: date)
}

private func pgMessage(_ subject: String, body: String = "Hello there\r\n") -> ByteBuffer {
    ByteBuffer(string: "From: Bob <bob@example.org>\r\nTo: alice@example.test\r\nSubject: \(subject)\r\n\r\n\(body)")
}

private func indexEntry(_ mailbox: String, _ id: String, location: String, size: Int = 100, subject: String? = "Indexed") -> MailboxIndexEntry {
    MailboxIndexEntry(
        mailbox: mailbox, folder: "INBOX", messageID: id, location: location, size: size, date: received, flags: [],
        subject: subject, from: "Bob <bob@example.org>", to: alice, headers: "Subject: \(subject ?? "")")
}

func count(_ database: Database, _ query: PostgresQuery) async throws -> Int {
    try await database.query(query).first?.decode(Int.self) ?? -1
}

// MARK: - Without a server

@Suite struct PostgresURLTests {
    @Test func parsesTheURL() throws {
        let configuration = try Database.configuration(url: "postgres://mail%40tier:p%40ss%3Aw%2Fd@db.example.net:6543/mail_db?sslmode=require")
        #expect(configuration.host == "db.example.net")
        #expect(configuration.port == 6543)
        #expect(configuration.username == "mail@tier")
        #expect(configuration.password == "p@ss:w/d")
        #expect(configuration.database == "mail_db")

        let local = try Database.configuration(url: "postgresql://postgres@127.0.0.1/")
        #expect(local.port == 5432)
        #expect(local.password == nil)
        #expect(local.database == nil)
        #expect(try Database.configuration(url: "postgres://u:p@[::1]:5433/d").host == "::1")
    }

    @Test func loopbackHostsNeedNoTLS() {
        #expect(Database.isLoopback("127.0.0.1"))
        #expect(Database.isLoopback("127.1.2.3"))
        #expect(Database.isLoopback("::1"))
        #expect(Database.isLoopback("LocalHost"))
        #expect(!Database.isLoopback("db.example.net"))
        #expect(!Database.isLoopback("10.0.0.1"))
    }

    @Test(arguments: [
        "mysql://u:p@host/db", "postgres://host/db", "postgres://u:p@/db", "postgres://u:p@host:0/db",
        "postgres://u:p@host/db/extra", "postgres://u:p@host/db?sslmode=sometimes", "postgres://u:p@host/db?application_name=x",
        "not a url",
    ])
    func rejectsBadURLsWithoutEchoingThem(url: String) {
        #expect {
            try Database.configuration(url: url)
        } throws: { error in
            guard let error = error as? PostgresURLError else { return false }
            return !error.description.contains(":p@")
        }
    }

    @Test func rejectsUnsafeSchemaNames() {
        for schema in ["", "Public", "a-b", "x; DROP TABLE messages", "1abc", String(repeating: "a", count: 64)] {
            #expect(throws: PostgresURLError.self) { try Database(url: "postgres://u@127.0.0.1/db", schema: schema) }
        }
        #expect(Database.isPlainIdentifier("mailtier_test_0f"))
    }

    @Test func searchWordsAndBodyText() {
        #expect(PostgresSearchText.words("NEAR(a \"b\" OR c* col:d") == ["NEAR", "a", "b", "OR", "c", "col", "d"])
        #expect(PostgresSearchText.words(" * \" ( & | ! <-> ").isEmpty)
        #expect(PostgresSearchText.body(of: ByteBuffer(string: "Subject: s\r\nX: headerword\r\n\r\nbody text")) == "body text")
        #expect(PostgresSearchText.body(of: ByteBuffer(string: "Subject: only headers\r\n")) == "")
        #expect(PostgresSearchText.withoutNUL("a\0b") == "a b")
    }
}

// MARK: - Against PostgreSQL

@Suite(TestServices.postgres) struct PostgresMailboxStoreTests {
    @Test func migrationsRunTwiceAreANoOp() async throws {
        try await withPostgresDatabases(count: 1) { (databases: [Database]) async throws in
            let database = databases[0]
            let all = Array(1...Database.currentVersion)
            #expect(try await database.appliedMigrations() == all)
            let store = PostgresMailboxStore(database: database)
            #expect(try await store.deliver(pgMessage("Kept"), pgDelivery(alice, "msg_kept")))
            #expect(try await database.migrate() == [])
            #expect(try await database.migrate() == [])
            #expect(try await database.appliedMigrations() == all)
            #expect(try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg_kept") == pgMessage("Kept"))
        }
    }

    @Test func concurrentMigratorsBothSucceedAndMigrateOnce() async throws {
        try await withPostgresDatabases(count: 2, migrate: false) { databases in
            async let first = databases[0].migrate()
            async let second = databases[1].migrate()
            let (applied1, applied2) = try await (first, second)
            let all = Array(1...Database.currentVersion)
            #expect([applied1, applied2].sorted { $0.count < $1.count } == [[], all], "one of them migrated, the other found nothing to do")
            #expect(try await databases[0].appliedMigrations() == all)
            #expect(try await databases[1].appliedMigrations() == all)
            #expect(try await PostgresMailboxStore(database: databases[1]).deliver(pgMessage("After"), pgDelivery(alice, "msg_after")))
        }
    }

    @Test func refusesASchemaFromANewerVersion() async throws {
        try await withPostgresDatabases(count: 1) { databases in
            try await databases[0].query("INSERT INTO schema_migrations (version) VALUES (99)")
            await #expect(throws: PostgresMigrationError.self) { try await databases[0].migrate() }
        }
    }

    @Test func deliverListFetch() async throws {
        try await withPostgresStore { store, index, _ in
            let content = pgMessage("First", body: "From the start\r\n.dot\r\n\r\nend\r\n")
            #expect(try await store.deliver(content, pgDelivery(alice, "msg_first")))
            let (messages, total) = try await store.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 10)
            #expect(total == 1)
            #expect(messages == [
                StoredMessage(
                    id: "msg_first", folder: "INBOX", size: content.readableBytes, date: received, flags: [], subject: "First",
                    from: "Bob <bob@example.org>")
            ])
            #expect(try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg_first") == content)
            #expect(try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg_none") == nil)
            #expect(try await store.fetch(mailbox: bob, folder: "INBOX", id: "msg_first") == nil)
            #expect(try await store.fetch(mailbox: alice, folder: "Archive", id: "msg_first") == nil)
            #expect(try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg\0first") == nil)

            let entry = try #require(try await index.entry(mailbox: alice, folder: "INBOX", messageID: "msg_first"))
            #expect(entry.to == "alice@example.test")
            #expect(entry.headers == "From: Bob <bob@example.org>\nTo: alice@example.test\nSubject: First")
            #expect(entry.location == "")
        }
    }

    @Test func binaryEmptyAndNULMessagesComeBackExactly() async throws {
        try await withPostgresStore { (store, _, _) async throws in
            let binary = ByteBuffer(bytes: [UInt8](0...255) + [0, 0, 0xFF, 0xFE])
            #expect(try await store.deliver(binary, pgDelivery(alice, "msg_binary")))
            #expect(try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg_binary") == binary)
            #expect(try await store.deliver(ByteBuffer(), pgDelivery(alice, "msg_empty")))
            #expect(try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg_empty") == ByteBuffer())
            // NUL in the header section and the body: stored exactly, indexed without it.
            let withNUL = ByteBuffer(string: "Subject: nul\0subject\r\n\r\nnul\0body\r\n")
            #expect(try await store.deliver(withNUL, pgDelivery(alice, "msg_nul")))
            #expect(try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg_nul") == withNUL)
            #expect(try await store.search(mailbox: alice, query: "body", limit: 10).map(\.id) == ["msg_nul"])
            #expect(try await store.usageBytes(of: alice) == Int64(binary.readableBytes + withNUL.readableBytes))
        }
    }

    @Test func listingIsOldestFirstThenByInsertionAndPaged() async throws {
        try await withPostgresStore { store, _, _ in
            for (id, day) in [("msg_c", 2.0), ("msg_a", 0), ("msg_b1", 1), ("msg_b2", 1)] {
                #expect(try await store.deliver(pgMessage(id), pgDelivery(alice, id, at: received + day * 86_400)))
            }
            let all = try await store.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 10)
            #expect(all.total == 4)
            #expect(all.messages.map(\.id) == ["msg_a", "msg_b1", "msg_b2", "msg_c"])
            #expect(all.messages.map(\.date) == [0.0, 1, 1, 2].map { received + $0 * 86_400 })
            let page = try await store.list(mailbox: alice, folder: "INBOX", offset: 1, limit: 2)
            #expect(page.total == 4)
            #expect(page.messages.map(\.id) == ["msg_b1", "msg_b2"])
            #expect(try await store.list(mailbox: alice, folder: "INBOX", offset: 4, limit: 2) == ([], 4))
            #expect(try await store.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 0) == ([], 4))
            #expect(try await store.list(mailbox: alice, folder: "Archive", offset: 0, limit: 10) == ([], 0))
        }
    }

    @Test func deleteFlagsUsageAndDeleteMailbox() async throws {
        try await withPostgresStore { store, _, _ in
            let keep = pgMessage("Keep")
            let drop = pgMessage("Drop", body: "a longer body than the other one\r\n")
            let archived = pgMessage("Archived")
            #expect(try await store.deliver(keep, pgDelivery(alice, "msg_keep")))
            #expect(try await store.deliver(drop, pgDelivery(alice, "msg_drop")))
            #expect(try await store.deliver(archived, pgDelivery(alice, "msg_archived", folder: "Archive")))
            #expect(try await store.deliver(keep, pgDelivery(bob, "msg_keep")))
            #expect(try await store.usageBytes(of: alice) == Int64(keep.readableBytes + drop.readableBytes + archived.readableBytes))

            #expect(try await store.setFlags([.seen, .flagged], mailbox: alice, folder: "INBOX", id: "msg_keep"))
            #expect(try await store.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 10).messages.first?.flags == [.seen, .flagged])
            #expect(try await store.setFlags([], mailbox: alice, folder: "INBOX", id: "msg_keep"))
            #expect(try await store.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 10).messages.first?.flags == [])
            #expect(try await store.setFlags([.seen], mailbox: alice, folder: "INBOX", id: "msg_none") == false)
            #expect(try await store.list(mailbox: bob, folder: "INBOX", offset: 0, limit: 10).messages.first?.flags == [])

            #expect(try await store.delete(mailbox: alice, folder: "INBOX", id: "msg_drop"))
            #expect(try await store.delete(mailbox: alice, folder: "INBOX", id: "msg_drop") == false)
            #expect(try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg_drop") == nil)
            #expect(try await store.usageBytes(of: alice) == Int64(keep.readableBytes + archived.readableBytes))

            try await store.deleteMailbox(alice)
            #expect(try await store.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 10).total == 0)
            #expect(try await store.list(mailbox: alice, folder: "Archive", offset: 0, limit: 10).total == 0)
            #expect(try await store.usageBytes(of: alice) == 0)
            #expect(try await store.usageBytes(of: "nobody@example.test") == 0)
            #expect(try await store.fetch(mailbox: bob, folder: "INBOX", id: "msg_keep") == keep, "other mailboxes are untouched")
        }
    }

    @Test func redeliveryIsIdempotent() async throws {
        try await withPostgresStore { store, _, database in
            #expect(try await store.deliver(pgMessage("Once"), pgDelivery(alice, "msg_once")))
            #expect(try await store.deliver(pgMessage("Twice"), pgDelivery(alice, "msg_once")) == false)
            let listed = try await store.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 10)
            #expect(listed.total == 1)
            #expect(listed.messages.map(\.subject) == ["Once"])
            #expect(try await count(database, "SELECT COUNT(*) FROM messages") == 1)
            #expect(try await store.deliver(pgMessage("Once"), pgDelivery(alice, "msg_once", folder: "Archive")))
        }
    }

    @Test func concurrentRedeliveriesStoreOneRow() async throws {
        try await withPostgresStore { store, _, database in
            let results = try await withThrowingTaskGroup(of: Bool.self) { group in
                for _ in 0..<8 {
                    group.addTask { try await store.deliver(pgMessage("Race"), pgDelivery(alice, "msg_race")) }
                }
                return try await group.reduce(into: [Bool]()) { $0.append($1) }
            }
            #expect(results.filter { $0 }.count == 1)
            #expect(try await count(database, "SELECT COUNT(*) FROM messages") == 1)
        }
    }

    @Test func oneMessageToTwoUsersIsTwoRows() async throws {
        try await withPostgresStore { (store, _, database) async throws in
            let content = pgMessage("For both")
            #expect(try await store.deliver(content, pgDelivery(alice, "msg_both")))
            #expect(try await store.deliver(content, pgDelivery(bob, "msg_both")))
            #expect(try await count(database, "SELECT COUNT(*) FROM messages") == 2)
            #expect(try await store.delete(mailbox: alice, folder: "INBOX", id: "msg_both"))
            #expect(try await store.fetch(mailbox: bob, folder: "INBOX", id: "msg_both") == content)
            #expect(try await store.search(mailbox: bob, query: "both", limit: 10).map(\.id) == ["msg_both"])
        }
    }

    @Test func rejectsEmptyMailboxAndFolder() async throws {
        try await withPostgresStore { store, _, _ in
            await #expect(throws: MailboxError.self) { try await store.deliver(pgMessage("x"), pgDelivery("", "msg_x")) }
            await #expect(throws: MailboxError.self) { try await store.deliver(pgMessage("x"), pgDelivery(alice, "msg_x", folder: "")) }
            await #expect(throws: MailboxError.self) { try await store.deliver(pgMessage("x"), pgDelivery("a\0b", "msg_x")) }
        }
    }

    // MARK: Full text

    @Test func searchFindsWordsInSubjectAndBody() async throws {
        try await withPostgresStore { store, _, _ in
            #expect(try await store.deliver(pgMessage("Quarterly report", body: "Numbers attached.\r\n"), pgDelivery(alice, "msg_report")))
            #expect(try await store.deliver(pgMessage("Lunch", body: "Shall we meet at the café near the station?\r\n"), pgDelivery(alice, "msg_lunch")))
            #expect(try await store.deliver(pgMessage("Quarterly lunch", body: "Only for Bob.\r\n"), pgDelivery(bob, "msg_bob")))

            #expect(try await store.search(mailbox: alice, query: "QUARTERLY", limit: 10).map(\.id) == ["msg_report"], "subject, case-insensitive")
            #expect(try await store.search(mailbox: alice, query: "station", limit: 10).map(\.id) == ["msg_lunch"], "body")
            #expect(try await store.search(mailbox: alice, query: "café", limit: 10).map(\.id) == ["msg_lunch"])
            #expect(try await store.search(mailbox: alice, query: "lunch station", limit: 10).map(\.id) == ["msg_lunch"], "two words")
            #expect(try await store.search(mailbox: alice, query: "quarterly station", limit: 10).isEmpty, "all words must occur")
            #expect(try await store.search(mailbox: alice, query: "giraffe", limit: 10).isEmpty)
            #expect(try await store.search(mailbox: alice, query: "example", limit: 10).isEmpty, "other header fields are not indexed")
            #expect(try await store.search(mailbox: alice, query: "quarter", limit: 10).isEmpty, "no prefix matching, no stemming")
            #expect(try await store.search(mailbox: alice, query: "the", limit: 10).map(\.id) == ["msg_lunch"], "no stop words")
            #expect(try await store.search(mailbox: bob, query: "quarterly", limit: 10).map(\.id) == ["msg_bob"], "per mailbox")

            let found = try #require(try await store.search(mailbox: alice, query: "report", limit: 10).first)
            #expect(found.subject == "Quarterly report")
            #expect(found.date == received)
        }
    }

    @Test func searchTreatsQuerySyntaxAsPlainWords() async throws {
        try await withPostgresStore { store, _, _ in
            #expect(try await store.deliver(pgMessage("Hello world", body: "NEAR the OR gate, a star * shines.\r\n"), pgDelivery(alice, "msg_syntax")))
            #expect(try await store.deliver(pgMessage("Other", body: "hello alone\r\n"), pgDelivery(alice, "msg_other")))
            // Nothing but syntax: no words, no results, no error.
            for query in ["", "   ", "*", "\"", "(", ")", "-", "!", "&", "|", "<->", ":*", "'", "\\", "\0", "!(&|)", "\u{1F600}"] {
                #expect(try await store.search(mailbox: alice, query: query, limit: 10).isEmpty, "query \(String(reflecting: query))")
            }
            // tsquery syntax around words: only the words count.
            let table: [(String, Set<String>)] = [
                ("NEAR(", ["msg_syntax"]), ("OR", ["msg_syntax"]), ("star:*", ["msg_syntax"]), ("AND", []),
                ("hello:*", ["msg_syntax", "msg_other"]), ("!hello", ["msg_syntax", "msg_other"]),
                ("hello & !world", ["msg_syntax"]), ("hello | alone", ["msg_other"]), ("hello <-> world", ["msg_syntax"]),
                ("'hello' 'alone'", ["msg_other"]), ("hello\0alone", ["msg_other"]),
            ]
            for (query, expected) in table {
                let results = try await store.search(mailbox: alice, query: query, limit: 10)
                #expect(Set(results.map(\.id)) == expected, "query \(String(reflecting: query))")
            }
            #expect(try await store.search(mailbox: alice, query: "hello OR alone", limit: 10).isEmpty)
            #expect(try await store.search(mailbox: alice, query: "hello OR gate", limit: 10).map(\.id) == ["msg_syntax"])
            #expect(try await store.search(mailbox: alice, query: "NEAR(hello world)", limit: 10).map(\.id) == ["msg_syntax"])
            #expect(try await store.search(mailbox: alice, query: "hel*", limit: 10).isEmpty, "no prefix queries")
            #expect(try await store.search(mailbox: alice, query: "hello", limit: 1).count == 1, "limit")
            #expect(try await store.search(mailbox: alice, query: "hello", limit: 0).isEmpty)
        }
    }

    @Test func searchRanksBetterMatchesFirstAndForgetsDeletedMessages() async throws {
        try await withPostgresStore { store, _, database in
            let filler = String(repeating: "lorem ipsum dolor sit amet ", count: 40)
            #expect(try await store.deliver(pgMessage("Status", body: "\(filler) zebra \(filler)\r\n"), pgDelivery(alice, "msg_weak")))
            #expect(try await store.deliver(pgMessage("Zebra zebra", body: "The zebra report.\r\n"), pgDelivery(alice, "msg_strong")))
            #expect(try await store.search(mailbox: alice, query: "zebra", limit: 10).map(\.id) == ["msg_strong", "msg_weak"])
            // The vector: subject words weighted A, body words D, no header words.
            let vector = try await database.query(
                "SELECT search::text FROM messages WHERE message_id = 'msg_strong'").first?.decode(String.self)
            #expect(vector == "'report':5 'the':3 'zebra':1A,2A,4")
            #expect(try await store.delete(mailbox: alice, folder: "INBOX", id: "msg_strong"))
            #expect(try await store.search(mailbox: alice, query: "zebra", limit: 10).map(\.id) == ["msg_weak"])
            try await store.deleteMailbox(alice)
            #expect(try await store.search(mailbox: alice, query: "zebra", limit: 10).isEmpty)
        }
    }

    @Test func largeBodiesAreIndexedUpToTheCap() async throws {
        try await withPostgresStore { (store, _, _) async throws in
            // Distinct base64-like lines well past 1 MB: too much for one tsvector, so only the start is indexed.
            var body = "headword\r\n"
            for line in 0..<20_000 { body += "QUJD\(line)REVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0NTY3ODk\r\n" }
            body += "tailword\r\n"
            let content = pgMessage("Big", body: body)
            #expect(content.readableBytes > 1_500_000)
            #expect(try await store.deliver(content, pgDelivery(alice, "msg_big")))
            #expect(try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg_big") == content)
            #expect(try await store.search(mailbox: alice, query: "headword", limit: 10).map(\.id) == ["msg_big"])
            #expect(try await store.search(mailbox: alice, query: "tailword", limit: 10).isEmpty)
        }
    }

    // MARK: As an index

    @Test func indexRowsWithLocationsAndReferences() async throws {
        try await withPostgresStore { store, index, _ in
            #expect(try await index.insert(indexEntry(alice, "msg_shared", location: "2025/10/23/msg_shared.eml", size: 120)))
            #expect(try await index.insert(indexEntry(bob, "msg_shared", location: "2025/10/23/msg_shared.eml", size: 120)))
            #expect(try await index.insert(indexEntry(alice, "msg_own", location: "2025/10/23/msg_own.eml", size: 80, subject: "Invoice")))
            #expect(try await index.insert(indexEntry(alice, "msg_own", location: "elsewhere")) == false)
            #expect(try await index.references(to: "2025/10/23/msg_shared.eml") == 2)
            #expect(try await index.references(to: "2025/10/23/msg_own.eml") == 1)
            #expect(try await index.references(to: "elsewhere") == 0)

            let entry = try #require(try await index.entry(mailbox: alice, folder: "INBOX", messageID: "msg_own"))
            #expect(entry == indexEntry(alice, "msg_own", location: "2025/10/23/msg_own.eml", size: 80, subject: "Invoice"))
            #expect(try await index.entry(mailbox: alice, folder: "INBOX", messageID: "msg_none") == nil)
            let listed = try await index.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 10)
            #expect(listed.total == 2)
            #expect(listed.entries.map(\.location) == ["2025/10/23/msg_shared.eml", "2025/10/23/msg_own.eml"])
            #expect(try await index.usageBytes(of: alice) == 200)
            #expect(try await index.setFlags([.replied], mailbox: alice, folder: "INBOX", messageID: "msg_own"))
            #expect(try await index.entry(mailbox: alice, folder: "INBOX", messageID: "msg_own")?.flags == [.replied])

            await #expect(throws: MailboxError.self) { try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg_own") }
            #expect(try await store.search(mailbox: alice, query: "invoice", limit: 10).map(\.id) == ["msg_own"])

            let removed = try #require(try await index.remove(mailbox: alice, folder: "INBOX", messageID: "msg_shared"))
            #expect(removed.location == "2025/10/23/msg_shared.eml")
            #expect(try await index.remove(mailbox: alice, folder: "INBOX", messageID: "msg_shared") == nil)
            #expect(try await index.references(to: "2025/10/23/msg_shared.eml") == 1)

            let gone = try await index.removeMailbox(alice)
            #expect(gone.map(\.messageID) == ["msg_own"])
            #expect(gone.first?.flags == [.replied])
            #expect(try await index.references(to: "2025/10/23/msg_own.eml") == 0)
            #expect(try await index.removeMailbox(alice).isEmpty)
            #expect(try await index.list(mailbox: bob, folder: "INBOX", offset: 0, limit: 10).total == 1)
        }
    }
}
