import Foundation
import NIOCore
import NIOPosix
import Testing

@testable import MailTier
@testable import MailTierSQLite

// The database mailbox store and index over SQLite, on a real file in a temporary directory.

private let alice = "alice@example.test"
private let bob = "bob@example.test"
private let received = Date(timeIntervalSince1970: 1_761_220_800)

/// A fresh database file; the store is seen through its two ports so that `list` is not ambiguous.
private func withDatabaseStore(
    _ body: (_ store: any SearchableMailboxStore, _ index: any MailboxIndex, _ database: SQLiteDatabase) async throws -> Void
) async throws {
    var template = Array((NSTemporaryDirectory() + "/mailtier-dbstore-XXXXXX").utf8CString)
    guard let made = mkdtemp(&template) else { throw POSIXError(.EIO) }
    let directory = String(cString: made)
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let database = try SQLiteDatabase(path: directory + "/smtp.db", threadPool: NIOThreadPool.singleton)
    let store = SQLiteMailboxStore(database: database)
    try await body(store, store, database)
}

private func dbDelivery(_ mailbox: String, _ id: String, folder: String = "INBOX", at date: Date = received) -> MailboxDelivery {
    MailboxDelivery(mailbox: mailbox, folder: folder, messageID: id, deliveryKey: MessageID.make(), sender: "bob@example.org", receivedAt: date)
}

private func dbMessage(_ subject: String, body: String = "Hello there\r\n") -> ByteBuffer {
    ByteBuffer(string: "From: Bob <bob@example.org>\r\nTo: alice@example.test\r\nSubject: \(subject)\r\n\r\n\(body)")
}

private func indexEntry(_ mailbox: String, _ id: String, location: String, size: Int = 100, subject: String? = "Indexed") -> MailboxIndexEntry {
    MailboxIndexEntry(
        mailbox: mailbox, folder: "INBOX", messageID: id, location: location, size: size, date: received, flags: [],
        subject: subject, from: "Bob <bob@example.org>", to: alice, headers: "Subject: \(subject ?? "")")
}

