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

/// A fresh directory under the system temp dir, removed by `remove()`.
private struct TempDirectory {
    let path: String

    init() throws {
        var template = Array((NSTemporaryDirectory() + "/mailtier-files-XXXXXX").utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        try #require(made != nil)
        self.path = String(cString: made!)
    }

    func remove() { try? FileManager.default.removeItem(atPath: self.path) }
}

private func fileMode(_ path: String) throws -> mode_t {
    var info = stat()
    try #require(lstat(path, &info) == 0, "lstat \(path)")
    return info.st_mode & 0o7777
}

private func exists(_ path: String) -> Bool {
    var info = stat()
    return lstat(path, &info) == 0
}

private func contents(_ path: String) throws -> [UInt8] {
    [UInt8](try Data(contentsOf: URL(fileURLWithPath: path)))
}

private func names(in directory: String) throws -> [String] {
    try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
}

private func write(_ text: String, to path: String) throws {
    try Data(text.utf8).write(to: URL(fileURLWithPath: path))
}

/// Sets the mtime of `path` to `seconds` ago.
private func age(_ path: String, by seconds: Int) throws {
    let date = Date().addingTimeInterval(-Double(seconds))
    try FileManager.default.setAttributes([.modificationDate: date], ofItemAtPath: path)
}

private func buffer(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }

private func maildirDelivery(_ mailbox: String, key: String, mayBeStoredAlready: Bool = true) -> MailboxDelivery {
    MailboxDelivery(
        mailbox: mailbox, messageID: "msg_test", deliveryKey: key, sender: "a@b.example",
        receivedAt: Date(), mayBeStoredAlready: mayBeStoredAlready)
}

@Suite("FileStoreTests")
struct FileStoreTests {
    let pool = NIOThreadPool.singleton

    // MARK: Spool

    @Test func spoolCreatesPrivateDirectories() throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let dir = temp.path + "/a/spool"
        let spool = try SpoolBlobStore(directory: dir + "/", threadPool: self.pool)
        #expect(spool.directory == dir)
        #expect(try fileMode(dir) == 0o700)
        #expect(try fileMode(dir + "/tmp") == 0o700)
        // A second init on the existing directory is fine.
        _ = try SpoolBlobStore(directory: dir, threadPool: self.pool)
    }

    @Test func spoolRoundTrip() async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let spool = try SpoolBlobStore(directory: temp.path + "/spool", threadPool: self.pool)
        let body = "Subject: hi\r\n\r\n" + String(repeating: "0123456789abcdef", count: 10_000) + "\r\n"
        let before = Date().addingTimeInterval(-5)

        try await spool.put(key: "msg_1.eml", data: buffer(body))
        try await spool.put(key: "msg-2_B", data: buffer(""))

        #expect(try contents(spool.directory + "/msg_1.eml") == Array(body.utf8))
        #expect(try fileMode(spool.directory + "/msg_1.eml") == 0o600)
        #expect(try names(in: spool.directory + "/tmp") == [])

        let got = try await spool.get(key: "msg_1.eml")
        #expect(got == buffer(body))
        #expect(try await spool.get(key: "msg-2_B").readableBytes == 0)

        let listed = try await spool.list()
        #expect(listed.map(\.key) == ["msg-2_B", "msg_1.eml"])
        #expect(listed.allSatisfy { $0.modified > before && $0.modified < Date().addingTimeInterval(5) })

        // A put of an existing key replaces it.
        try await spool.put(key: "msg-2_B", data: buffer("second"))
        #expect(try await spool.get(key: "msg-2_B") == buffer("second"))

        try await spool.delete(key: "msg_1.eml")
        try await spool.delete(key: "msg_1.eml")  // missing: not an error
        #expect(!exists(spool.directory + "/msg_1.eml"))
        #expect(try await spool.list().map(\.key) == ["msg-2_B"])

