#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
import MailTier
import MailTierFiles
import NIOCore
import NIOPosix
import Testing

// Backend-specific tests of the file mailbox stores (maildir, mbox) and of the timeseries
// content store, on real temporary directories. The cross-backend contract is tested elsewhere.

private struct Scratch {
    let path: String

    init() throws {
        var template = Array((NSTemporaryDirectory() + "/mailtier-boxes-XXXXXX").utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        try #require(made != nil)
        self.path = String(cString: made!)
    }

    func remove() { try? FileManager.default.removeItem(atPath: self.path) }
}

private func bytes(_ path: String) throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }
private func text(_ path: String) throws -> String { String(decoding: try bytes(path), as: UTF8.self) }
private func setBytes(_ value: [UInt8], _ path: String) throws { try Data(value).write(to: URL(fileURLWithPath: path)) }
private func listing(_ directory: String) throws -> [String] { try FileManager.default.contentsOfDirectory(atPath: directory).sorted() }
private func exists(_ path: String) -> Bool {
    var info = stat()
    return lstat(path, &info) == 0
}
private func mode(_ path: String) throws -> mode_t {
    var info = stat()
    try #require(lstat(path, &info) == 0, "lstat \(path)")
    return info.st_mode & 0o7777
}
private func appendBytes(_ value: String, to path: String) throws {
    let handle = try #require(FileHandle(forWritingAtPath: path))
    handle.seekToEndOfFile()
    handle.write(Data(value.utf8))
    handle.closeFile()
}
private func buffer(_ value: String) -> ByteBuffer { ByteBuffer(string: value) }
private func string(_ value: ByteBuffer?) -> String? { value.map { String(buffer: $0) } }

/// Thu Oct 23 12:00:00 2025 UTC.
private let october23 = Date(timeIntervalSince1970: 1_761_220_800)

private func delivery(
    _ mailbox: String = "u@example.com", folder: String = "INBOX", id: String, key: String? = nil,
    sender: String = "alice@example.com", at date: Date = october23
) -> MailboxDelivery {
    MailboxDelivery(mailbox: mailbox, folder: folder, messageID: id, deliveryKey: key ?? id, sender: sender, receivedAt: date)
}

private func message(_ subject: String, from: String = "Alice <alice@example.com>", body: String = "Hello.\r\n") -> String {
    "From: \(from)\r\nTo: u@example.com\r\nSubject: \(subject)\r\n\r\n\(body)"
}

private func isMailboxError(_ kind: MailboxError.Kind) -> @Sendable (any Error) -> Bool {
    { ($0 as? MailboxError)?.kind == kind }
}

// MARK: - Maildir

@Suite("MailboxStoreFileTests.Maildir")
struct MaildirStoreTests {
    let pool = NIOThreadPool.singleton

    @Test func listFetchDeleteInOrder() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MaildirStore(root: scratch.path, hostname: "mx.example", threadPool: self.pool)
        // Keys out of order: listing sorts by seconds, then microseconds (numerically), then name.
        let keys = ["1700000002.M5P1.mx.example", "1700000001.M10P1.mx.example", "1700000001.M9P1.mx.example"]
        for (number, key) in keys.enumerated() {
            let content = message("subject \(number)", from: "Sender \(number) <s\(number)@example.com>")
            #expect(try await store.deliver(buffer(content), delivery(id: "msg_\(number)", key: key)))
        }

        let (all, total) = try await store.list(mailbox: "U@example.com", folder: "INBOX", offset: 0, limit: 10)
        #expect(total == 3)
        #expect(all.map(\.id) == [keys[2], keys[1], keys[0]])
        #expect(all.map(\.subject) == ["subject 2", "subject 1", "subject 0"])
        #expect(all.map(\.from) == ["Sender 2 <s2@example.com>", "Sender 1 <s1@example.com>", "Sender 0 <s0@example.com>"])
        #expect(all.allSatisfy { $0.folder == "INBOX" && $0.flags.isEmpty })
        #expect(all[0].size == message("subject 2", from: "Sender 2 <s2@example.com>").utf8.count)
        #expect(all[0].date == Date(timeIntervalSince1970: 1_700_000_001.000009))
        #expect(all[2].date == Date(timeIntervalSince1970: 1_700_000_002.000005))

