#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import MailTier
import NIOCore
import NIOPosix

/// The mbox `MailboxStore` (API.md, "Storage API → mbox Storage"): one mboxrd file per
/// mailbox, `INBOX` only.
///
/// Files, in `<root>` (0700), all 0600:
/// - `<email>`: the mbox. Each message is `From <sender or MAILER-DAEMON> <asctime, UTC>` LF,
///   the message with CRLF turned into LF and mboxrd escaping (a line matching `^>*From ` gets
///   one more `>`), a final LF if the message lacked one, and an empty line. The message bytes
///   are otherwise untouched (no `X-…`, `Status:` or `X-Status:` header is added).
/// - `.<email>.index`: one line per message, `<messageID> <offset> <length> <flags> <receivedAt>`
///   (offset and length of the whole entry, From_ line and empty line included, in bytes; flags
///   as maildir letters in ASCII order or `-` for none; receivedAt in Unix seconds, with a
///   fraction when it has one). Flags live only here: other mbox readers do not see them.
///   A message is in the mailbox when, and only when, its line is in the index.
///
/// Consistency: every operation holds an `fcntl` lock on the mbox file (exclusive to write,
/// shared to read; open-file-description locks on Linux, so that two threads of one process
/// exclude each other too, and they conflict with classic `F_SETLKW` locks of other programs).
/// A lock not obtained within `lockPatience` (20 s) fails the operation (a delivery is retried later).
/// An append remembers the end of the last indexed message, truncates anything after it (the
/// torn tail of a writer killed mid-append), writes and fsyncs the entry, then appends and
/// fsyncs the index line; on any error both files are truncated back, so earlier messages are
/// never damaged. Because of that repair, bytes appended to the mbox by another program
/// without an index line are dropped by the next delivery: the mbox belongs to MailTier.
///
/// `delete` rewrites both files: `.<email>.rewrite` and `.<email>.index.tmp` are written and
/// fsync'd, the new index is renamed to `.<email>.index.pending` (the commit point), then the
/// new mbox and the new index are renamed into place. Whoever next locks the mbox and finds a
/// `.pending` index finishes an interrupted rewrite.
///
/// Every blocking call runs on `threadPool`.
public struct MboxStore: MailboxStore {
    public let root: String
    let threadPool: NIOThreadPool
    /// How long an operation tries to lock the mbox before it fails (like Postfix's
    /// `deliver_lock_attempts` × `deliver_lock_delay`): a holder may be a stopped process, and a
    /// delivery that gives up is retried later, while one that waited would hold a thread of the
    /// pool for good.
    public let lockPatience: Duration

    /// Longest mailbox address: the file names of the index and its temporaries must fit in
    /// NAME_MAX (255).
    public static let maximumMailboxLength = 240

    public init(root: String, threadPool: NIOThreadPool, lockPatience: Duration = .seconds(20)) {
        self.root = FileStoreIO.normalize(root)
        self.threadPool = threadPool
        self.lockPatience = lockPatience
    }

    public func makeDeliveryKey() -> String { MessageID.make() }

    /// The files of one mailbox.
    struct Paths: Sendable {
        var root: String
        var mbox: String
        var index: String
        var indexTemporary: String
        var indexPending: String
        var rewrite: String
        var lockPatience: Duration

        init(root: String, name: String, lockPatience: Duration) {
            self.root = root
            self.lockPatience = lockPatience
            self.mbox = "\(root)/\(name)"
            self.index = "\(root)/.\(name).index"
            self.indexTemporary = "\(root)/.\(name).index.tmp"
            self.indexPending = "\(root)/.\(name).index.pending"
            self.rewrite = "\(root)/.\(name).rewrite"
        }
    }

    /// The mbox file of `mailbox` (lowercased). Throws a `MailboxError` of kind
    /// `.invalidMailbox` for an empty address, `/`, control characters, a leading `.`, or more
    /// than `maximumMailboxLength` bytes.
    public func mboxPath(of mailbox: String) throws(MailboxError) -> String {
        try self.paths(of: mailbox).mbox
    }

    func paths(of mailbox: String) throws(MailboxError) -> Paths {
        Paths(
            root: self.root, name: try MailboxNames.fileName(of: mailbox, maximumLength: Self.maximumMailboxLength),
            lockPatience: self.lockPatience)
    }