@Suite struct DatabaseMailboxStoreTests {
    @Test func schemaIsCurrentAndReopensWithItsRows() async throws {
        var template = Array((NSTemporaryDirectory() + "/mailtier-dbstore-XXXXXX").utf8CString)
        let directory = String(cString: try #require(mkdtemp(&template)))
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/smtp.db"
        do {
            let database = try SQLiteDatabase(path: path, threadPool: NIOThreadPool.singleton)
            #expect(try database.readSync { try SQLiteSchema.userVersion($0) } == SQLiteSchema.currentVersion)
            #expect(database.migrationsApplied == Array(1...SQLiteSchema.currentVersion))
            #expect(try await SQLiteMailboxStore(database: database).deliver(dbMessage("Kept"), dbDelivery(alice, "msg_reopen")))
        }
        let reopened = try SQLiteDatabase(path: path, threadPool: NIOThreadPool.singleton)
        #expect(try reopened.readSync { try SQLiteSchema.userVersion($0) } == SQLiteSchema.currentVersion)
        #expect(reopened.migrationsApplied == [])
        let store: any MailboxStore = SQLiteMailboxStore(database: reopened)
        #expect(try await store.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 10).messages.map(\.subject) == ["Kept"])
    }

    @Test func aVersionOneFileIsUpgradedKeepingItsUsers() async throws {
        var template = Array((NSTemporaryDirectory() + "/mailtier-dbstore-XXXXXX").utf8CString)
        let directory = String(cString: try #require(mkdtemp(&template)))
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/smtp.db"
        do {
            // Make a version-1 file: today's schema without what migrations 2, 3 and 4 added.
            let database = try SQLiteDatabase(path: path, threadPool: NIOThreadPool.singleton)
            _ = try await SQLiteUserStore(database: database).create(username: "alice", email: alice, passwordHash: "x", quotaMB: 10, isAdmin: false)
            try database.writeSync { connection in
                try connection.execute("DROP TABLE messages_fts")
                try connection.execute("DROP TABLE messages")
                try connection.execute("DROP TABLE events")
                try connection.execute("DROP TABLE spool_blobs")
                try connection.execute("PRAGMA user_version = 1")
            }
        }
        let upgraded = try SQLiteDatabase(path: path, threadPool: NIOThreadPool.singleton)
        #expect(try upgraded.readSync { try SQLiteSchema.userVersion($0) } == SQLiteSchema.currentVersion)
        #expect(upgraded.migrationsApplied == [2, 3, 4])
        #expect(try await SQLiteUserStore(database: upgraded).user(named: "alice")?.email == alice)
        let store: any SearchableMailboxStore = SQLiteMailboxStore(database: upgraded)
        #expect(try await store.deliver(dbMessage("Upgraded"), dbDelivery(alice, "msg_upgraded")))
        #expect(try await store.search(mailbox: alice, query: "upgraded", limit: 10).map(\.id) == ["msg_upgraded"])
    }

    @Test func deliverListFetch() async throws {
        try await withDatabaseStore { store, index, _ in
            let content = dbMessage("First", body: "From the start\r\n.dot\r\n\r\nend\r\n")
            #expect(try await store.deliver(content, dbDelivery(alice, "msg_first")))
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

            // The row as an index sees it: to, headers, and no location (the body is inline).
            let entry = try #require(try await index.entry(mailbox: alice, folder: "INBOX", messageID: "msg_first"))
            #expect(entry.to == "alice@example.test")
            #expect(entry.headers == "From: Bob <bob@example.org>\nTo: alice@example.test\nSubject: First")
            #expect(entry.location == "")
        }
    }

    @Test func binaryAndEmptyMessagesComeBackExactly() async throws {
        try await withDatabaseStore { (store, _, _) async throws in
            let binary = ByteBuffer(bytes: [UInt8](0...255) + [0, 0, 0xFF, 0xFE])
            #expect(try await store.deliver(binary, dbDelivery(alice, "msg_binary")))
            #expect(try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg_binary") == binary)
            #expect(try await store.deliver(ByteBuffer(), dbDelivery(alice, "msg_empty")))
            #expect(try await store.fetch(mailbox: alice, folder: "INBOX", id: "msg_empty") == ByteBuffer())
            #expect(try await store.usageBytes(of: alice) == Int64(binary.readableBytes))
        }
    }

    @Test func listingIsOldestFirstThenByInsertionAndPaged() async throws {
        try await withDatabaseStore { store, _, _ in
            // Delivered newest first; two share a date and keep their insertion order.
            for (id, day) in [("msg_c", 2.0), ("msg_a", 0), ("msg_b1", 1), ("msg_b2", 1)] {
                #expect(try await store.deliver(dbMessage(id), dbDelivery(alice, id, at: received + day * 86_400)))
            }
            let all = try await store.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 10)
            #expect(all.total == 4)
            #expect(all.messages.map(\.id) == ["msg_a", "msg_b1", "msg_b2", "msg_c"])
            let page = try await store.list(mailbox: alice, folder: "INBOX", offset: 1, limit: 2)
            #expect(page.total == 4)
            #expect(page.messages.map(\.id) == ["msg_b1", "msg_b2"])
            #expect(try await store.list(mailbox: alice, folder: "INBOX", offset: 4, limit: 2) == ([], 4))
            #expect(try await store.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 0).messages.isEmpty)
            #expect(try await store.list(mailbox: alice, folder: "Archive", offset: 0, limit: 10).total == 0)
        }
    }

    @Test func deleteFlagsUsageAndDeleteMailbox() async throws {
        try await withDatabaseStore { store, _, _ in
            let keep = dbMessage("Keep")
            let drop = dbMessage("Drop", body: "a longer body than the other one\r\n")
            let archived = dbMessage("Archived")
            #expect(try await store.deliver(keep, dbDelivery(alice, "msg_keep")))
            #expect(try await store.deliver(drop, dbDelivery(alice, "msg_drop")))
            #expect(try await store.deliver(archived, dbDelivery(alice, "msg_archived", folder: "Archive")))
            #expect(try await store.deliver(keep, dbDelivery(bob, "msg_keep")))
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
        try await withDatabaseStore { store, _, database in
            #expect(try await store.deliver(dbMessage("Once"), dbDelivery(alice, "msg_once")))
            // A retry has a fresh delivery key and even different bytes: still the same delivery.
            #expect(try await store.deliver(dbMessage("Twice"), dbDelivery(alice, "msg_once")) == false)
            let listed = try await store.list(mailbox: alice, folder: "INBOX", offset: 0, limit: 10)
            #expect(listed.total == 1)
            #expect(listed.messages.map(\.subject) == ["Once"])
            #expect(try await database.read { try $0.query("SELECT COUNT(*) AS n FROM messages_fts").first?.int("n") } == 1)
            // The same id in another folder is another delivery.
            #expect(try await store.deliver(dbMessage("Once"), dbDelivery(alice, "msg_once", folder: "Archive")))
        }
    }

    @Test func oneMessageToTwoUsersIsTwoRows() async throws {
        try await withDatabaseStore { (store, _, database) async throws in
            let content = dbMessage("For both")
            #expect(try await store.deliver(content, dbDelivery(alice, "msg_both")))
            #expect(try await store.deliver(content, dbDelivery(bob, "msg_both")))
            #expect(try await database.read { try $0.query("SELECT COUNT(*) AS n FROM messages").first?.int("n") } == 2)
            #expect(try await store.delete(mailbox: alice, folder: "INBOX", id: "msg_both"))
            #expect(try await store.fetch(mailbox: bob, folder: "INBOX", id: "msg_both") == content)
            #expect(try await store.search(mailbox: bob, query: "both", limit: 10).map(\.id) == ["msg_both"])
        }
    }

    @Test func rejectsEmptyMailboxAndFolder() async throws {
        try await withDatabaseStore { store, _, _ in
            await #expect(throws: MailboxError(.invalidMailbox, "empty mailbox name")) {
                try await store.deliver(dbMessage("x"), dbDelivery("", "msg_x"))
            }
            await #expect(throws: MailboxError(.unsupportedFolder, "empty folder name")) {
                try await store.deliver(dbMessage("x"), dbDelivery(alice, "msg_x", folder: ""))
            }
        }
    }