        let page = try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 1, limit: 1)
        #expect(page.total == 3 && page.messages.map(\.id) == [keys[1]])
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 5, limit: 10).messages.isEmpty)

        #expect(string(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: keys[1]))
            == message("subject 1", from: "Sender 1 <s1@example.com>"))
        #expect(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: "1.M1P1.nothing") == nil)
        #expect(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: "../new/" + keys[1]) == nil)
        #expect(try await store.fetch(mailbox: "nobody@example.com", folder: "INBOX", id: keys[1]) == nil)

        #expect(try await store.delete(mailbox: "u@example.com", folder: "INBOX", id: keys[1]))
        #expect(try await store.delete(mailbox: "u@example.com", folder: "INBOX", id: keys[1]) == false)
        #expect(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: keys[1]) == nil)
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).messages.map(\.id) == [keys[2], keys[0]])
    }

    @Test func setFlagsRenamesIntoCurWithExactInfo() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MaildirStore(root: scratch.path, hostname: "mx.example", threadPool: self.pool)
        let key = store.makeDeliveryKey()
        let box = scratch.path + "/u@example.com"
        #expect(try await store.deliver(buffer(message("flags")), delivery(id: "msg_f", key: key)))
        #expect(try listing(box + "/new") == [key])

        #expect(try await store.setFlags([.seen, .flagged], mailbox: "u@example.com", folder: "INBOX", id: key))
        #expect(try listing(box + "/new") == [])
        #expect(try listing(box + "/cur") == [key + ":2,FS"])
        #expect(try mode(box + "/cur/" + key + ":2,FS") == 0o600)
        var listed = try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).messages
        #expect(listed.map(\.id) == [key])
        #expect(listed.first?.flags == [.seen, .flagged])

        for (flags, suffix) in [
            (Set<MessageFlag>([.seen]), ":2,S"), ([], ":2,"), (Set(MessageFlag.allCases), ":2,DFRST"),
            ([.replied, .draft, .trashed], ":2,DRT"),
        ] {
            #expect(try await store.setFlags(flags, mailbox: "u@example.com", folder: "INBOX", id: key))
            #expect(try listing(box + "/cur") == [key + suffix])
            listed = try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).messages
            #expect(listed.first?.flags == flags)
        }
        // Same flags again: nothing to do, still true.
        #expect(try await store.setFlags([.replied, .draft, .trashed], mailbox: "u@example.com", folder: "INBOX", id: key))
        #expect(string(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: key)) == message("flags"))

        // A retried delivery finds the message under its flagged name.
        #expect(try await store.deliver(buffer("again"), delivery(id: "msg_f", key: key)) == false)
        #expect(try listing(box + "/new") == [])
        #expect(try listing(box + "/tmp") == [])

        #expect(try await store.setFlags([.seen], mailbox: "u@example.com", folder: "INBOX", id: "1.M1P1.none") == false)
        #expect(try await store.setFlags([.seen], mailbox: "u@example.com", folder: "INBOX", id: "../cur/x") == false)

        #expect(try await store.delete(mailbox: "u@example.com", folder: "INBOX", id: key))
        #expect(try listing(box + "/cur") == [])
    }

    @Test func lettersOfOtherProgramsAreKept() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MaildirStore(root: scratch.path, hostname: "mx.example", threadPool: self.pool)
        let key = store.makeDeliveryKey()
        #expect(try await store.deliver(buffer(message("kw")), delivery(id: "msg_k", key: key)))
        let box = scratch.path + "/u@example.com"
        // A reader (e.g. with keyword letters) moved it.
        #expect(rename(box + "/new/" + key, box + "/cur/" + key + ":2,Sa") == 0)
        let listed = try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 1).messages
        #expect(listed.first?.flags == [.seen])
        #expect(try await store.setFlags([.flagged], mailbox: "u@example.com", folder: "INBOX", id: key))
        #expect(try listing(box + "/cur") == [key + ":2,Fa"])
        #expect(string(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: key)) == message("kw"))
        #expect(try await store.delete(mailbox: "u@example.com", folder: "INBOX", id: key))
        #expect(try listing(box + "/cur") == [])
    }

    @Test func temporaryAndHiddenFilesAreNeverMessages() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MaildirStore(root: scratch.path, hostname: "mx.example", threadPool: self.pool)
        let key = store.makeDeliveryKey()
        #expect(try await store.deliver(buffer(message("real")), delivery(id: "msg_r", key: key)))
        let box = scratch.path + "/u@example.com"
        try setBytes(Array("partial".utf8), box + "/tmp/1700000000.M1P9.crashed")
        try setBytes(Array("hidden".utf8), box + "/cur/.1700000000.M2P9.x:2,S")
        try FileManager.default.createDirectory(atPath: box + "/new/subdir", withIntermediateDirectories: false)

        let (messages, total) = try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10)
        #expect(total == 1)
        #expect(messages.map(\.id) == [key])
        #expect(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: "1700000000.M1P9.crashed") == nil)
        #expect(try await store.delete(mailbox: "u@example.com", folder: "INBOX", id: "1700000000.M1P9.crashed") == false)
        #expect(try await store.setFlags([.seen], mailbox: "u@example.com", folder: "INBOX", id: "1700000000.M1P9.crashed") == false)
        #expect(try await store.usageBytes(of: "u@example.com") == Int64(message("real").utf8.count))
        #expect(exists(box + "/tmp/1700000000.M1P9.crashed"))
    }

    /// A worker paused (SIGSTOP) past its lease keeps the lock on `tmp/<key>`: the newer attempt of
    /// the job must not wait for it (it would wait as long as the pause, holding a pool thread).
    @Test func aLockedDeliveryKeyDoesNotBlockTheNewerAttempt() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MaildirStore(root: scratch.path, hostname: "mx.example", threadPool: self.pool)
        #expect(try await store.deliver(buffer(message("first")), delivery(id: "msg_1", key: store.makeDeliveryKey())))
        let box = scratch.path + "/u@example.com"
        let key = store.makeDeliveryKey()
        let held = open(box + "/tmp/" + key, O_WRONLY | O_CREAT, 0o600)
        try #require(held >= 0)
        defer { close(held) }
        try #require(flock(held, LOCK_EX | LOCK_NB) == 0)

        let started = ContinuousClock.now
        #expect(try await store.deliver(buffer(message("second")), delivery(id: "msg_2", key: key)))
        #expect(ContinuousClock.now - started < .seconds(30), "it waited for the lock")
        #expect(try text(box + "/new/" + key) == message("second"))
        // The stalled attempt, or any other, finds it delivered.
        #expect(try await store.deliver(buffer(message("second")), delivery(id: "msg_2", key: key)) == false)
        #expect(try listing(box + "/tmp") == [key], "only the held file is left in tmp/")
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).total == 2)
    }

    @Test func maildirPlusPlusFolders() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MaildirStore(root: scratch.path, hostname: "mx.example", threadPool: self.pool)
        let box = scratch.path + "/u@example.com"
        let inboxKey = store.makeDeliveryKey()
        let sentKey = store.makeDeliveryKey()
        let nestedKey = store.makeDeliveryKey()
        #expect(try await store.deliver(buffer(message("in")), delivery(id: "msg_1", key: inboxKey)))
        #expect(try await store.deliver(buffer(message("sent")), delivery(folder: "Sent", id: "msg_1", key: sentKey)))
        #expect(try await store.deliver(buffer(message("old")), delivery(folder: "Archive.2024", id: "msg_2", key: nestedKey)))

        #expect(try listing(box) == [".Archive.2024", ".Sent", "cur", "new", "tmp"])
        #expect(try listing(box + "/.Sent") == ["cur", "maildirfolder", "new", "tmp"])
        #expect(try listing(box + "/.Sent/new") == [sentKey])
        for path in [box + "/.Sent", box + "/.Sent/new", box + "/.Sent/cur", box + "/.Sent/tmp"] {
            #expect(try mode(path) == 0o700, "\(path)")
        }
        #expect(try mode(box + "/.Sent/maildirfolder") == 0o600)
        #expect(try mode(box + "/.Sent/new/" + sentKey) == 0o600)

        // INBOX is the maildir itself, in any case.
        let inbox = try await store.list(mailbox: "u@example.com", folder: "inbox", offset: 0, limit: 10).messages
        #expect(inbox.map(\.id) == [inboxKey] && inbox.map(\.folder) == ["INBOX"])
        let sent = try await store.list(mailbox: "u@example.com", folder: "Sent", offset: 0, limit: 10)
        #expect(sent.total == 1 && sent.messages.map(\.id) == [sentKey] && sent.messages[0].folder == "Sent")
        #expect(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: sentKey) == nil)
        #expect(string(try await store.fetch(mailbox: "u@example.com", folder: "Sent", id: sentKey)) == message("sent"))
        #expect(try await store.list(mailbox: "u@example.com", folder: "Drafts", offset: 0, limit: 10).total == 0)

        #expect(try await store.setFlags([.seen], mailbox: "u@example.com", folder: "Sent", id: sentKey))
        #expect(try listing(box + "/.Sent/cur") == [sentKey + ":2,S"])
        #expect(try await store.deliver(buffer("x"), delivery(folder: "Sent", id: "msg_1", key: sentKey)) == false)

        let usage = try await store.usageBytes(of: "u@example.com")
        #expect(usage == Int64(message("in").utf8.count + message("sent").utf8.count + message("old").utf8.count))

        #expect(try await store.delete(mailbox: "u@example.com", folder: "Archive.2024", id: nestedKey))
        #expect(try listing(box + "/.Archive.2024/new") == [])
    }

    @Test(arguments: ["", ".Sent", "a/b", "..", "a..b", "../../etc", "Sent\u{1}", "tab\there", "x\u{7F}", "new\nline"])
    func invalidFolderNamesAreRejected(folder: String) async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MaildirStore(root: scratch.path, hostname: "mx.example", threadPool: self.pool)
        let kind = isMailboxError(.unsupportedFolder)
        await #expect(performing: { _ = try await store.deliver(buffer("x"), delivery(folder: folder, id: "msg_x", key: store.makeDeliveryKey())) }, throws: kind)
        await #expect(performing: { _ = try await store.list(mailbox: "u@example.com", folder: folder, offset: 0, limit: 1) }, throws: kind)
        await #expect(performing: { _ = try await store.fetch(mailbox: "u@example.com", folder: folder, id: "1.M1P1.x") }, throws: kind)
        await #expect(performing: { _ = try await store.delete(mailbox: "u@example.com", folder: folder, id: "1.M1P1.x") }, throws: kind)
        await #expect(performing: { _ = try await store.setFlags([], mailbox: "u@example.com", folder: folder, id: "1.M1P1.x") }, throws: kind)
        #expect(try listing(scratch.path) == [])
    }

    @Test func deleteMailboxRemovesEverything() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MaildirStore(root: scratch.path, hostname: "mx.example", threadPool: self.pool)
        #expect(try await store.deliver(buffer("a"), delivery(id: "msg_1", key: store.makeDeliveryKey())))
        #expect(try await store.deliver(buffer("b"), delivery(folder: "Sent", id: "msg_1", key: store.makeDeliveryKey())))
        #expect(try await store.deliver(buffer("c"), delivery("other@example.com", id: "msg_1", key: store.makeDeliveryKey())))
        try setBytes(Array("junk".utf8), scratch.path + "/u@example.com/tmp/leftover")

        try await store.deleteMailbox("U@Example.com")
        #expect(try listing(scratch.path) == ["other@example.com"])
        #expect(try await store.usageBytes(of: "u@example.com") == 0)
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).total == 0)
        try await store.deleteMailbox("u@example.com")  // missing: fine
        #expect(try await store.list(mailbox: "other@example.com", folder: "INBOX", offset: 0, limit: 10).total == 1)

        // The address can receive mail again.
        #expect(try await store.deliver(buffer("d"), delivery(id: "msg_2", key: store.makeDeliveryKey())))
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).total == 1)
    }
}

