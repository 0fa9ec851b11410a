import Crypto
import Foundation
import NIOCore
import NIOPosix
import Testing

@testable import MailTier
@testable import MailTierFiles
@testable import MailTierSQLite

// One contract, every backend: the same cases run against maildir, mbox, database (SQLite and
// PostgreSQL), timeseries (plain and sealed) and s3, each on its real storage.

/// A store under test and how to dispose of it.
struct StoreUnderTest: Sendable {
    var store: any MailboxStore
    var cleanup: @Sendable () async throws -> Void
}

/// The backends, by name, so each is its own test case.
enum Backend: String, CaseIterable, Sendable, CustomTestStringConvertible {
    case maildir, mbox, sqliteDatabase, timeseries, timeseriesSealed, postgresDatabase, s3

    var testDescription: String { rawValue }

    func make() async throws -> StoreUnderTest? {
        let directory = try ContractDirectory.make()
        let remove: @Sendable () async throws -> Void = { try? FileManager.default.removeItem(atPath: directory) }
        let pool = NIOThreadPool.singleton
        switch self {
        case .maildir:
            return StoreUnderTest(store: MaildirStore(root: directory + "/mail", hostname: "contract", threadPool: pool), cleanup: remove)
        case .mbox:
            return StoreUnderTest(store: MboxStore(root: directory + "/mail", threadPool: pool), cleanup: remove)
        case .sqliteDatabase:
            let database = try SQLiteDatabase(path: directory + "/smtp.db", threadPool: pool)
            return StoreUnderTest(store: SQLiteMailboxStore(database: database), cleanup: remove)
        case .timeseries, .timeseriesSealed:
            let database = try SQLiteDatabase(path: directory + "/smtp.db", threadPool: pool)
            let key = self == .timeseriesSealed ? SymmetricKey(size: .bits256) : nil
            let content = TimeSeriesContentStore(root: directory + "/mail", encryptionKey: key, threadPool: pool)
            return StoreUnderTest(store: IndexedMailboxStore(index: SQLiteMailboxStore(database: database), content: content), cleanup: remove)
        case .postgresDatabase, .s3:
            return try await ExternalBackends.make(self, directory: directory, cleanup: remove)
        }
    }
}