    // MARK: - Full text

    @Test func searchFindsWordsInSubjectAndBody() async throws {
        try await withDatabaseStore { store, _, _ in
            #expect(try await store.deliver(dbMessage("Quarterly report", body: "Numbers attached.\r\n"), dbDelivery(alice, "msg_report")))
            #expect(try await store.deliver(dbMessage("Lunch", body: "Shall we meet at the café near the station?\r\n"), dbDelivery(alice, "msg_lunch")))
            #expect(try await store.deliver(dbMessage("Quarterly lunch", body: "Only for Bob.\r\n"), dbDelivery(bob, "msg_bob")))

            #expect(try await store.search(mailbox: alice, query: "quarterly", limit: 10).map(\.id) == ["msg_report"], "subject, case-insensitive")
            #expect(try await store.search(mailbox: alice, query: "station", limit: 10).map(\.id) == ["msg_lunch"], "body")
            #expect(try await store.search(mailbox: alice, query: "cafe", limit: 10).map(\.id) == ["msg_lunch"], "diacritics folded")
            #expect(try await store.search(mailbox: alice, query: "lunch station", limit: 10).map(\.id) == ["msg_lunch"], "two words")
            #expect(try await store.search(mailbox: alice, query: "quarterly station", limit: 10).isEmpty, "all words must occur")
            #expect(try await store.search(mailbox: alice, query: "giraffe", limit: 10).isEmpty)
            #expect(try await store.search(mailbox: alice, query: "example", limit: 10).isEmpty, "other header fields are not indexed")
            #expect(try await store.search(mailbox: alice, query: "quarter", limit: 10).isEmpty, "no prefix matching")
            #expect(try await store.search(mailbox: bob, query: "quarterly", limit: 10).map(\.id) == ["msg_bob"], "per mailbox")

            let found = try #require(try await store.search(mailbox: alice, query: "report", limit: 10).first)
            #expect(found.subject == "Quarterly report")
            #expect(found.folder == "INBOX")
        }
    }