// MARK: - mbox

@Suite("MailboxStoreFileTests.Mbox")
struct MboxStoreTests {
    let pool = NIOThreadPool.singleton

    @Test func fromLineAndFileFormatAreExact() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MboxStore(root: scratch.path + "/mbox", threadPool: self.pool)
        #expect(try await store.deliver(buffer("Subject: one\r\n\r\nbody\r\n"), delivery(id: "msg_1", sender: "alice@example.com")))
        // Null reverse path, and a one-digit day (asctime pads it with a space).
        let november2 = Date(timeIntervalSince1970: 1_762_070_709)
        #expect(try await store.deliver(buffer("Subject: two\r\n\r\nbounce\r\n"), delivery(id: "msg_2", sender: "", at: november2)))

        let file = scratch.path + "/mbox/u@example.com"
        #expect(
            try text(file)
                == "From alice@example.com Thu Oct 23 12:00:00 2025\nSubject: one\n\nbody\n\n"
                + "From MAILER-DAEMON Sun Nov  2 08:05:09 2025\nSubject: two\n\nbounce\n\n")
        #expect(try mode(scratch.path + "/mbox") == 0o700)
        #expect(try mode(file) == 0o600)
        #expect(try mode(scratch.path + "/mbox/.u@example.com.index") == 0o600)
        #expect(try text(scratch.path + "/mbox/.u@example.com.index") == "msg_1 0 68 - 1761220800\nmsg_2 68 66 - 1762070709\n")
        #expect(try await store.usageBytes(of: "u@example.com") == 134)

        #expect(MboxStore.fromLine(sender: "odd sender\r\n@x", receivedAt: october23) == "From odd_sender__@x Thu Oct 23 12:00:00 2025")
        // Fractions of a second survive in the index.
        #expect(try await store.deliver(buffer("x\r\n"), delivery(id: "msg_3", at: Date(timeIntervalSince1970: 1_761_220_800.25))))
        #expect(try text(scratch.path + "/mbox/.u@example.com.index").hasSuffix("msg_3 134 51 - 1761220800.250000\n"))
        let listed = try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).messages
        #expect(listed.map(\.date) == [october23, Date(timeIntervalSince1970: 1_761_220_800.25), november2])
    }

    static let trickyBodies: [String] = [
        "Subject: t\r\n\r\nFrom here on\r\n",
        "Subject: t\r\n\r\n>From quoted\r\n>>From twice\r\n>>>From thrice\r\n",
        "Subject: t\r\n\r\nFrom\r\nFrom\r\n>From\r\nFrom:\r\nFromage\r\n From indented\r\n",
        "Subject: t\r\n\r\nFrom \r\n>From \r\n\r\n\r\nFrom x\r\n",
        "From: header@example.com\r\nSubject: From a header\r\n\r\nbody\r\n\r\n\r\n",
        "Subject: t\r\n\r\nlast line From inside\r\n.\r\n",
        "",
        "\r\n",
        "Subject: bare\r\rCR\r\n\r\n\r\r\n",
    ]

    @Test(arguments: trickyBodies)
    func escapingRoundTrip(body: String) async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MboxStore(root: scratch.path, threadPool: self.pool)
        #expect(try await store.deliver(buffer("Subject: before\r\n\r\nx\r\n"), delivery(id: "msg_0")))
        #expect(try await store.deliver(buffer(body), delivery(id: "msg_1")))
        #expect(try await store.deliver(buffer("Subject: after\r\n\r\ny\r\n"), delivery(id: "msg_2")))

        #expect(string(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: "msg_1")) == body)
        #expect(string(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: "msg_2")) == "Subject: after\r\n\r\ny\r\n")
        let listed = try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).messages
        #expect(listed.map(\.size) == [22, body.utf8.count, 21])

        // Any mbox reader sees exactly three messages: only From_ lines start with "From ".
        let file = try text(scratch.path + "/u@example.com")
        let separators = file.split(separator: "\n", omittingEmptySubsequences: false).filter { $0.hasPrefix("From ") }
        #expect(separators.count == 3)
        if !body.contains("\r\r") { #expect(!file.utf8.contains(UInt8(ascii: "\r"))) }
    }

    @Test func escapingIsMboxrd() throws {
        let encoded = MboxStore.encode(
            buffer("From a\r\n>From b\r\n>>From c\r\nFrom\r\n>From\r\nx From y\r\n"), sender: "s@x", receivedAt: october23)
        #expect(
            String(buffer: encoded)
                == "From s@x Thu Oct 23 12:00:00 2025\n>From a\n>>From b\n>>>From c\nFrom\n>From\nx From y\n\n")
        #expect(
            try String(buffer: MboxStore.decode(encoded)) == "From a\r\n>From b\r\n>>From c\r\nFrom\r\n>From\r\nx From y\r\n")
        // LF-only text comes back as CRLF; a missing final line break is added.
        let bare = MboxStore.encode(buffer("a\nb"), sender: "", receivedAt: october23)
        #expect(String(buffer: bare) == "From MAILER-DAEMON Thu Oct 23 12:00:00 2025\na\nb\n\n")
        #expect(try String(buffer: MboxStore.decode(bare)) == "a\r\nb\r\n")
        #expect(throws: MailboxError.self) { try MboxStore.decode(buffer("Subject: no from line\n\n")) }
        #expect(throws: MailboxError.self) { try MboxStore.decode(buffer("From x Thu Oct 23 12:00:00 2025\nbody")) }
    }

    @Test func twoConcurrentWritersNeverInterleave() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let first = MboxStore(root: scratch.path, threadPool: self.pool)
        let second = MboxStore(root: scratch.path, threadPool: self.pool)
        // Large enough that an unlocked writer would be caught mid-write.
        func body(_ number: Int) -> String {
            "Subject: message \(number)\r\n\r\n" + String(repeating: "line \(number) From \(number)\r\nFrom \(number)\r\n", count: 800)
        }
        try await withThrowingTaskGroup(of: Void.self) { group in
            for (writer, store) in [first, second].enumerated() {
                group.addTask {
                    try await withThrowingTaskGroup(of: Void.self) { inner in
                        for index in 0..<50 {
                            let number = writer * 50 + index
                            inner.addTask {
                                let stored = try await store.deliver(buffer(body(number)), delivery(id: "msg_\(number)"))
                                #expect(stored)
                            }
                        }
                        try await inner.waitForAll()
                    }
                }
            }
            try await group.waitForAll()
        }

        let (messages, total) = try await first.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 1000)
        #expect(total == 100)
        #expect(Set(messages.map(\.id)).count == 100)
        for number in 0..<100 {
            #expect(string(try await second.fetch(mailbox: "u@example.com", folder: "INBOX", id: "msg_\(number)")) == body(number))
        }
        // The index tiles the file exactly: entries are contiguous, nothing in between.
        let index = try text(scratch.path + "/.u@example.com.index").split(separator: "\n")
        #expect(index.count == 100)
        var end = 0
        for line in index {
            let fields = line.split(separator: " ")
            #expect(Int(fields[1]) == end)
            end += Int(fields[2]) ?? 0
        }
        #expect(end == (try bytes(scratch.path + "/u@example.com")).count)
        #expect(try listing(scratch.path) == [".u@example.com.index", "u@example.com"])
    }

    @Test func writerKilledMidAppendIsRepaired() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MboxStore(root: scratch.path, threadPool: self.pool)
        let bodies = (0..<3).map { "Subject: \($0)\r\n\r\nFrom the start \($0)\r\n" }
        for (number, content) in bodies.enumerated() {
            #expect(try await store.deliver(buffer(content), delivery(id: "msg_\(number)")))
        }
        let file = scratch.path + "/u@example.com"
        let indexFile = scratch.path + "/.u@example.com.index"
        let good = try bytes(file)
        // A killed writer: half an entry in the mbox, and (another one) half an index line.
        try appendBytes("From evil@example.com Thu Oct 23 12:00:00 2025\nSubject: torn\n\nhalf a mess", to: file)
        try appendBytes("msg_torn 999 12", to: indexFile)

        // Readers see only indexed messages.
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).total == 3)
        #expect(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: "msg_torn") == nil)

        #expect(try await store.deliver(buffer("Subject: 3\r\n\r\nafter\r\n"), delivery(id: "msg_3")))
        let repaired = try bytes(file)
        #expect(Array(repaired.prefix(good.count)) == good)
        #expect(String(decoding: repaired.dropFirst(good.count), as: UTF8.self) == "From alice@example.com Thu Oct 23 12:00:00 2025\nSubject: 3\n\nafter\n\n")
        #expect(!(try text(indexFile)).contains("msg_torn"))
        #expect(try text(indexFile).split(separator: "\n").count == 4)
        for (number, content) in bodies.enumerated() {
            #expect(string(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: "msg_\(number)")) == content)
        }

        // Killed after the mbox write but before the index line: the entry is dropped, and the
        // redelivery (the job was never acknowledged) stores it once.
        let entry = MboxStore.encode(buffer("Subject: 4\r\n\r\nlost\r\n"), sender: "alice@example.com", receivedAt: october23)
        try appendBytes(String(buffer: entry), to: file)
        #expect(try await store.deliver(buffer("Subject: 4\r\n\r\nlost\r\n"), delivery(id: "msg_4")))
        #expect(try text(file).components(separatedBy: "Subject: 4").count == 2)
        #expect(try await store.usageBytes(of: "u@example.com") == Int64(try bytes(file).count))
    }

    /// A lock held by another program (here a classic `fcntl` lock, which conflicts with the
    /// store's open-file-description locks) is waited for `lockPatience`, then the delivery fails
    /// with a clear error — to be retried — instead of holding a pool thread for good.
    @Test func aHeldLockFailsTheDeliveryAfterThePatience() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MboxStore(root: scratch.path, threadPool: self.pool, lockPatience: .milliseconds(300))
        #expect(try await store.deliver(buffer("Subject: a\r\n\r\n1\r\n"), delivery(id: "msg_a")))
        let held = open(scratch.path + "/u@example.com", O_RDWR)
        try #require(held >= 0)
        var request = flock()
        request.l_type = Int16(F_WRLCK)
        request.l_whence = Int16(SEEK_SET)
        try #require(fcntl(held, F_SETLK, &request) == 0)

        let started = ContinuousClock.now
        let error = await #expect(throws: FileStoreError.self) {
            try await store.deliver(buffer("Subject: b\r\n\r\n2\r\n"), delivery(id: "msg_b"))
        }
        #expect(error?.errorNumber == EWOULDBLOCK && error?.description.contains("locked by another process") == true, "\(String(describing: error))")
        #expect(ContinuousClock.now - started < .seconds(30), "it waited for the lock")
        close(held)  // releases the lock
        #expect(try await store.deliver(buffer("Subject: b\r\n\r\n2\r\n"), delivery(id: "msg_b")))
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).total == 2)
    }

    @Test func redeliveryStoresNothing() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MboxStore(root: scratch.path, threadPool: self.pool)
        #expect(try await store.deliver(buffer("Subject: a\r\n\r\n1\r\n"), delivery(id: "msg_a")))
        let size = try await store.usageBytes(of: "u@example.com")
        #expect(try await store.deliver(buffer("Subject: a\r\n\r\n1\r\n"), delivery("U@EXAMPLE.COM", id: "msg_a")) == false)
        #expect(try await store.deliver(buffer("different"), delivery(id: "msg_a", key: "other key")) == false)
        #expect(try await store.usageBytes(of: "u@example.com") == size)
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).total == 1)
        // Concurrent duplicates: one stored.
        let stored = try await withThrowingTaskGroup(of: Bool.self) { group in
            for _ in 0..<8 { group.addTask { try await store.deliver(buffer("same\r\n"), delivery(id: "msg_b")) } }
            var count = 0
            for try await result in group where result { count += 1 }
            return count
        }
        #expect(stored == 1)
    }

    @Test func deleteRewritesFileAndIndex() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MboxStore(root: scratch.path, threadPool: self.pool)
        let bodies = (0..<4).map { "Subject: \($0)\r\n\r\n" + String(repeating: "From \($0)\r\n", count: $0 + 1) }
        for (number, content) in bodies.enumerated() {
            #expect(try await store.deliver(buffer(content), delivery(id: "msg_\(number)")))
        }
        #expect(try await store.setFlags([.seen], mailbox: "u@example.com", folder: "INBOX", id: "msg_3"))
        let before = try await store.usageBytes(of: "u@example.com")

        #expect(try await store.delete(mailbox: "u@example.com", folder: "INBOX", id: "msg_1"))
        #expect(try await store.delete(mailbox: "u@example.com", folder: "INBOX", id: "msg_1") == false)
        #expect(try await store.delete(mailbox: "u@example.com", folder: "INBOX", id: "msg_none") == false)
        #expect(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: "msg_1") == nil)
        for number in [0, 2, 3] {
            #expect(string(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: "msg_\(number)")) == bodies[number])
        }
        let listed = try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).messages
        #expect(listed.map(\.id) == ["msg_0", "msg_2", "msg_3"])
        #expect(listed.map(\.flags) == [[], [], [.seen]])
        let entry1 = MboxStore.encode(buffer(bodies[1]), sender: "alice@example.com", receivedAt: october23).readableBytes
        #expect(try await store.usageBytes(of: "u@example.com") == before - Int64(entry1))
        #expect(try listing(scratch.path) == [".u@example.com.index", "u@example.com"])
        #expect(try mode(scratch.path + "/u@example.com") == 0o600)
        #expect(try mode(scratch.path + "/.u@example.com.index") == 0o600)
        #expect(!(try text(scratch.path + "/u@example.com")).contains("Subject: 1\n"))

        // Delete everything, then deliver again.
        for number in [0, 2, 3] { #expect(try await store.delete(mailbox: "u@example.com", folder: "INBOX", id: "msg_\(number)")) }
        #expect(try await store.usageBytes(of: "u@example.com") == 0)
        #expect(try await store.deliver(buffer("Subject: new\r\n\r\n"), delivery(id: "msg_5")))
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).messages.map(\.id) == ["msg_5"])
    }

    @Test func interruptedRewriteIsFinished() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MboxStore(root: scratch.path, threadPool: self.pool)
        #expect(try await store.deliver(buffer("Subject: keep\r\n\r\n"), delivery(id: "msg_keep")))
        #expect(try await store.deliver(buffer("Subject: gone\r\n\r\n"), delivery(id: "msg_gone")))
        // A delete that crashed after its commit point: the new mbox and the pending index are
        // written, neither renamed into place.
        let entry = MboxStore.encode(buffer("Subject: keep\r\n\r\n"), sender: "alice@example.com", receivedAt: october23)
        try setBytes(Array(entry.readableBytesView), scratch.path + "/.u@example.com.rewrite")
        try setBytes(Array("msg_keep 0 \(entry.readableBytes) - 1761220800\n".utf8), scratch.path + "/.u@example.com.index.pending")

        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).messages.map(\.id) == ["msg_keep"])
        #expect(try listing(scratch.path) == [".u@example.com.index", "u@example.com"])
        #expect(try await store.usageBytes(of: "u@example.com") == Int64(entry.readableBytes))

        // One that crashed before it: the leftover is ignored and replaced by the next rewrite.
        try setBytes(Array("junk".utf8), scratch.path + "/.u@example.com.rewrite")
        #expect(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: "msg_keep") != nil)
        #expect(try await store.deliver(buffer("Subject: more\r\n\r\n"), delivery(id: "msg_more")))
        #expect(try await store.delete(mailbox: "u@example.com", folder: "INBOX", id: "msg_keep"))
        #expect(try listing(scratch.path) == [".u@example.com.index", "u@example.com"])
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).messages.map(\.id) == ["msg_more"])
    }

    @Test func flagsLiveInTheIndexOnly() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MboxStore(root: scratch.path, threadPool: self.pool)
        #expect(try await store.deliver(buffer(message("flagged")), delivery(id: "msg_1")))
        let mbox = try bytes(scratch.path + "/u@example.com")
        #expect(try await store.setFlags([.seen, .replied], mailbox: "u@example.com", folder: "inbox", id: "msg_1"))
        #expect(try await store.setFlags([.seen], mailbox: "u@example.com", folder: "INBOX", id: "msg_2") == false)
        #expect(try bytes(scratch.path + "/u@example.com") == mbox)
        #expect(try text(scratch.path + "/.u@example.com.index").hasPrefix("msg_1 0 \(mbox.count) RS "))
        let listed = try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).messages
        #expect(listed.count == 1)
        #expect(listed[0].flags == [.seen, .replied])
        #expect(listed[0].subject == "flagged" && listed[0].from == "Alice <alice@example.com>")
        #expect(listed[0].size == message("flagged").utf8.count && listed[0].date == october23)
        #expect(try await store.setFlags([], mailbox: "u@example.com", folder: "INBOX", id: "msg_1"))
        #expect(try text(scratch.path + "/.u@example.com.index").hasPrefix("msg_1 0 \(mbox.count) - "))
        #expect(try listing(scratch.path) == [".u@example.com.index", "u@example.com"])
    }

    @Test func onlyInboxAndValidMailboxes() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MboxStore(root: scratch.path, threadPool: self.pool)
        let folder = isMailboxError(.unsupportedFolder)
        await #expect(performing: { _ = try await store.deliver(buffer("x"), delivery(folder: "Sent", id: "msg_1")) }, throws: folder)
        await #expect(performing: { _ = try await store.list(mailbox: "u@example.com", folder: "Sent", offset: 0, limit: 1) }, throws: folder)
        await #expect(performing: { _ = try await store.fetch(mailbox: "u@example.com", folder: "Sent", id: "msg_1") }, throws: folder)
        let mailbox = isMailboxError(.invalidMailbox)
        for name in ["", ".u@example.com", "a/b@example.com", "../x", "a\u{0}b"] {
            await #expect(performing: { _ = try await store.deliver(buffer("x"), delivery(name, id: "msg_1")) }, throws: mailbox)
            await #expect(performing: { _ = try await store.usageBytes(of: name) }, throws: mailbox)
        }
        #expect(try listing(scratch.path) == [])
        // Nothing there yet: empty, not an error.
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).total == 0)
        #expect(try await store.fetch(mailbox: "u@example.com", folder: "INBOX", id: "msg_1") == nil)
        #expect(try await store.delete(mailbox: "u@example.com", folder: "INBOX", id: "msg_1") == false)
        #expect(try await store.setFlags([.seen], mailbox: "u@example.com", folder: "INBOX", id: "msg_1") == false)
        #expect(try await store.usageBytes(of: "u@example.com") == 0)
        #expect(try listing(scratch.path) == [])
    }

    @Test func deleteMailboxRemovesMboxAndIndex() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = MboxStore(root: scratch.path, threadPool: self.pool)
        #expect(try await store.deliver(buffer("a\r\n"), delivery(id: "msg_1")))
        #expect(try await store.deliver(buffer("b\r\n"), delivery("v@example.com", id: "msg_1")))
        try await store.deleteMailbox("U@example.com")
        #expect(try listing(scratch.path) == [".v@example.com.index", "v@example.com"])
        try await store.deleteMailbox("u@example.com")
        #expect(try await store.list(mailbox: "u@example.com", folder: "INBOX", offset: 0, limit: 10).total == 0)
        // The same message id can be delivered again to the recreated mailbox.
        #expect(try await store.deliver(buffer("a\r\n"), delivery(id: "msg_1")))
    }
}