    func paths(of mailbox: String, folder: String) throws(MailboxError) -> Paths {
        let paths = try self.paths(of: mailbox)
        guard folder.uppercased() == "INBOX" else {
            throw MailboxError(
                .unsupportedFolder, "mbox storage keeps only INBOX, not \(String(reflecting: String(folder.prefix(80))))")
        }
        return paths
    }

    // MARK: MailboxStore

    /// Appends the message unless the index already has `delivery.messageID`.
    public func deliver(_ message: ByteBuffer, _ delivery: MailboxDelivery) async throws -> Bool {
        let paths = try self.paths(of: delivery.mailbox, folder: delivery.folder)
        let messageID = delivery.messageID
        guard Self.isValidMessageID(messageID) else {
            throw FileStoreError(
                kind: .invalidDeliveryKey, operation: "deliver", path: paths.mbox,
                reason: "invalid message id \(String(reflecting: String(messageID.prefix(80))))")
        }
        let entry = Self.encode(message, sender: delivery.sender, receivedAt: delivery.receivedAt)
        let receivedAt = delivery.receivedAt.timeIntervalSince1970
        return try await self.threadPool.runIfActive {
            try FileStoreIO.makeDirectories(paths.root, mode: 0o700, syncParents: true)
            return try Self.withLockedMbox(paths, exclusive: true) { fd in
                guard let fd else { return false }  // not reached: created when missing
                var state = try Self.loadIndex(paths, mboxFD: fd)
                if state.entries.contains(where: { $0.messageID == messageID }) { return false }
                try Self.repair(&state, paths: paths, mboxFD: fd)

                let start = state.end
                do {
                    try FileStoreIO.write(fd, entry, at: start, path: paths.mbox)
                    try FileStoreIO.fsync(fd, path: paths.mbox)
                } catch {
                    try? FileStoreIO.truncate(fd, to: start, path: paths.mbox)
                    throw error
                }
                let line = IndexEntry(
                    messageID: messageID, offset: start, length: entry.readableBytes, flags: [], receivedAt: receivedAt
                ).line
                do {
                    try Self.appendIndexLine(line, paths: paths, at: state.indexLength)
                } catch {
                    try? FileStoreIO.truncate(fd, to: start, path: paths.mbox)
                    try? FileStoreIO.fsync(fd, path: paths.mbox)
                    throw error
                }
                return true
            }
        }
    }