        await #expect {
            _ = try await spool.get(key: "msg_1.eml")
        } throws: { error in
            (error as? FileStoreError)?.isNotFound == true
        }
    }

    @Test func spoolListIgnoresTmpAndForeignEntries() async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let spool = try SpoolBlobStore(directory: temp.path, threadPool: self.pool)
        try await spool.put(key: "a", data: buffer("x"))
        try write("partial", to: spool.directory + "/tmp/b.123")
        try FileManager.default.createDirectory(atPath: spool.directory + "/adir", withIntermediateDirectories: false)
        try write("x", to: spool.directory + "/bad name")
        #expect(try await spool.list().map(\.key) == ["a"])
    }

    @Test(arguments: [
        "", ".", "..", "tmp", "../etc/passwd", "a/b", "/abs", "a b", "a\0b", "é", "a\nb", "key:1", "~x",
        String(repeating: "k", count: SpoolBlobStore.maximumKeyLength + 1),
    ])
    func spoolRejectsInvalidKeys(key: String) async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let spool = try SpoolBlobStore(directory: temp.path + "/spool", threadPool: self.pool)
        #expect(!SpoolBlobStore.isValidKey(key))
        for operation in 0..<3 {
            await #expect {
                switch operation {
                case 0: try await spool.put(key: key, data: buffer("evil"))
                case 1: _ = try await spool.get(key: key)
                default: try await spool.delete(key: key)
                }
            } throws: { error in
                (error as? FileStoreError)?.kind == .invalidKey
            }
        }
        #expect(try names(in: temp.path) == ["spool"])
        #expect(try names(in: spool.directory) == ["tmp"])
        #expect(try names(in: spool.directory + "/tmp") == [])
    }

    @Test func spoolAcceptsValidKeys() {
        for key in ["a", "A-Z_a-z.0-9", "msg_01HZX.eml", ".hidden", "...", String(repeating: "k", count: 200)] {
            #expect(SpoolBlobStore.isValidKey(key), "\(key)")
        }
    }

    @Test func failedPutLeavesNoFile() async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let spool = try SpoolBlobStore(directory: temp.path, threadPool: self.pool)
        // A non-empty directory where the blob should go: the rename fails (even as root).
        try FileManager.default.createDirectory(
            atPath: spool.directory + "/blocked/inside", withIntermediateDirectories: true)
        await #expect {
            try await spool.put(key: "blocked", data: buffer("body"))
        } throws: { error in
            guard let error = error as? FileStoreError else { return false }
            return error.kind == .systemCall && error.operation == "rename" && error.errorNumber != 0
                && error.description.contains(spool.directory) && !error.reason.isEmpty
        }
        #expect(try names(in: spool.directory + "/tmp") == [])
        #expect(try names(in: spool.directory + "/blocked") == ["inside"])
        #expect(try await spool.list().isEmpty)
    }

    @Test func staleTemporaryFilesAreRemoved() async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let spool = try SpoolBlobStore(directory: temp.path, threadPool: self.pool)
        let tmp = spool.directory + "/tmp"
        try write("old", to: tmp + "/old.1")
        try age(tmp + "/old.1", by: 2 * 3600)
        try write("old", to: tmp + "/older.2")
        try age(tmp + "/older.2", by: 3 * 86400)
        try write("recent", to: tmp + "/recent.3")
        try age(tmp + "/recent.3", by: 1800)
        try write("now", to: tmp + "/now.4")
        try await spool.put(key: "kept", data: buffer("blob"))
        try age(spool.directory + "/kept", by: 5 * 3600)  // blobs are not temporary files

        let removed = try await spool.removeStaleTemporaryFiles(olderThan: .seconds(3600))
        #expect(removed == 2)
        #expect(try names(in: tmp) == ["now.4", "recent.3"])
        #expect(try await spool.get(key: "kept") == buffer("blob"))
        #expect(try await spool.removeStaleTemporaryFiles(olderThan: .seconds(3600)) == 0)
    }

    // MARK: Maildir naming

    @Test func deliveryKeyFormat() throws {
        let store = MaildirStore(root: "/nonexistent", hostname: "mx1.example.com", threadPool: self.pool)
        let key = store.makeDeliveryKey()
        let pattern = /^([0-9]{10,})\.M([0-9]{1,6})P([0-9]+)\.mx1\.example\.com$/
        let match = try #require(key.wholeMatch(of: pattern), "\(key)")
        let seconds = try #require(Int(match.1))
        #expect(abs(Double(seconds) - Date().timeIntervalSince1970) < 5)
        #expect(Int(match.2)! < 1_000_000)
        #expect(Int32(match.3) == getpid())
    }

    @Test func hostnameIsSanitized() {
        #expect(MaildirStore.sanitize(hostname: "a/b:c") == "a\\057b\\072c")
        let store = MaildirStore(root: "/x", hostname: "evil/host:25", threadPool: self.pool)
        let key = store.makeDeliveryKey()
        #expect(key.hasSuffix(".evil\\057host\\07225"))
        #expect(!key.contains("/") && !key.contains(":"))
    }

    @Test func deliveryKeysAreUnique() async throws {
        let store = MaildirStore(root: "/x", hostname: "h.example", threadPool: self.pool)
        var keys = Set<String>()
        for _ in 0..<10_000 { keys.insert(store.makeDeliveryKey()) }
        #expect(keys.count == 10_000)

        // Also across threads and across store instances of one process.
        let other = MaildirStore(root: "/y", hostname: "h.example", threadPool: self.pool)
        let concurrent = await withTaskGroup(of: [String].self) { group in
            for task in 0..<4 {
                let s = task.isMultiple(of: 2) ? store : other
                group.addTask { (0..<2500).map { _ in s.makeDeliveryKey() } }
            }
            var all: [String] = []
            for await part in group { all += part }
            return all
        }
        #expect(concurrent.count == 10_000)
        #expect(Set(concurrent).count == 10_000)
        #expect(keys.isDisjoint(with: concurrent))
    }

    // MARK: Maildir delivery

    @Test func deliverWritesExactBytesIntoNew() async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let root = temp.path + "/mail"
        let store = MaildirStore(root: root, hostname: "mx.example.com", threadPool: self.pool)
        let message = "From: a@b.example\r\nSubject: t\r\n\r\nbody \u{00e9}\r\n.\r\n" + String(repeating: "x", count: 70_000)
        let key = store.makeDeliveryKey()

        #expect(try await store.deliver(buffer(message), maildirDelivery("Jane@Example.COM", key: key)))

        let box = root + "/jane@example.com"
        #expect(try names(in: box) == ["cur", "new", "tmp"])
        for dir in [root, box, box + "/cur", box + "/new", box + "/tmp"] {
            #expect(try fileMode(dir) == 0o700, "\(dir)")
        }
        #expect(try names(in: box + "/new") == [key])
        #expect(try names(in: box + "/tmp") == [])
        #expect(try names(in: box + "/cur") == [])
        #expect(try contents(box + "/new/" + key) == Array(message.utf8))
        #expect(try fileMode(box + "/new/" + key) == 0o600)
        #expect(try store.messageFiles(of: "jane@example.com") == [box + "/new/" + key])
        #expect(try store.maildirPath(of: "JANE@example.com") == box)
    }

    @Test func secondDeliveryWithSameKeyStoresNothing() async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let store = MaildirStore(root: temp.path, hostname: "mx.example.com", threadPool: self.pool)
        let key = store.makeDeliveryKey()
        #expect(try await store.deliver(buffer("first"), maildirDelivery("u@example.com", key: key)))
        #expect(try await store.deliver(buffer("second"), maildirDelivery("u@example.com", key: key)) == false)
        #expect(try await store.deliver(buffer("third"), maildirDelivery("U@EXAMPLE.COM", key: key)) == false)

        let files = try store.messageFiles(of: "u@example.com")
        #expect(files.count == 1)
        #expect(try contents(files[0]) == Array("first".utf8))
        #expect(try names(in: temp.path + "/u@example.com/tmp") == [])

        // Same key, other mailbox: a separate delivery.
        #expect(try await store.deliver(buffer("first"), maildirDelivery("v@example.com", key: key)))
        // Other key, same mailbox: a second message.
        #expect(try await store.deliver(buffer("other"), maildirDelivery("u@example.com", key: store.makeDeliveryKey())))
        #expect(try store.messageFiles(of: "u@example.com").count == 2)
    }

    @Test(arguments: [":2,S", ":2,", ""])
    func messageMovedToCurIsNotDeliveredAgain(suffix: String) async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let store = MaildirStore(root: temp.path, hostname: "mx.example.com", threadPool: self.pool)
        let key = store.makeDeliveryKey()
        #expect(try await store.deliver(buffer("hello"), maildirDelivery("u@example.com", key: key)))
        let box = temp.path + "/u@example.com"
        // A mail reader moves it to cur/ (and marks it Seen).
        #expect(rename(box + "/new/" + key, box + "/cur/" + key + suffix) == 0)

        #expect(try await store.deliver(buffer("hello"), maildirDelivery("u@example.com", key: key)) == false)
        #expect(try store.messageFiles(of: "u@example.com") == [box + "/cur/" + key + suffix])
        #expect(try names(in: box + "/new") == [])
    }

    @Test func leftoverTmpIsNotMailAndIsOverwritten() async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let store = MaildirStore(root: temp.path, hostname: "mx.example.com", threadPool: self.pool)
        let box = temp.path + "/u@example.com"
        for dir in ["", "/tmp", "/new", "/cur"] {
            try FileManager.default.createDirectory(atPath: box + dir, withIntermediateDirectories: true)
        }
        let key = store.makeDeliveryKey()
        // A crashed attempt left a longer, partial file with a wide mode.
        try write(String(repeating: "partial garbage ", count: 100), to: box + "/tmp/" + key)
        chmod(box + "/tmp/" + key, 0o644)

        #expect(try store.messageFiles(of: "u@example.com") == [])
        #expect(try await store.usageBytes(of: "u@example.com") == 0)

        #expect(try await store.deliver(buffer("the real message"), maildirDelivery("u@example.com", key: key)))
        #expect(try contents(box + "/new/" + key) == Array("the real message".utf8))
        #expect(try fileMode(box + "/new/" + key) == 0o600)
        #expect(try names(in: box + "/tmp") == [])
        #expect(try await store.usageBytes(of: "u@example.com") == Int64("the real message".utf8.count))
    }

    /// A first attempt (fresh key) does not look for an earlier copy — unless tmp/<key> shows
    /// that an earlier attempt of the key exists after all (a worker that lost its lease).
    @Test func freshKeyWithLeftoverStillFindsTheEarlierCopy() async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let store = MaildirStore(root: temp.path, hostname: "mx.example.com", threadPool: self.pool)
        let key = store.makeDeliveryKey()
        #expect(try await store.deliver(buffer("first"), maildirDelivery("u@example.com", key: key, mayBeStoredAlready: false)))
        let box = temp.path + "/u@example.com"
        #expect(rename(box + "/new/" + key, box + "/cur/" + key + ":2,S") == 0)
        try write("partial", to: box + "/tmp/" + key)

        #expect(try await store.deliver(buffer("again"), maildirDelivery("u@example.com", key: key, mayBeStoredAlready: false)) == false)
        #expect(try store.messageFiles(of: "u@example.com") == [box + "/cur/" + key + ":2,S"])
        #expect(try names(in: box + "/tmp") == [])
    }

    /// The folder's directories are made when tmp/ is missing, and new/ when link() finds it
    /// missing (a crash between the mkdirs, or a reader that removed it).
    @Test func missingMaildirDirectoriesAreMadeAgain() async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let store = MaildirStore(root: temp.path + "/mail", hostname: "mx.example.com", threadPool: self.pool)
        let box = temp.path + "/mail/u@example.com"
        #expect(try await store.deliver(buffer("one"), maildirDelivery("u@example.com", key: store.makeDeliveryKey())))
        #expect(try fileMode(temp.path + "/mail") == 0o700)
        #expect(try names(in: box) == ["cur", "new", "tmp"])

        #expect(rmdir(box + "/tmp") == 0)
        #expect(try await store.deliver(buffer("two"), maildirDelivery("u@example.com", key: store.makeDeliveryKey())))
        #expect(try names(in: box) == ["cur", "new", "tmp"])

        let moved = try store.messageFiles(of: "u@example.com")
        for file in moved { #expect(unlink(file) == 0) }
        #expect(rmdir(box + "/new") == 0)
        let key = store.makeDeliveryKey()
        #expect(try await store.deliver(buffer("three"), maildirDelivery("u@example.com", key: key, mayBeStoredAlready: false)))
        #expect(try contents(box + "/new/" + key) == Array("three".utf8))
        #expect(try names(in: box + "/tmp") == [])

        // A Maildir++ folder gets its directory, maildirfolder and cur/new/tmp the same way.
        #expect(
            try await store.deliver(
                buffer("four"),
                MailboxDelivery(
                    mailbox: "u@example.com", folder: "Archive", messageID: "msg_test", deliveryKey: store.makeDeliveryKey(),
                    sender: "", receivedAt: Date())))
        #expect(try names(in: box + "/.Archive") == ["cur", "maildirfolder", "new", "tmp"])
    }

    @Test func usageCountsNewAndCur() async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let store = MaildirStore(root: temp.path + "/mail", hostname: "mx.example.com", threadPool: self.pool)
        #expect(try await store.usageBytes(of: "nobody@example.com") == 0)
        #expect(try store.messageFiles(of: "nobody@example.com") == [])

        let first = store.makeDeliveryKey()
        #expect(try await store.deliver(buffer(String(repeating: "a", count: 1000)), maildirDelivery("u@example.com", key: first)))
        #expect(try await store.deliver(buffer(String(repeating: "b", count: 234)), maildirDelivery("u@example.com", key: store.makeDeliveryKey())))
        let box = temp.path + "/mail/u@example.com"
        #expect(rename(box + "/new/" + first, box + "/cur/" + first + ":2,S") == 0)
        try write("junk", to: box + "/tmp/leftover")
        try FileManager.default.createDirectory(atPath: box + "/cur/subdir", withIntermediateDirectories: false)

        #expect(try await store.usageBytes(of: "U@example.com") == 1234)
        #expect(try store.messageFiles(of: "u@example.com").count == 2)
    }

    @Test(arguments: ["", ".hidden@example.com", "..", "a/b@example.com", "../../etc", "a\0b@example.com"])
    func invalidMailboxesAreRejected(mailbox: String) async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let store = MaildirStore(root: temp.path, hostname: "mx.example.com", threadPool: self.pool)
        await #expect {
            _ = try await store.deliver(buffer("x"), maildirDelivery(mailbox, key: store.makeDeliveryKey()))
        } throws: { error in
            (error as? MailboxError)?.kind == .invalidMailbox
        }
        await #expect(throws: MailboxError.self) { _ = try await store.usageBytes(of: mailbox) }
        await #expect(throws: MailboxError.self) { _ = try await store.list(mailbox: mailbox, folder: "INBOX", offset: 0, limit: 10) }
        await #expect(throws: MailboxError.self) { try await store.deleteMailbox(mailbox) }
        #expect(throws: MailboxError.self) { _ = try store.messageFiles(of: mailbox) }
        #expect(try names(in: temp.path) == [])
    }

    @Test(arguments: ["", "../x", "a/b", ".hidden", "key:2,S", "a\nb"])
    func invalidDeliveryKeysAreRejected(key: String) async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let store = MaildirStore(root: temp.path, hostname: "mx.example.com", threadPool: self.pool)
        await #expect {
            _ = try await store.deliver(buffer("x"), maildirDelivery("u@example.com", key: key))
        } throws: { error in
            (error as? FileStoreError)?.kind == .invalidDeliveryKey
        }
        #expect(try names(in: temp.path) == [])
    }

    @Test func concurrentDeliveriesOfOneKeyStoreOneCopy() async throws {
        let temp = try TempDirectory()
        defer { temp.remove() }
        let store = MaildirStore(root: temp.path, hostname: "mx.example.com", threadPool: self.pool)
        let key = store.makeDeliveryKey()
        let stored = try await withThrowingTaskGroup(of: Bool.self) { group in
            for _ in 0..<8 {
                group.addTask { try await store.deliver(buffer("same message"), maildirDelivery("u@example.com", key: key)) }
            }
            var count = 0
            for try await result in group where result { count += 1 }
            return count
        }
        #expect(stored == 1)
        let files = try store.messageFiles(of: "u@example.com")
        #expect(files.count == 1)
        #expect(try contents(files[0]) == Array("same message".utf8))
    }
}