// MARK: - Timeseries

@Suite("MailboxStoreFileTests.TimeSeries")
struct TimeSeriesContentStoreTests {
    let pool = NIOThreadPool.singleton

    static func randomKeyText() -> String {
        Data((0..<32).map { _ in UInt8.random(in: 0...255) }).base64EncodedString()
    }

    static func randomKey() throws -> SealingKey { try TimeSeriesContentStore.key(fromBase64: randomKeyText()) }

    @Test func locationIsTheUTCDay() {
        let store = TimeSeriesContentStore(root: "/nonexistent", encryptionKey: nil, threadPool: self.pool)
        // Mon Oct 20 23:59:59 2025 UTC (already the 21st east of Greenwich).
        let late = Date(timeIntervalSince1970: 1_761_004_799)
        #expect(store.location(for: delivery(id: "msg_abc123", at: late)) == "2025/10/20/msg_abc123.eml")
        #expect(store.location(for: delivery(id: "msg_abc123", at: late.addingTimeInterval(1))) == "2025/10/21/msg_abc123.eml")
        #expect(store.location(for: delivery(id: "msg_x", at: Date(timeIntervalSince1970: 0))) == "1970/01/01/msg_x.eml")
        // Unsafe characters are encoded, never path separators.
        #expect(store.location(for: delivery(id: "../a/b", at: late)) == "2025/10/20/%2E.%2Fa%2Fb.eml")
        #expect(store.location(for: delivery(id: "", at: late)) == "2025/10/20/%.eml")
        for location in ["2025/10/20/msg_abc123.eml", "2025/10/20/%2E.%2Fa%2Fb.eml"] {
            #expect(TimeSeriesContentStore.isValidLocation(location))
        }
        for location in [
            "../2025/10/20/x.eml", "2025/10/20/../x.eml", "/etc/passwd", "2025/10/20/.hidden.eml", "2025/10/20/x.txt",
            "2025/1/20/x.eml", "2025/10/20/a/b.eml", "2025/10/20/.eml", "2025/10/20/a b.eml",
        ] {
            #expect(!TimeSeriesContentStore.isValidLocation(location), "\(location)")
        }
    }