    /// Oldest first (by the time received, then by position in the file).
    public func list(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (messages: [StoredMessage], total: Int) {
        let paths = try self.paths(of: mailbox, folder: folder)
        return try await self.threadPool.runIfActive {
            try Self.withLockedMbox(paths, exclusive: false) { fd in
                guard let fd else { return ([], 0) }
                let entries = try Self.loadIndex(paths, mboxFD: fd).entries.sorted {
                    ($0.receivedAt, $0.offset) < ($1.receivedAt, $1.offset)
                }
                let start = min(max(offset, 0), entries.count)
                let end = min(start + max(limit, 0), entries.count)
                var messages: [StoredMessage] = []
                for entry in entries[start..<end] {
                    let message = try Self.readMessage(entry, fd: fd, paths: paths)
                    let headers = MessageHeaders(message)
                    messages.append(
                        StoredMessage(
                            id: entry.messageID, folder: "INBOX", size: message.readableBytes,
                            date: Date(timeIntervalSince1970: entry.receivedAt), flags: entry.flags,
                            subject: headers.subject, from: headers["From"]))
                }
                return (messages, entries.count)
            }
        }
    }

    /// The message unescaped, with LF turned back into CRLF: the delivered bytes when they were
    /// CRLF text ending in a line break.
    public func fetch(mailbox: String, folder: String, id: String) async throws -> ByteBuffer? {
        let paths = try self.paths(of: mailbox, folder: folder)
        return try await self.threadPool.runIfActive { () throws -> ByteBuffer? in
            try Self.withLockedMbox(paths, exclusive: false) { fd -> ByteBuffer? in
                guard let fd else { return nil }
                guard let entry = try Self.loadIndex(paths, mboxFD: fd).entries.first(where: { $0.messageID == id }) else {
                    return nil
                }
                return try Self.readMessage(entry, fd: fd, paths: paths)
            }
        }
    }

    /// Rewrites the mbox without the message, and the index (see the type's documentation).
    public func delete(mailbox: String, folder: String, id: String) async throws -> Bool {
        let paths = try self.paths(of: mailbox, folder: folder)
        return try await self.threadPool.runIfActive {
            try Self.withLockedMbox(paths, exclusive: true, create: false) { fd in
                guard let fd else { return false }
                let state = try Self.loadIndex(paths, mboxFD: fd)
                guard state.entries.contains(where: { $0.messageID == id }) else { return false }
                try Self.rewrite(paths, from: fd, keeping: state.entries.filter { $0.messageID != id })
                return true
            }
        }
    }

    /// Changes the flags in the index only (no `Status:`/`X-Status:` header is written).
    public func setFlags(_ flags: Set<MessageFlag>, mailbox: String, folder: String, id: String) async throws -> Bool {
        let paths = try self.paths(of: mailbox, folder: folder)
        return try await self.threadPool.runIfActive {
            try Self.withLockedMbox(paths, exclusive: true, create: false) { fd in
                guard let fd else { return false }
                var entries = try Self.loadIndex(paths, mboxFD: fd).entries
                guard let position = entries.firstIndex(where: { $0.messageID == id }) else { return false }
                if entries[position].flags == flags { return true }
                entries[position].flags = flags
                try Self.writeIndexFile(entries, to: paths.indexTemporary)
                try FileStoreIO.rename(paths.indexTemporary, paths.index)
                try FileStoreIO.fsyncDirectory(paths.root)
                return true
            }
        }
    }

    /// The size of the mbox file; 0 when there is none.
    public func usageBytes(of mailbox: String) async throws -> Int64 {
        let paths = try self.paths(of: mailbox)
        return try await self.threadPool.runIfActive {
            guard let info = try FileStoreIO.lstatIfExists(paths.mbox), FileStoreIO.isRegularFile(info) else { return 0 }
            return Int64(info.st_size)
        }
    }

    /// Removes the index (first: a crash in between leaves an mbox with no messages) and then
    /// the mbox, under the mbox's write lock.
    public func deleteMailbox(_ mailbox: String) async throws {
        let paths = try self.paths(of: mailbox)
        try await self.threadPool.runIfActive {
            let remove = { () throws(FileStoreError) -> Void in
                for path in [paths.indexPending, paths.index, paths.indexTemporary, paths.rewrite, paths.mbox] {
                    try FileStoreIO.unlinkIfExists(path)
                }
                if try FileStoreIO.lstatIfExists(paths.root) != nil { try FileStoreIO.fsyncDirectory(paths.root) }
            }
            try Self.withLockedMbox(paths, exclusive: true, create: false, recover: false) { _ in
                try remove()
            }
        }
    }

    // MARK: Format

    /// A message id usable in the index: 1 to 200 bytes, no space or control character.
    static func isValidMessageID(_ id: String) -> Bool {
        !id.isEmpty && id.utf8.count <= 200 && !id.utf8.contains(where: { $0 <= 0x20 || $0 == 0x7F })
    }

    /// The `From ` line: the sender (spaces and control characters become `_`) or
    /// `MAILER-DAEMON` for the null reverse path, and the asctime date in UTC.
    public static func fromLine(sender: String, receivedAt: Date) -> String {
        var name = String(String.UnicodeScalarView(sender.unicodeScalars.map { $0.value <= 0x20 || $0.value == 0x7F ? "_" : $0 }))
        if name.isEmpty { name = "MAILER-DAEMON" }
        return "From \(name) \(MailDate.asctime(receivedAt))"
    }

    /// One mbox entry: From_ line, the message (CRLF → LF, mboxrd-escaped, ending in LF), and
    /// an empty line.
    public static func encode(_ message: ByteBuffer, sender: String, receivedAt: Date) -> ByteBuffer {
        var out = ByteBufferAllocator().buffer(capacity: message.readableBytes + message.readableBytes / 32 + 128)
        out.writeString(Self.fromLine(sender: sender, receivedAt: receivedAt))
        out.writeInteger(UInt8(ascii: "\n"))
        message.withUnsafeReadableBytes { bytes in
            var lineStart = 0
            while lineStart < bytes.count {
                var next = lineStart
                while next < bytes.count, bytes[next] != UInt8(ascii: "\n") { next += 1 }
                var lineEnd = next
                if next < bytes.count, lineEnd > lineStart, bytes[lineEnd - 1] == UInt8(ascii: "\r") { lineEnd -= 1 }
                let line = UnsafeRawBufferPointer(rebasing: bytes[lineStart..<lineEnd])
                if Self.isFromLine(line) { out.writeInteger(UInt8(ascii: ">")) }
                out.writeBytes(line)
                out.writeInteger(UInt8(ascii: "\n"))
                lineStart = next + 1
            }
        }
        out.writeInteger(UInt8(ascii: "\n"))
        return out
    }

    /// The message of one entry: without the From_ line and the empty line, one `>` removed
    /// from every line matching `^>+From `, every LF turned into CRLF.
    public static func decode(_ entry: ByteBuffer) throws(MailboxError) -> ByteBuffer {
        let bad = MailboxError(.corrupt, "mbox entry is damaged (no From_ line or final empty line): the index does not match the file")
        return try entry.withUnsafeReadableBytes { bytes throws(MailboxError) -> ByteBuffer in
            guard bytes.count >= 7, bytes.starts(with: "From ".utf8), bytes[bytes.count - 1] == UInt8(ascii: "\n"),
                let firstLF = bytes.firstIndex(of: UInt8(ascii: "\n"))
            else { throw bad }
            let bodyStart = firstLF + 1
            let bodyEnd = bytes.count - 1  // the empty line's LF
            guard bodyStart <= bodyEnd, bodyStart == bodyEnd || bytes[bodyEnd - 1] == UInt8(ascii: "\n") else { throw bad }
            var out = ByteBufferAllocator().buffer(capacity: bodyEnd - bodyStart + (bodyEnd - bodyStart) / 32 + 16)
            var lineStart = bodyStart
            while lineStart < bodyEnd {
                var next = lineStart
                while bytes[next] != UInt8(ascii: "\n") { next += 1 }  // every line ends in LF
                var line = UnsafeRawBufferPointer(rebasing: bytes[lineStart..<next])
                if line.first == UInt8(ascii: ">"), Self.isFromLine(line) {
                    line = UnsafeRawBufferPointer(rebasing: line.dropFirst())
                }
                out.writeBytes(line)
                out.writeBytes([UInt8(ascii: "\r"), UInt8(ascii: "\n")])
                lineStart = next + 1
            }
            return out
        }
    }

    /// `^>*From `.
    static func isFromLine(_ line: UnsafeRawBufferPointer) -> Bool {
        var index = 0
        while index < line.count, line[index] == UInt8(ascii: ">") { index += 1 }
        return UnsafeRawBufferPointer(rebasing: line[index...]).starts(with: "From ".utf8)
    }

    // MARK: Index

    struct IndexEntry: Equatable {
        var messageID: String
        var offset: Int
        var length: Int
        var flags: Set<MessageFlag>
        /// Unix seconds.
        var receivedAt: Double

        var end: Int { self.offset + self.length }

        var line: String {
            let letters = MessageFlag.letters(self.flags)
            let time: String
            if self.receivedAt == self.receivedAt.rounded(.down), abs(self.receivedAt) < 1e15 {
                time = String(Int64(self.receivedAt))
            } else {
                let micros = (self.receivedAt * 1_000_000).rounded()
                let seconds = (micros / 1_000_000).rounded(.down)
                let fraction = Int64(micros - seconds * 1_000_000)
                let digits = String(fraction)
                time = "\(Int64(seconds)).\(String(repeating: "0", count: 6 - digits.count))\(digits)"
            }
            return "\(self.messageID) \(self.offset) \(self.length) \(letters.isEmpty ? "-" : letters) \(time)\n"
        }

        init(messageID: String, offset: Int, length: Int, flags: Set<MessageFlag>, receivedAt: Double) {
            self.messageID = messageID
            self.offset = offset
            self.length = length
            self.flags = flags
            self.receivedAt = receivedAt
        }

        init?(line: Substring) {
            let fields = line.split(separator: " ", omittingEmptySubsequences: false)
            guard fields.count == 5, let offset = Int(fields[1]), let length = Int(fields[2]), offset >= 0, length > 0,
                let receivedAt = Double(fields[4]), receivedAt.isFinite, MboxStore.isValidMessageID(String(fields[0]))
            else { return nil }
            self.init(
                messageID: String(fields[0]), offset: offset, length: length,
                flags: fields[3] == "-" ? [] : MessageFlag.parse(fields[3]), receivedAt: receivedAt)
        }
    }

    /// The index as read under the lock.
    struct IndexState {
        /// The entries whose bytes are all inside the mbox, in file order.
        var entries: [IndexEntry]
        /// The index has lines for bytes past the end of the mbox (dropped from `entries`) or
        /// ends in a torn line.
        var needsRewrite: Bool
        /// Bytes of the index up to its last complete line.
        var indexLength: Int
        /// The mbox size.
        var mboxSize: Int

        /// The end of the last indexed message.
        var end: Int { self.entries.map(\.end).max() ?? 0 }
    }

    static func loadIndex(_ paths: Paths, mboxFD: Int32) throws(FileStoreError) -> IndexState {
        let mboxSize = try FileStoreIO.size(of: mboxFD, path: paths.mbox)
        let data: ByteBuffer
        do {
            data = try FileStoreIO.readAll(paths.index)
        } catch where error.isNotFound {
            return IndexState(entries: [], needsRewrite: false, indexLength: 0, mboxSize: mboxSize)
        }
        let text = String(decoding: data.readableBytesView, as: UTF8.self)
        var entries: [IndexEntry] = []
        var needsRewrite = false
        var complete = 0
        var seen = Set<String>()
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        if let last = lines.popLast(), !last.isEmpty { needsRewrite = true }  // torn last line
        for line in lines {
            complete += line.utf8.count + 1
            // A malformed line names no message (and no message is found by it).
            guard let entry = IndexEntry(line: line) else { continue }
            if entry.end > mboxSize || seen.contains(entry.messageID) {
                needsRewrite = true
                continue
            }
            seen.insert(entry.messageID)
            entries.append(entry)
        }
        return IndexState(entries: entries, needsRewrite: needsRewrite, indexLength: complete, mboxSize: mboxSize)
    }

    /// Before an append, under the write lock: drops index lines that point past the end of
    /// the mbox or are torn, and truncates the mbox after the last indexed message.
    static func repair(_ state: inout IndexState, paths: Paths, mboxFD: Int32) throws(FileStoreError) {
        if state.needsRewrite {
            try Self.writeIndexFile(state.entries, to: paths.indexTemporary)
            try FileStoreIO.rename(paths.indexTemporary, paths.index)
            try FileStoreIO.fsyncDirectory(paths.root)
            state.indexLength = state.entries.reduce(0) { $0 + $1.line.utf8.count }
            state.needsRewrite = false
        }
        let end = state.end
        if state.mboxSize > end {
            try FileStoreIO.truncate(mboxFD, to: end, path: paths.mbox)
            try FileStoreIO.fsync(mboxFD, path: paths.mbox)
            state.mboxSize = end
        }
    }

    static func appendIndexLine(_ line: String, paths: Paths, at offset: Int) throws(FileStoreError) {
        let created = try FileStoreIO.lstatIfExists(paths.index) == nil
        let fd = try FileStoreIO.open(paths.index, flags: O_WRONLY | O_CREAT | O_NOFOLLOW, mode: 0o600)
        defer { try? FileStoreIO.close(fd, path: paths.index) }
        do {
            try FileStoreIO.truncate(fd, to: offset, path: paths.index)
            try FileStoreIO.write(fd, ByteBuffer(string: line), at: offset, path: paths.index)
            try FileStoreIO.fsync(fd, path: paths.index)
            if created { try FileStoreIO.fsyncDirectory(paths.root) }
        } catch {
            try? FileStoreIO.truncate(fd, to: offset, path: paths.index)
            try? FileStoreIO.fsync(fd, path: paths.index)
            throw error
        }
    }

    /// Writes `entries` as a complete index file at `path` (replaced), fsync'd.
    static func writeIndexFile(_ entries: [IndexEntry], to path: String) throws(FileStoreError) {
        var text = ""
        for entry in entries { text += entry.line }
        let fd = try FileStoreIO.open(path, flags: O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, mode: 0o600)
        do throws(FileStoreError) {
            if fchmod(fd, 0o600) != 0 { throw FileStoreError.system("fchmod", path, errno) }
            try FileStoreIO.writeAll(fd, ByteBuffer(string: text), path: path)
            try FileStoreIO.fsync(fd, path: path)
        } catch {
            try? FileStoreIO.close(fd, path: path)
            try? FileStoreIO.unlinkIfExists(path)
            throw error
        }
        try FileStoreIO.close(fd, path: path)
    }

    static func readMessage(_ entry: IndexEntry, fd: Int32, paths: Paths) throws -> ByteBuffer {
        let bytes = try FileStoreIO.read(fd, offset: entry.offset, count: entry.length, path: paths.mbox)
        guard bytes.readableBytes == entry.length else {
            throw MailboxError(.corrupt, "mbox \(paths.mbox) is shorter than its index says")
        }
        do {
            return try Self.decode(bytes)
        } catch {
            throw MailboxError(.corrupt, "\(error.message) (\(paths.mbox), offset \(entry.offset))")
        }
    }

    /// Writes a new mbox with `entries` only, and its index, and puts both in place (see the
    /// type's documentation). Called with the write lock on `fd`, the current mbox.
    static func rewrite(_ paths: Paths, from fd: Int32, keeping entries: [IndexEntry]) throws {
        try FileStoreIO.unlinkIfExists(paths.rewrite)
        let out = try FileStoreIO.open(paths.rewrite, flags: O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW, mode: 0o600)
        defer { try? FileStoreIO.close(out, path: paths.rewrite) }  // last: holds the new file's lock
        var committed = false
        defer {
            if !committed {
                try? FileStoreIO.unlinkIfExists(paths.rewrite)
                try? FileStoreIO.unlinkIfExists(paths.indexTemporary)
            }
        }
        // Whoever opens the new file once it is in place waits for this rewrite to finish.
        try Self.lock(out, exclusive: true, path: paths.rewrite, patience: paths.lockPatience)
        var moved: [IndexEntry] = []
        var position = 0
        for entry in entries.sorted(by: { $0.offset < $1.offset }) {
            var copied = 0
            while copied < entry.length {
                let chunk = min(entry.length - copied, 1 << 20)
                let bytes = try FileStoreIO.read(fd, offset: entry.offset + copied, count: chunk, path: paths.mbox)
                guard bytes.readableBytes == chunk else {
                    throw MailboxError(.corrupt, "mbox \(paths.mbox) is shorter than its index says")
                }
                try FileStoreIO.write(out, bytes, at: position + copied, path: paths.rewrite)
                copied += chunk
            }
            var updated = entry
            updated.offset = position
            moved.append(updated)
            position += entry.length
        }
        try FileStoreIO.fsync(out, path: paths.rewrite)
        try Self.writeIndexFile(moved, to: paths.indexTemporary)
        try FileStoreIO.rename(paths.indexTemporary, paths.indexPending)
        try FileStoreIO.fsyncDirectory(paths.root)
        committed = true
        // From here on, an interrupted rewrite is finished by `recover`.
        try FileStoreIO.rename(paths.rewrite, paths.mbox)
        try FileStoreIO.rename(paths.indexPending, paths.index)
        try FileStoreIO.fsyncDirectory(paths.root)
    }

    /// Finishes a rewrite that was committed (`.pending` index exists) but not completed.
    /// Called with the write lock on the current mbox. Tolerates a concurrent finisher.
    static func recover(_ paths: Paths) throws(FileStoreError) {
        guard try FileStoreIO.lstatIfExists(paths.indexPending) != nil else { return }
        if try FileStoreIO.lstatIfExists(paths.rewrite) != nil {
            try Self.renameUnlessMissing(paths.rewrite, paths.mbox)
        }
        try Self.renameUnlessMissing(paths.indexPending, paths.index)
        try FileStoreIO.fsyncDirectory(paths.root)
    }

    // MARK: Locking

    #if os(Linux)
    /// `F_OFD_SETLK` (Linux 3.15+): not exported by Glibc's Swift module.
    static let setLock: Int32 = 37
    #else
    static let setLock: Int32 = F_SETLK
    #endif

    /// Takes a whole-file lock on `fd`, trying again every 50 ms for `patience`; then throws
    /// `EWOULDBLOCK` ("mailbox locked by another process").
    static func lock(_ fd: Int32, exclusive: Bool, path: String, patience: Duration) throws(FileStoreError) {
        var request = flock()
        request.l_type = Int16(exclusive ? F_WRLCK : F_RDLCK)
        request.l_whence = Int16(SEEK_SET)
        request.l_start = 0
        request.l_len = 0
        request.l_pid = 0
        let deadline = ContinuousClock.now + patience
        while fcntl(fd, Self.setLock, &request) != 0 {
            let code = errno
            if code == EINTR { continue }
            guard code == EAGAIN || code == EACCES || code == EWOULDBLOCK else { throw .system("fcntl(lock)", path, code) }
            guard ContinuousClock.now < deadline else {
                throw FileStoreError(
                    kind: .systemCall, operation: "fcntl(lock)", path: path, errorNumber: EWOULDBLOCK,
                    reason: "mailbox locked by another process for \(patience)")
            }
            usleep(50_000)
        }
    }

    /// Runs `body` with the mbox open and locked (`nil` when it does not exist and `create` is
    /// false). The lock is taken on the file the path names once locked (a rewrite or a
    /// deleted mailbox replaces it meanwhile: then it starts again). An interrupted rewrite is
    /// finished first.
    static func withLockedMbox<T>(
        _ paths: Paths, exclusive: Bool, create: Bool = true, recover shouldRecover: Bool = true, _ body: (Int32?) throws -> T
    ) throws -> T {
        while true {
            let existed = try FileStoreIO.lstatIfExists(paths.mbox) != nil
            let flags = exclusive ? O_RDWR | O_NOFOLLOW | (create ? O_CREAT : 0) : O_RDONLY | O_NOFOLLOW
            guard let fd = try Self.openUnlessMissing(paths.mbox, flags: flags) else {
                if shouldRecover, try FileStoreIO.lstatIfExists(paths.indexPending) != nil,
                    try Self.recoverWithoutMbox(paths)
                {
                    continue  // a rewrite that stopped between its renames: now finished
                }
                return try body(nil)
            }
            do {
                try Self.lock(fd, exclusive: exclusive, path: paths.mbox, patience: paths.lockPatience)
                var held = stat()
                guard fstat(fd, &held) == 0 else { throw FileStoreError.system("fstat", paths.mbox, errno) }
                guard let named = try FileStoreIO.lstatIfExists(paths.mbox), named.st_dev == held.st_dev,
                    named.st_ino == held.st_ino
                else {
                    try? FileStoreIO.close(fd, path: paths.mbox)
                    continue
                }
                if !existed, create { try FileStoreIO.fsyncDirectory(paths.root) }
                if shouldRecover, try FileStoreIO.lstatIfExists(paths.indexPending) != nil {
                    if exclusive {
                        try Self.recover(paths)
                        try? FileStoreIO.close(fd, path: paths.mbox)
                    } else {
                        try? FileStoreIO.close(fd, path: paths.mbox)
                        try Self.withLockedMbox(paths, exclusive: true, create: false) { _ in }
                    }
                    continue
                }
            } catch {
                try? FileStoreIO.close(fd, path: paths.mbox)
                throw error
            }
            defer { try? FileStoreIO.close(fd, path: paths.mbox) }
            return try body(fd)
        }
    }

    /// A pending rewrite with no mbox file at all (only possible if it was removed by hand
    /// or by a crash of `deleteMailbox`): the rewritten file, if any, is renamed into place.
    /// Returns true when something was done.
    static func recoverWithoutMbox(_ paths: Paths) throws(FileStoreError) -> Bool {
        guard try FileStoreIO.lstatIfExists(paths.rewrite) != nil else {
            // No data for the pending index: it indexes nothing.
            try FileStoreIO.unlinkIfExists(paths.indexPending)
            return false
        }
        try Self.renameUnlessMissing(paths.rewrite, paths.mbox)
        return true
    }

    /// `open` (mode 0600 if created), or nil when the file does not exist.
    static func openUnlessMissing(_ path: String, flags: Int32) throws(FileStoreError) -> Int32? {
        do {
            return try FileStoreIO.open(path, flags: flags, mode: 0o600)
        } catch {
            if error.isNotFound { return nil }
            throw error
        }
    }

    /// `rename`, where a missing source (renamed by someone else) is not an error.
    static func renameUnlessMissing(_ from: String, _ to: String) throws(FileStoreError) {
        do {
            try FileStoreIO.rename(from, to)
        } catch {
            if !error.isNotFound { throw error }
        }
    }
}