enum ContractDirectory {
    static func make() throws -> String {
        var template = Array((NSTemporaryDirectory() + "/mailtier-contract-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw POSIXError(.EIO) }
        return String(cString: made)
    }
}

private func delivery(_ mailbox: String, _ id: String, _ store: any MailboxStore, at date: Date = Date(timeIntervalSince1970: 1_761_220_800)) -> MailboxDelivery {
    MailboxDelivery(mailbox: mailbox, messageID: id, deliveryKey: store.makeDeliveryKey(), sender: "bob@example.org", receivedAt: date)
}

private func message(_ subject: String, body: String = "Hello there\r\n") -> ByteBuffer {
    ByteBuffer(string: "Return-Path: <bob@example.org>\r\nFrom: Bob <bob@example.org>\r\nTo: alice@example.test\r\nSubject: \(subject)\r\n\r\n\(body)")
}

/// Mailbox names unique to one test, so tests can share a database or a bucket.
struct Mailboxes {
    let alice: String
    let bob: String
    let carol: String

    init() {
        let domain = "c\(UInt32.random(in: 0...UInt32.max)).example.test"
        alice = "alice@" + domain
        bob = "bob@" + domain
        carol = "carol@" + domain
    }
}

private func withStore(_ backend: Backend, _ body: (any MailboxStore, Mailboxes) async throws -> Void) async throws {
    guard let underTest = try await backend.make() else { return }
    do {
        try await body(underTest.store, Mailboxes())
    } catch {
        try await underTest.cleanup()
        throw error
    }
    try await underTest.cleanup()
}

@Suite("Mailbox store contract") struct MailboxStoreContractTests {
    @Test("deliver, fetch the exact bytes, list what was stored", arguments: Backend.allCases)
    func deliverAndFetch(backend: Backend) async throws {
        try await withStore(backend) { (store, names) async throws in
            let content = message("First", body: "From the start\r\n>From quoted\r\n.dot\r\n\r\nend\r\n")
            #expect(try await store.deliver(content, delivery(names.alice, "msg_contract000000000001", store)))
            let (messages, total) = try await store.list(mailbox: names.alice, folder: "INBOX", offset: 0, limit: 10)
            #expect(total == 1)
            #expect(messages.count == 1)
            let stored = try #require(messages.first)
            #expect(stored.subject == "First")
            #expect(stored.from == "Bob <bob@example.org>")
            #expect(stored.flags.isEmpty)
            #expect(stored.folder == "INBOX")
            let fetched = try await store.fetch(mailbox: names.alice, folder: "INBOX", id: stored.id)
            #expect(fetched == content)
            #expect(try await store.usageBytes(of: names.alice) >= Int64(content.readableBytes) - 64)
            #expect(try await store.fetch(mailbox: names.alice, folder: "INBOX", id: "no-such-message") == nil)
        }
    }

    @Test("a retried delivery stores nothing new", arguments: Backend.allCases)
    func idempotent(backend: Backend) async throws {
        try await withStore(backend) { (store, names) async throws in
            let first = delivery(names.alice, "msg_contract000000000002", store)
            #expect(try await store.deliver(message("Once"), first))
            #expect(try await store.deliver(message("Once"), first) == false)
            #expect(try await store.list(mailbox: names.alice, folder: "INBOX", offset: 0, limit: 10).total == 1)
        }
    }

    @Test("listing is oldest first, paged, with the total", arguments: Backend.allCases)
    func paging(backend: Backend) async throws {
        try await withStore(backend) { (store, names) async throws in
            for index in 0..<5 {
                let when = Date(timeIntervalSince1970: 1_761_220_800 + Double(index) * 86_400)
                #expect(try await store.deliver(message("Number \(index)"), delivery(names.alice, "msg_contract00000000010\(index)", store, at: when)))
            }
            let all = try await store.list(mailbox: names.alice, folder: "INBOX", offset: 0, limit: 10)
            #expect(all.total == 5)
            #expect(all.messages.map(\.subject) == (0..<5).map { "Number \($0)" })
            let page = try await store.list(mailbox: names.alice, folder: "INBOX", offset: 1, limit: 2)
            #expect(page.total == 5)
            #expect(page.messages.map(\.subject) == ["Number 1", "Number 2"])
            #expect(try await store.list(mailbox: names.alice, folder: "INBOX", offset: 5, limit: 2).messages.isEmpty)
        }
    }

    @Test("delete, flags, and deleting a mailbox", arguments: Backend.allCases)
    func deleteAndFlags(backend: Backend) async throws {
        try await withStore(backend) { (store, names) async throws in
            #expect(try await store.deliver(message("Keep"), delivery(names.alice, "msg_contract000000000201", store)))
            #expect(try await store.deliver(message("Drop"), delivery(names.alice, "msg_contract000000000202", store)))
            let listed = try await store.list(mailbox: names.alice, folder: "INBOX", offset: 0, limit: 10).messages
            let keep = try #require(listed.first { $0.subject == "Keep" })
            let drop = try #require(listed.first { $0.subject == "Drop" })

            #expect(try await store.setFlags([.seen, .flagged], mailbox: names.alice, folder: "INBOX", id: keep.id))
            let flagged = try await store.list(mailbox: names.alice, folder: "INBOX", offset: 0, limit: 10).messages
            let keepAfter = try #require(flagged.first { $0.subject == "Keep" })
            #expect(keepAfter.flags == [.seen, .flagged])
            #expect(try await store.fetch(mailbox: names.alice, folder: "INBOX", id: keepAfter.id) == message("Keep"))
            #expect(try await store.setFlags([.seen], mailbox: names.alice, folder: "INBOX", id: "no-such-message") == false)

            #expect(try await store.delete(mailbox: names.alice, folder: "INBOX", id: drop.id))
            #expect(try await store.delete(mailbox: names.alice, folder: "INBOX", id: drop.id) == false)
            #expect(try await store.fetch(mailbox: names.alice, folder: "INBOX", id: drop.id) == nil)
            #expect(try await store.list(mailbox: names.alice, folder: "INBOX", offset: 0, limit: 10).messages.map(\.subject) == ["Keep"])

            try await store.deleteMailbox(names.alice)
            #expect(try await store.list(mailbox: names.alice, folder: "INBOX", offset: 0, limit: 10).total == 0)
            #expect(try await store.usageBytes(of: names.alice) == 0)
        }
    }

    @Test("mailboxes are separate; one message to two users is stored for each", arguments: Backend.allCases)
    func twoUsers(backend: Backend) async throws {
        try await withStore(backend) { (store, names) async throws in
            let content = message("For both")
            #expect(try await store.deliver(content, delivery(names.alice, "msg_contract000000000301", store)))
            #expect(try await store.deliver(content, delivery(names.bob, "msg_contract000000000301", store)))
            #expect(try await store.deliver(message("Only Alice"), delivery(names.alice, "msg_contract000000000302", store)))
            #expect(try await store.list(mailbox: names.alice, folder: "INBOX", offset: 0, limit: 10).total == 2)
            let bobs = try await store.list(mailbox: names.bob, folder: "INBOX", offset: 0, limit: 10)
            #expect(bobs.messages.map(\.subject) == ["For both"])
            let alices = try await store.list(mailbox: names.alice, folder: "INBOX", offset: 0, limit: 10).messages
            let shared = try #require(alices.first { $0.subject == "For both" })
            #expect(try await store.delete(mailbox: names.alice, folder: "INBOX", id: shared.id))
            #expect(try await store.fetch(mailbox: names.bob, folder: "INBOX", id: bobs.messages[0].id) == content, "Bob's copy survives")
            #expect(try await store.usageBytes(of: names.carol) == 0)
        }
    }
}