    @Test func searchTreatsQuerySyntaxAsPlainWords() async throws {
        try await withDatabaseStore { store, _, _ in
            #expect(try await store.deliver(dbMessage("Hello world", body: "NEAR the OR gate, a star * shines.\r\n"), dbDelivery(alice, "msg_syntax")))
            #expect(try await store.deliver(dbMessage("Other", body: "hello alone\r\n"), dbDelivery(alice, "msg_other")))
            // Nothing but syntax: no words, no results, no error.
            for query in ["", "   ", "*", "\"", "\"\"", "(", ")", "-", "^", ":", "+", "'", "\\", "\0", "* - *", "{}", "\u{1F600}"] {
                #expect(try await store.search(mailbox: alice, query: query, limit: 10).isEmpty, "query \(String(reflecting: query))")
            }
            // Syntax around words: only the words count.
            let table: [(String, Set<String>)] = [
                ("NEAR(", ["msg_syntax"]), ("OR", ["msg_syntax"]), ("\"OR\"", ["msg_syntax"]), ("star*", ["msg_syntax"]),
                ("AND", []), ("subject:", []), ("hello\"", ["msg_syntax", "msg_other"]), ("-hello", ["msg_syntax", "msg_other"]),
                ("^hello", ["msg_syntax", "msg_other"]), ("{subject body}: hello", []), ("hello + world", ["msg_syntax"]),
            ]
            for (query, expected) in table {
                let results = try await store.search(mailbox: alice, query: query, limit: 10)
                #expect(Set(results.map(\.id)) == expected, "query \(String(reflecting: query))")
            }
            // Operators are words that must occur, never operators.
            #expect(try await store.search(mailbox: alice, query: "hello OR alone", limit: 10).isEmpty)
            #expect(try await store.search(mailbox: alice, query: "hello OR gate", limit: 10).map(\.id) == ["msg_syntax"])
            #expect(try await store.search(mailbox: alice, query: "NEAR(hello world)", limit: 10).map(\.id) == ["msg_syntax"])
            #expect(try await store.search(mailbox: alice, query: "NEAR(hello alone)", limit: 10).isEmpty)
            #expect(try await store.search(mailbox: alice, query: "hello NOT world", limit: 10).isEmpty, "NOT is a word, absent here")
            #expect(try await store.search(mailbox: alice, query: "\"hello", limit: 10).map(\.id).sorted() == ["msg_other", "msg_syntax"])
            #expect(try await store.search(mailbox: alice, query: "hel*", limit: 10).isEmpty, "no prefix queries")
            #expect(try await store.search(mailbox: alice, query: "subject:hello", limit: 10).isEmpty, "no column filters: 'subject' is a word")
            #expect(try await store.search(mailbox: alice, query: "hello", limit: 1).count == 1, "limit")
            #expect(try await store.search(mailbox: alice, query: "hello", limit: 0).isEmpty)
        }
    }

    @Test func ftsQueryQuotesEveryWord() {
        #expect(SQLiteMailboxStore.ftsQuery("NEAR(a \"b\" OR c* col:d") == #""NEAR" "a" "b" "OR" "c" "col" "d""#)
        #expect(SQLiteMailboxStore.ftsQuery(" * \" ( ") == nil)
        #expect(SQLiteMailboxStore.ftsQuery("e-mail o'brien") == #""e" "mail" "o" "brien""#)
        #expect(MessageSearchText.words("Grüße, 東京 x²") == ["Grüße", "東京", "x²"])
    }

    @Test func searchRanksBetterMatchesFirstAndForgetsDeletedMessages() async throws {
        try await withDatabaseStore { store, _, _ in
            let filler = String(repeating: "lorem ipsum dolor sit amet ", count: 40)
            #expect(try await store.deliver(dbMessage("Status", body: "\(filler) zebra \(filler)\r\n"), dbDelivery(alice, "msg_weak")))
            #expect(try await store.deliver(dbMessage("Zebra zebra", body: "The zebra report.\r\n"), dbDelivery(alice, "msg_strong")))
            #expect(try await store.search(mailbox: alice, query: "zebra", limit: 10).map(\.id) == ["msg_strong", "msg_weak"])
            #expect(try await store.delete(mailbox: alice, folder: "INBOX", id: "msg_strong"))
            #expect(try await store.search(mailbox: alice, query: "zebra", limit: 10).map(\.id) == ["msg_weak"])
            try await store.deleteMailbox(alice)
            #expect(try await store.search(mailbox: alice, query: "zebra", limit: 10).isEmpty)
        }
    }

    @Test func indexedBodyTextSkipsHeadersAndIsCapped() {
        let message = ByteBuffer(string: "Subject: s\r\nX-Secret: headerword\r\n\r\nbody text\r\n")
        #expect(MessageSearchText.body(of: message) == "body text\r\n")
        #expect(MessageSearchText.body(of: ByteBuffer(string: "Subject: only headers\r\n")) == "")
        #expect(MessageSearchText.body(of: ByteBuffer(string: "\r\nno headers")) == "no headers")
        #expect(MessageSearchText.body(of: ByteBuffer(string: "A: b\n\nbare LF")) == "bare LF")
        #expect(MessageSearchText.body(of: ByteBuffer(bytes: Array("A: b\r\n\r\n".utf8) + [0xFF, 0x61])) == "\u{FFFD}a")
        let big = ByteBuffer(string: "A: b\r\n\r\n" + String(repeating: "x", count: MessageSearchText.maxBodyBytes) + " tailword")
        #expect(MessageSearchText.body(of: big).utf8.count == MessageSearchText.maxBodyBytes)
    }

    // MARK: - As an index

    @Test func indexRowsWithLocationsAndReferences() async throws {
        try await withDatabaseStore { store, index, _ in
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

            // Index rows have no body here; their subjects are searchable.
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