    @Test func plainRoundTrip() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let root = scratch.path + "/ts"
        let store = TimeSeriesContentStore(root: root, encryptionKey: nil, threadPool: self.pool)
        #expect(!store.isEncrypted)
        let location = store.location(for: delivery(id: "msg_plain"))
        #expect(location == "2025/10/23/msg_plain.eml")
        let content = message("plain", body: String(repeating: "0123456789\r\n", count: 10_000))
        try await store.write(buffer(content), at: location)

        #expect(try bytes(root + "/" + location) == Array(content.utf8))
        for directory in [root, root + "/2025", root + "/2025/10", root + "/2025/10/23"] {
            #expect(try mode(directory) == 0o700, "\(directory)")
        }
        #expect(try mode(root + "/" + location) == 0o600)
        #expect(try listing(root + "/2025/10/23") == ["msg_plain.eml"])
        #expect(string(try await store.read(at: location)) == content)

        // Writing the same location again replaces it.
        try await store.write(buffer("second"), at: location)
        #expect(string(try await store.read(at: location)) == "second")
        #expect(try listing(root + "/2025/10/23") == ["msg_plain.eml"])

        try await store.remove(at: location)
        try await store.remove(at: location)  // missing: fine
        await #expect { _ = try await store.read(at: location) } throws: { ($0 as? FileStoreError)?.isNotFound == true }

        for bad in ["../escape.eml", "2025/10/23/../../../x.eml", "/etc/passwd"] {
            await #expect(throws: FileStoreError.self) { try await store.write(buffer("x"), at: bad) }
            await #expect(throws: FileStoreError.self) { _ = try await store.read(at: bad) }
            await #expect(throws: FileStoreError.self) { try await store.remove(at: bad) }
        }
        #expect(try listing(scratch.path) == ["ts"])
    }

    @Test func sealedRoundTrip() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = TimeSeriesContentStore(root: scratch.path, encryptionKey: try Self.randomKey(), threadPool: self.pool)
        #expect(store.isEncrypted)
        for (number, content) in ["", "x", message("secret words", body: "The launch code is 1234.\r\n")].enumerated() {
            let location = "2025/10/23/msg_\(number).eml"
            try await store.write(buffer(content), at: location)
            let file = try bytes(scratch.path + "/" + location)
            #expect(file.count == content.utf8.count + SealedFile.minimumSize)
            #expect(Array(file.prefix(6)) == Array("MTENC".utf8) + [1])
            #expect(!String(decoding: file, as: UTF8.self).contains("launch code"))
            #expect(try mode(scratch.path + "/" + location) == 0o600)
            #expect(string(try await store.read(at: location)) == content)
        }
        #expect(try listing(scratch.path + "/2025/10/23") == ["msg_0.eml", "msg_1.eml", "msg_2.eml"])
    }

    @Test func wrongOrMissingKeyIsCorrupt() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let key = try Self.randomKey()
        let sealed = TimeSeriesContentStore(root: scratch.path, encryptionKey: key, threadPool: self.pool)
        let location = "2025/10/23/msg_1.eml"
        try await sealed.write(buffer(message("s")), at: location)

        let corrupt = isMailboxError(.corrupt)
        let wrong = TimeSeriesContentStore(root: scratch.path, encryptionKey: try Self.randomKey(), threadPool: self.pool)
        await #expect(performing: { _ = try await wrong.read(at: location) }, throws: { error in
            guard let error = error as? MailboxError else { return false }
            return error.kind == .corrupt && error.message.contains("wrong encryption key")
        })
        let keyless = TimeSeriesContentStore(root: scratch.path, encryptionKey: nil, threadPool: self.pool)
        await #expect(performing: { _ = try await keyless.read(at: location) }, throws: { error in
            guard let error = error as? MailboxError else { return false }
            return error.kind == .corrupt && error.message.contains("no encryption key")
        })

        // A plain file read with a key: refused, unless plaintext files are accepted.
        try await keyless.write(buffer("plain"), at: "2025/10/23/msg_plain.eml")
        await #expect(performing: { _ = try await sealed.read(at: "2025/10/23/msg_plain.eml") }, throws: corrupt)
        let migrating = TimeSeriesContentStore(root: scratch.path, encryptionKey: key, threadPool: self.pool, acceptsPlaintextFiles: true)
        #expect(string(try await migrating.read(at: "2025/10/23/msg_plain.eml")) == "plain")
        #expect(string(try await migrating.read(at: location)) == message("s"))
    }

    @Test func everyFlippedOrMissingByteIsCorrupt() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = TimeSeriesContentStore(root: scratch.path, encryptionKey: try Self.randomKey(), threadPool: self.pool)
        let location = "2025/10/23/msg_1.eml"
        let path = scratch.path + "/" + location
        try await store.write(buffer("Subject: s\r\n\r\nbody\r\n"), at: location)
        let original = try bytes(path)
        #expect(original.count == 20 + 34)

        // Header (magic 0-4, version 5), nonce (6-17), ciphertext (18-37), tag (38-53).
        for position in original.indices {
            for mask: UInt8 in [0x01, 0x80] {
                var changed = original
                changed[position] ^= mask
                try setBytes(changed, path)
                await #expect(performing: { _ = try await store.read(at: location) }, throws: isMailboxError(.corrupt))
            }
        }
        for length in 0..<original.count {
            try setBytes(Array(original.prefix(length)), path)
            await #expect(performing: { _ = try await store.read(at: location) }, throws: isMailboxError(.corrupt))
        }
        // Appended bytes move the tag: corrupt too.
        try setBytes(original + [0], path)
        await #expect(performing: { _ = try await store.read(at: location) }, throws: isMailboxError(.corrupt))
        try setBytes(original, path)
        #expect(string(try await store.read(at: location)) == "Subject: s\r\n\r\nbody\r\n")
    }

    @Test func everyWriteHasAFreshNonce() async throws {
        let scratch = try Scratch()
        defer { scratch.remove() }
        let store = TimeSeriesContentStore(root: scratch.path, encryptionKey: try Self.randomKey(), threadPool: self.pool)
        var files: [[UInt8]] = []
        for number in 0..<2 {
            try await store.write(buffer("same plaintext"), at: "2025/10/23/msg_\(number).eml")
            files.append(try bytes(scratch.path + "/2025/10/23/msg_\(number).eml"))
        }
        try await store.write(buffer("same plaintext"), at: "2025/10/23/msg_0.eml")
        files.append(try bytes(scratch.path + "/2025/10/23/msg_0.eml"))
        let nonces = files.map { Array($0[6..<18]) }
        #expect(Set(nonces).count == 3)
        #expect(Set(files.map { Array($0[18...]) }).count == 3)
    }

    @Test func keyParsing() throws {
        let text = Self.randomKeyText()
        _ = try TimeSeriesContentStore.key(fromBase64: text)
        _ = try TimeSeriesContentStore.key(fromBase64: "  \(text)\n")
        let cases: [(String, String)] = [
            ("", "empty"),
            ("   ", "empty"),
            ("not base64 at all!", "not valid base64"),
            (Data(repeating: 7, count: 16).base64EncodedString(), "16 bytes"),
            (Data(repeating: 7, count: 33).base64EncodedString(), "33 bytes"),
            (String(text.dropLast()), "base64"),
        ]
        for (input, expected) in cases {
            #expect {
                _ = try TimeSeriesContentStore.key(fromBase64: input)
            } throws: { error in
                let description = "\(error)"
                return error is SealedFile.KeyError && description.contains(expected) && description.contains("32")
                    && (input.count < 8 || !description.contains(input))
            }
        }
    }

    @Test func sealedFileFormat() throws {
        let key = try Self.randomKey()
        let sealed = try SealedFile.seal(buffer("abc"), key: key)
        #expect(sealed.readableBytes == 3 + 34)
        #expect(try String(buffer: SealedFile.open(sealed, key: key)) == "abc")
        #expect(SealedFile.hasMagic(sealed) && !SealedFile.hasMagic(buffer("MTEN")))
        var future = sealed
        future.setInteger(UInt8(2), at: 5)
        #expect {
            _ = try SealedFile.open(future, key: key)
        } throws: { error in
            (error as? MailboxError)?.kind == .corrupt && "\(error)".contains("version 2")
        }
    }
}
