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

/// The maildir `MailboxStore` (API.md, "Storage API → Maildir Storage"), with Maildir++ folders.
///
/// Layout: `<root>/<email, lowercased>/{cur,new,tmp}` is `INBOX`; any other folder `Name` is the
/// Maildir++ subfolder `<root>/<email>/.Name/{cur,new,tmp}` (with an empty `maildirfolder`
/// file). Directories 0700, files 0600.
///
/// Delivery: a message is written to `tmp/<key>` (under an exclusive `flock`; to a file of its
/// own when another attempt holds it, never waiting), fsync'd,
/// hard-linked to `new/<key>`, and `new/` is fsync'd before `deliver` returns. The delivery key
/// is the maildir unique name, so a retried delivery of the same job finds its earlier copy
/// (in `new/`, or in `cur/` with any set of the standard flags S R F T D) and stores nothing.
///
/// Messages: the id of a message is its file name without the `:2,<flags>` info part.
/// `setFlags` renames it to `cur/<id>:2,<letters>` (letters in ASCII order, e.g. `:2,FS`;
/// letters this store does not know, such as lower-case keywords of other programs, are kept).
/// Files in `tmp/` and names starting with `.` are never messages.
///
/// Every blocking call of the async API runs on `threadPool`.
public struct MaildirStore: MailboxStore {
    public let root: String
    /// The hostname as it appears in unique names (`/` → `\057`, `:` → `\072`).
    public let sanitizedHostname: String
    let threadPool: NIOThreadPool

    /// Longest accepted delivery key (a file name, with room for `:2,<flags>`).
    public static let maximumDeliveryKeyLength = 200
    /// Longest accepted folder name (the directory is `.` + name).
    public static let maximumFolderNameLength = 200
    /// How much of a message `list` reads for its subject and sender.
    public static let headerReadLimit = 65_536

    public init(root: String, hostname: String, threadPool: NIOThreadPool) {
        self.root = FileStoreIO.normalize(root)
        self.sanitizedHostname = Self.sanitize(hostname: hostname)
        self.threadPool = threadPool
    }

    /// Maildir convention for the host part of a unique name: `/` → `\057`, `:` → `\072`.
    public static func sanitize(hostname: String) -> String {
        var result = ""
        for character in hostname {
            switch character {
            case "/": result += "\\057"
            case ":": result += "\\072"
            case "\0": continue
            default: result.append(character)
            }
        }
        return result.isEmpty ? "localhost" : result
    }

    // MARK: Naming

    /// A fresh unique name `<unix seconds>.M<microseconds>P<pid>.<hostname>`. Unique within the
    /// process: if the clock has not moved since the last key (or went back), the microseconds
    /// are bumped past the last value handed out.
    public func makeDeliveryKey() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let micros = DeliveryKeyClock.shared.next(
            notBefore: Int64(now.tv_sec) * 1_000_000 + Int64(now.tv_nsec) / 1000)
        return "\(micros / 1_000_000).M\(micros % 1_000_000)P\(getpid()).\(self.sanitizedHostname)"
    }

    /// The maildir directory of `mailbox` (lowercased). Rejects an empty address, `/`, NUL,
    /// control characters, a leading `.`, and names longer than 255 bytes, with a
    /// `MailboxError` of kind `.invalidMailbox`.
    public func maildirPath(of mailbox: String) throws(MailboxError) -> String {
        "\(self.root)/\(try MailboxNames.fileName(of: mailbox, maximumLength: 255))"
    }

    /// The maildir directory of `folder` of `mailbox`: the maildir itself for `INBOX` (any
    /// case), `<maildir>/.<folder>` otherwise. A folder name that is empty, contains `/`, `..`
    /// or a control character, starts with `.`, or is longer than `maximumFolderNameLength`
    /// bytes throws a `MailboxError` of kind `.unsupportedFolder`.
    public func folderPath(of mailbox: String, folder: String) throws(MailboxError) -> String {
        let box = try self.maildirPath(of: mailbox)
        if folder.uppercased() == "INBOX" { return box }
        guard !folder.isEmpty, !folder.hasPrefix("."), !folder.contains("/"), !folder.contains(".."),
            folder.utf8.count <= Self.maximumFolderNameLength,
            !folder.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F || (0x80..<0xA0).contains($0.value) })
        else {
            throw MailboxError(
                .unsupportedFolder,
                "invalid maildir folder name \(String(reflecting: String(folder.prefix(80)))): "
                    + "no '/', '..', control characters or leading '.'")
        }
        return "\(box)/.\(folder)"
    }

    static func checkDeliveryKey(_ key: String, root: String) throws(FileStoreError) {
        guard Self.isValidMessageName(key) else {
            throw FileStoreError(
                kind: .invalidDeliveryKey, operation: "deliver", path: root,
                reason: "invalid delivery key \(String(reflecting: String(key.prefix(80))))")
        }
    }

    /// A name that can be a message id (the base name of a message file).
    static func isValidMessageName(_ key: String) -> Bool {
        !key.isEmpty && !key.hasPrefix(".") && key.utf8.count <= Self.maximumDeliveryKeyLength
            && !key.utf8.contains(where: { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: ":") || $0 < 0x20 || $0 == 0x7F })
    }

    // MARK: MailboxStore

    public func deliver(_ message: ByteBuffer, _ delivery: MailboxDelivery) async throws -> Bool {
        let mailboxDirectory = try self.maildirPath(of: delivery.mailbox)
        let box = try self.folderPath(of: delivery.mailbox, folder: delivery.folder)
        let key = delivery.deliveryKey
        try Self.checkDeliveryKey(key, root: self.root)
        let root = self.root
        let mayBeStoredAlready = delivery.mayBeStoredAlready
        return try await self.threadPool.runIfActive {
            let newPath = "\(box)/new/\(key)"
            // Normally tmp/<key> under an exclusive lock, so a crashed attempt's leftover is
            // reused and a second worker (lost lease) never truncates a file already linked into
            // new/. While another attempt holds that lock (a worker paused past its lease), this
            // one writes a file of its own instead of waiting: link() lets only one copy in.
            // The directories are made only when tmp/ is missing (the first delivery to a
            // mailbox or folder), not checked on every delivery; tmp/ is made last.
            let temporary: (fd: Int32, path: String, isLeftover: Bool)
            do {
                temporary = try Self.openTemporaryFile(key, in: "\(box)/tmp")
            } catch let error as FileStoreError where error.isNotFound {
                try Self.makeFolder(box, mailboxDirectory: mailboxDirectory, root: root)
                temporary = try Self.openTemporaryFile(key, in: "\(box)/tmp")
            }
            let (fd, tmpPath) = (temporary.fd, temporary.path)
            defer { try? FileStoreIO.close(fd, path: tmpPath) }  // after unlink: releases the lock

            // Already delivered: still in new/, or moved to cur/ (by a reader or by setFlags) with
            // any set of the five standard flags (no scan of cur/ on the delivery path). Not
            // looked for (34 lstat calls) when no earlier attempt can have stored it: a first
            // attempt (a fresh key, within its lease) that found no leftover and no other holder
            // of tmp/<key>. Between this lookup and link() a paused worker can still be overtaken
            // (lost lease, copy moved to cur/): the documented at-least-once duplicate.
            if mayBeStoredAlready || temporary.isLeftover, try Self.locate(key, in: box, scanningCur: false) != nil {
                try? FileStoreIO.unlinkIfExists(tmpPath)
                return false
            }

            do {
                // A leftover of a crashed attempt with this key is overwritten, and may have had
                // another mode (new/<key> will share this inode).
                if ftruncate(fd, 0) != 0 { throw FileStoreError.system("ftruncate", tmpPath, errno) }
                if fchmod(fd, 0o600) != 0 { throw FileStoreError.system("fchmod", tmpPath, errno) }
                try FileStoreIO.writeAll(fd, message, path: tmpPath)
                try FileStoreIO.fsync(fd, path: tmpPath)
            } catch {
                try? FileStoreIO.unlinkIfExists(tmpPath)
                throw error
            }

            var code: Int32 = link(tmpPath, newPath) == 0 ? 0 : errno
            if code == ENOENT {
                // new/ is missing although tmp/ is there (a crash between the mkdirs, a reader
                // that removed it): make the folder and link again.
                do {
                    try Self.makeFolder(box, mailboxDirectory: mailboxDirectory, root: root)
                } catch {
                    try? FileStoreIO.unlinkIfExists(tmpPath)
                    throw error
                }
                code = link(tmpPath, newPath) == 0 ? 0 : errno
            }
            if code != 0 {
                try? FileStoreIO.unlinkIfExists(tmpPath)
                if code == EEXIST { return false }  // delivered meanwhile by a program not taking the lock
                throw FileStoreError.system("link", "\(tmpPath) -> \(newPath)", code)
            }
            do {
                try FileStoreIO.fsyncDirectory("\(box)/new")
            } catch {
                // Not known to be durable: undo, so that a retry delivers it again.
                try? FileStoreIO.unlinkIfExists(newPath)
                try? FileStoreIO.unlinkIfExists(tmpPath)
                throw error
            }
            try? FileStoreIO.unlinkIfExists(tmpPath)
            return true
        }
    }

    /// Makes the maildir of a folder: the root (0700: its listing is the list of addresses), the
    /// mailbox directory, for a Maildir++ subfolder its directory and `maildirfolder` file, then
    /// `cur/`, `new/` and `tmp/` — tmp/ last, so that its existence means the folder is complete
    /// (a delivery makes the folder only when tmp/ is missing). Every parent of something made
    /// is fsync'd.
    static func makeFolder(_ box: String, mailboxDirectory: String, root: String) throws(FileStoreError) {
        try FileStoreIO.makeDirectories(root, mode: 0o700, syncParents: true)
        if try FileStoreIO.makeDirectory(mailboxDirectory, mode: 0o700) { try FileStoreIO.fsyncDirectory(root) }
        var created = false
        if box != mailboxDirectory {
            if try FileStoreIO.makeDirectory(box, mode: 0o700) { try FileStoreIO.fsyncDirectory(mailboxDirectory) }
            // Maildir++: marks a subfolder for delivery agents and readers.
            if try FileStoreIO.lstatIfExists("\(box)/maildirfolder") == nil {
                let fd = try FileStoreIO.open("\(box)/maildirfolder", flags: O_WRONLY | O_CREAT | O_NOFOLLOW, mode: 0o600)
                try FileStoreIO.close(fd, path: "\(box)/maildirfolder")
                created = true
            }
        }
        for sub in ["cur", "new", "tmp"] {
            if try FileStoreIO.makeDirectory("\(box)/\(sub)", mode: 0o700) { created = true }
        }
        if created { try FileStoreIO.fsyncDirectory(box) }
    }

    /// Oldest first: by the time in the unique name (seconds and microseconds), then by name.
    /// Messages in `new/` have no flags. Subject and sender come from the first 64 KiB.
    public func list(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (messages: [StoredMessage], total: Int) {
        let box = try self.folderPath(of: mailbox, folder: folder)
        let folderName = folder.uppercased() == "INBOX" ? "INBOX" : folder
        return try await self.threadPool.runIfActive {
            let all = try Self.scan(box)
            let start = min(max(offset, 0), all.count)
            let end = min(start + max(limit, 0), all.count)
            var messages: [StoredMessage] = []
            messages.reserveCapacity(end - start)
            for file in all[start..<end] {
                // Moved (flags changed) or expunged meanwhile: look it up again by id.
                var current: MaildirFile? = file
                for _ in 0..<3 {
                    guard let candidate = current else { break }
                    do {
                        let head = try FileStoreIO.readPrefix(candidate.path, maximum: Self.headerReadLimit)
                        let headers = MessageHeaders(head.data)
                        messages.append(
                            StoredMessage(
                                id: candidate.id, folder: folderName, size: head.fileSize, date: candidate.date,
                                flags: candidate.flags, subject: headers.subject, from: headers["From"]))
                        current = nil
                        break
                    } catch let error as FileStoreError where error.isNotFound {
                        current = try Self.locate(candidate.id, in: box)
                    }
                }
            }
            return (messages, all.count)
        }
    }

    /// The message file's bytes; nil for an unknown (or invalid) id.
    public func fetch(mailbox: String, folder: String, id: String) async throws -> ByteBuffer? {
        let box = try self.folderPath(of: mailbox, folder: folder)
        guard Self.isValidMessageName(id) else { return nil }
        return try await self.threadPool.runIfActive { () throws -> ByteBuffer? in
            // A concurrent setFlags may rename the file between locating and opening it.
            for _ in 0..<5 {
                guard let file = try Self.locate(id, in: box) else { return nil }
                do {
                    return try FileStoreIO.readAll(file.path)
                } catch let error as FileStoreError where error.isNotFound {
                    continue
                }
            }
            return nil
        }
    }

    public func delete(mailbox: String, folder: String, id: String) async throws -> Bool {
        let box = try self.folderPath(of: mailbox, folder: folder)
        guard Self.isValidMessageName(id) else { return false }
        return try await self.threadPool.runIfActive {
            for _ in 0..<5 {
                guard let file = try Self.locate(id, in: box) else { return false }
                if unlink(file.path) != 0 {
                    let code = errno
                    if code == ENOENT { continue }  // renamed meanwhile
                    throw FileStoreError.system("unlink", file.path, code)
                }
                try FileStoreIO.fsyncDirectory(FileStoreIO.parent(of: file.path))
                return true
            }
            return false
        }
    }

    /// Renames the message to `cur/<id>:2,<letters>` (from `new/` or from its old name in `cur/`).
    public func setFlags(_ flags: Set<MessageFlag>, mailbox: String, folder: String, id: String) async throws -> Bool {
        let box = try self.folderPath(of: mailbox, folder: folder)
        guard Self.isValidMessageName(id) else { return false }
        return try await self.threadPool.runIfActive {
            for _ in 0..<5 {
                guard let file = try Self.locate(id, in: box) else { return false }
                let letters = Self.infoLetters(flags, keeping: file.otherLetters)
                let target = "\(box)/cur/\(id):2,\(letters)"
                if file.path == target { return true }
                // rename(2) replaces an existing target; never the case here, as ids are unique.
                if rename(file.path, target) != 0 {
                    let code = errno
                    if code == ENOENT { continue }  // renamed or expunged meanwhile
                    throw FileStoreError.system("rename", "\(file.path) -> \(target)", code)
                }
                try FileStoreIO.fsyncDirectory("\(box)/cur")
                if file.inNew { try FileStoreIO.fsyncDirectory("\(box)/new") }
                return true
            }
            return false
        }
    }

    /// Sum of the sizes of the regular files in `new/` and `cur/` of the maildir and of every
    /// Maildir++ subfolder (`tmp/` and hidden names are not mail). 0 when the maildir does not
    /// exist.
    public func usageBytes(of mailbox: String) async throws -> Int64 {
        let box = try self.maildirPath(of: mailbox)
        return try await self.threadPool.runIfActive {
            var total: Int64 = 0
            var folders = [box]
            for name in try FileStoreIO.listDirectory(box) ?? [] where name.hasPrefix(".") && name != "." && name != ".." {
                if let info = try FileStoreIO.lstatIfExists("\(box)/\(name)"), FileStoreIO.isDirectory(info) {
                    folders.append("\(box)/\(name)")
                }
            }
            for folder in folders {
                for sub in ["new", "cur"] {
                    let directory = "\(folder)/\(sub)"
                    for name in try FileStoreIO.listDirectory(directory) ?? [] where !name.hasPrefix(".") {
                        // A file moved or expunged meanwhile is simply not counted.
                        if let info = try FileStoreIO.lstatIfExists("\(directory)/\(name)"),
                            FileStoreIO.isRegularFile(info)
                        {
                            total += Int64(info.st_size)
                        }
                    }
                }
            }
            return total
        }
    }

    /// Removes the maildir with all its folders. It is first renamed to a hidden name in the
    /// root (never a valid mailbox), so that it disappears at once and a crash half-way leaves
    /// no partial mailbox behind; then the hidden tree is removed. A missing maildir is fine.
    public func deleteMailbox(_ mailbox: String) async throws {
        let box = try self.maildirPath(of: mailbox)
        let root = self.root
        let name = String(box.dropFirst(root.count + 1))
        try await self.threadPool.runIfActive {
            guard try FileStoreIO.lstatIfExists(box) != nil else { return }
            let doomed = "\(root)/.deleted.\(FileStoreIO.randomSuffix()).\(name.prefix(200))"
            if rename(box, doomed) != 0 {
                let code = errno
                if code == ENOENT { return }
                throw FileStoreError.system("rename", "\(box) -> \(doomed)", code)
            }
            try FileStoreIO.fsyncDirectory(root)
            try FileStoreIO.removeTree(doomed)
        }
    }

    // MARK: Files

    /// A message file found in `new/` or `cur/`.
    struct MaildirFile {
        var path: String
        var id: String
        var inNew: Bool
        var flags: Set<MessageFlag>
        /// Info letters this store does not know (kept by `setFlags`).
        var otherLetters: String
        var date: Date
        /// Seconds and microseconds from the unique name, for ordering.
        var sortKey: (Int64, Int64)
    }

    /// Parses a file name of `new/` (no info) or `cur/` (`<id>:2,<letters>`). Nil for names
    /// that are not messages (hidden files).
    static func parse(name: String, directory: String, inNew: Bool, modified: () -> Date) -> MaildirFile? {
        guard !name.hasPrefix(".") else { return nil }
        var id = Substring(name)
        var flags: Set<MessageFlag> = []
        var other = ""
        if !inNew, let colon = name.firstIndex(of: ":") {
            id = name[..<colon]
            let info = name[name.index(after: colon)...]
            if info.hasPrefix("2,") {
                for letter in info.dropFirst(2) {
                    if let flag = MessageFlag(rawValue: String(letter)) {
                        flags.insert(flag)
                    } else if letter.isASCII, letter.isLetter {
                        other.append(letter)
                    }
                }
            }
        }
        guard !id.isEmpty else { return nil }
        // `<seconds>.M<micros>P…` (or any `<seconds>.<…>`): the time of delivery.
        let seconds = Int64(id.prefix { $0.isASCII && $0.isNumber })
        var micros: Int64 = 0
        if seconds != nil, let dot = id.firstIndex(of: "."), id[id.index(after: dot)...].hasPrefix("M") {
            micros = Int64(id[id.index(dot, offsetBy: 2)...].prefix { $0.isASCII && $0.isNumber }) ?? 0
        }
        let date: Date
        let sortKey: (Int64, Int64)
        if let seconds, micros < 1_000_000 {
            date = Date(timeIntervalSince1970: Double(seconds) + Double(micros) / 1_000_000)
            sortKey = (seconds, micros)
        } else {
            date = modified()
            let time = date.timeIntervalSince1970
            sortKey = (Int64(time.rounded(.down)), Int64((time - time.rounded(.down)) * 1_000_000))
        }
        return MaildirFile(
            path: "\(directory)/\(name)", id: String(id), inNew: inNew, flags: flags, otherLetters: other,
            date: date, sortKey: sortKey)
    }

    /// Every message of the folder at `box`, oldest first (then by id). A message found both in
    /// `new/` and `cur/` (a reader moving it) is listed once.
    static func scan(_ box: String) throws(FileStoreError) -> [MaildirFile] {
        var byID: [String: MaildirFile] = [:]
        for sub in ["new", "cur"] {
            let directory = "\(box)/\(sub)"
            for name in try FileStoreIO.listDirectory(directory) ?? [] {
                guard let info = try FileStoreIO.lstatIfExists("\(directory)/\(name)"), FileStoreIO.isRegularFile(info),
                    let file = Self.parse(
                        name: name, directory: directory, inNew: sub == "new",
                        modified: { FileStoreIO.modificationDate(info) })
                else { continue }
                byID[file.id] = file  // cur/ wins over new/
            }
        }
        return byID.values.sorted { left, right in
            if left.sortKey != right.sortKey { return left.sortKey < right.sortKey }
            return left.id < right.id
        }
    }

    /// The message with id `id`: `new/<id>`, `cur/<id>`, `cur/<id>:2,<letters>` for any set of
    /// the five flags, or else (with `scanningCur`) any `cur/<id>:…`, such as a name with
    /// keyword letters of another program.
    static func locate(_ id: String, in box: String, scanningCur: Bool = true) throws(FileStoreError) -> MaildirFile? {
        func found(_ name: String, _ sub: String) throws(FileStoreError) -> MaildirFile? {
            let directory = "\(box)/\(sub)"
            guard let info = try FileStoreIO.lstatIfExists("\(directory)/\(name)"), FileStoreIO.isRegularFile(info) else {
                return nil
            }
            return Self.parse(name: name, directory: directory, inNew: sub == "new", modified: { FileStoreIO.modificationDate(info) })
        }
        if let file = try found(id, "new") { return file }
        if let file = try found(id, "cur") { return file }
        for letters in Self.allLetterCombinations {
            if let file = try found("\(id):2,\(letters)", "cur") { return file }
        }
        guard scanningCur else { return nil }
        let prefix = id + ":"
        for name in try FileStoreIO.listDirectory("\(box)/cur") ?? [] where name.hasPrefix(prefix) {
            if let file = try found(name, "cur") { return file }
        }
        return nil
    }

    /// `:2,` info letters of every subset of the five flags (32 strings).
    static let allLetterCombinations: [String] = {
        let all = MessageFlag.allCases
        return (0..<(1 << all.count)).map { mask in
            MessageFlag.letters(Set(all.enumerated().filter { mask & (1 << $0.offset) != 0 }.map(\.element)))
        }
    }()

    /// The info letters for `flags` plus `other` letters, in ASCII order, without duplicates.
    static func infoLetters(_ flags: Set<MessageFlag>, keeping other: String) -> String {
        let letters = Set(MessageFlag.letters(flags)).union(other)
        return String(letters.sorted())
    }

    /// The temporary file of a delivery of `key` into the maildir's `tmp` directory: `tmp/<key>`
    /// with an exclusive lock, or — when another attempt holds that lock — a new file
    /// `tmp/<key>.busy-<random>`. Never waits for a lock: a holder may be a stopped process.
    ///
    /// `isLeftover`: tmp/<key> was there already (an earlier attempt's) or another attempt holds
    /// it — either way an earlier attempt of this key exists.
    static func openTemporaryFile(_ key: String, in tmp: String) throws(FileStoreError) -> (fd: Int32, path: String, isLeftover: Bool) {
        let path = "\(tmp)/\(key)"
        if let (fd, size) = try openLockedTemporaryFile(path) { return (fd, path, size > 0) }
        let own = "\(tmp)/\(key).busy-\(String(UInt64.random(in: 0...UInt64.max), radix: 16))"
        return (try FileStoreIO.open(own, flags: O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode: 0o600), own, true)
    }

    /// Opens (creating, mode 0600, never through a symlink) `path` and takes an exclusive
    /// `flock` on it without waiting: nil when another descriptor holds it. A previous holder
    /// unlinks the file before releasing the lock, so after locking, the descriptor must still be
    /// the file `path` names; otherwise try again.
    static func openLockedTemporaryFile(_ path: String) throws(FileStoreError) -> (fd: Int32, size: Int)? {
        while true {
            let fd = try FileStoreIO.open(path, flags: O_WRONLY | O_CREAT | O_NOFOLLOW, mode: 0o600)
            while flock(fd, LOCK_EX | LOCK_NB) != 0 {
                let code = errno
                if code == EINTR { continue }
                try? FileStoreIO.close(fd, path: path)
                if code == EWOULDBLOCK { return nil }
                throw .system("flock", path, code)
            }
            var held = stat()
            guard fstat(fd, &held) == 0 else {
                let code = errno
                try? FileStoreIO.close(fd, path: path)
                throw .system("fstat", path, code)
            }
            let named: stat?
            do {
                named = try FileStoreIO.lstatIfExists(path)
            } catch {
                try? FileStoreIO.close(fd, path: path)
                throw error
            }
            if let named, named.st_dev == held.st_dev, named.st_ino == held.st_ino { return (fd, Int(held.st_size)) }
            try? FileStoreIO.close(fd, path: path)
        }
    }

    /// Full paths of the message files (regular files in `new/` and `cur/` of INBOX), sorted.
    /// Blocking: for tests and `user-cli`, not for the server's event loops.
    public func messageFiles(of mailbox: String) throws -> [String] {
        let box = try self.maildirPath(of: mailbox)
        var paths: [String] = []
        for sub in ["new", "cur"] {
            let directory = "\(box)/\(sub)"
            for name in try FileStoreIO.listDirectory(directory) ?? [] {
                let path = "\(directory)/\(name)"
                if let info = try FileStoreIO.lstatIfExists(path), FileStoreIO.isRegularFile(info) {
                    paths.append(path)
                }
            }
        }
        return paths.sorted()
    }
}

// MARK: - Mailbox names

/// Checks on mailbox addresses used as file names (maildir directories, mbox files).
enum MailboxNames {
    /// The lowercased address, if it can be a file name: not empty, no `/`, NUL or other
    /// control character, no leading `.`, at most `maximumLength` bytes. Otherwise a
    /// `MailboxError` of kind `.invalidMailbox`.
    static func fileName(of mailbox: String, maximumLength: Int) throws(MailboxError) -> String {
        let name = mailbox.lowercased()
        guard !name.isEmpty, !name.hasPrefix("."), !name.contains("/"), name.utf8.count <= maximumLength,
            !name.utf8.contains(where: { $0 < 0x20 || $0 == 0x7F })
        else {
            throw MailboxError(.invalidMailbox, "invalid mailbox \(String(reflecting: String(mailbox.prefix(80))))")
        }
        return name
    }
}

// MARK: - More blocking helpers

extension FileStoreIO {
    /// Up to `maximum` bytes from the start of the file at `path`, and the file's size.
    static func readPrefix(_ path: String, maximum: Int) throws(FileStoreError) -> (data: ByteBuffer, fileSize: Int) {
        let fd = try Self.open(path, flags: O_RDONLY)
        defer { try? Self.close(fd, path: path) }
        let size = try Self.size(of: fd, path: path)
        return (try Self.read(fd, offset: 0, count: min(size, maximum), path: path), size)
    }

    static func size(of fd: Int32, path: String) throws(FileStoreError) -> Int {
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .system("fstat", path, errno) }
        return Int(info.st_size)
    }

    /// `count` bytes at `offset` (fewer only at the end of the file), with `pread`.
    static func read(_ fd: Int32, offset: Int, count: Int, path: String) throws(FileStoreError) -> ByteBuffer {
        var buffer = ByteBufferAllocator().buffer(capacity: count)
        var failure: Int32 = 0
        var position = offset
        while buffer.readableBytes < count {
            let wanted = count - buffer.readableBytes
            let got = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: wanted) { space -> Int in
                while true {
                    let result = pread(fd, space.baseAddress!, wanted, off_t(position))
                    if result >= 0 { return result }
                    if errno == EINTR { continue }
                    failure = errno
                    return 0
                }
            }
            if failure != 0 { throw .system("pread", path, failure) }
            if got == 0 { break }
            position += got
        }
        return buffer
    }

    /// Writes every readable byte of `buffer` at `offset`, with `pwrite`.
    static func write(_ fd: Int32, _ buffer: ByteBuffer, at offset: Int, path: String) throws(FileStoreError) {
        let failure: Int32? = buffer.withUnsafeReadableBytes { bytes -> Int32? in
            var done = 0
            while done < bytes.count {
                let written = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
                if written < 0 {
                    let code = errno
                    if code == EINTR { continue }
                    return code
                }
                if written == 0 { return EIO }
                done += written
            }
            return nil
        }
        if let failure { throw .system("pwrite", path, failure) }
    }

    static func truncate(_ fd: Int32, to size: Int, path: String) throws(FileStoreError) {
        while ftruncate(fd, off_t(size)) != 0 {
            let code = errno
            if code == EINTR { continue }
            throw .system("ftruncate", path, code)
        }
    }

    /// Removes `path` and, for a directory, everything in it. Symbolic links are removed,
    /// never followed. A missing path is fine.
    static func removeTree(_ path: String) throws(FileStoreError) {
        guard let info = try Self.lstatIfExists(path) else { return }
        if Self.isDirectory(info) {
            for name in try Self.listDirectory(path) ?? [] {
                try Self.removeTree("\(path)/\(name)")
            }
            if rmdir(path) != 0, errno != ENOENT { throw .system("rmdir", path, errno) }
        } else {
            try Self.unlinkIfExists(path)
        }
    }

    /// 16 random hexadecimal digits, for temporary names.
    static func randomSuffix() -> String {
        let value = String(UInt64.random(in: .min ... .max), radix: 16)
        return String(repeating: "0", count: 16 - value.count) + value
    }
}

/// The last unique-name time handed out in this process, in microseconds since the epoch.
///
/// `@unchecked Sendable` is safe: the only stored mutable state, `lastMicros`, is read and
/// written exclusively inside `next(notBefore:)` between `pthread_mutex_lock` and
/// `pthread_mutex_unlock` on `mutex`. The mutex lives in memory allocated once in `init` and
/// never moved or freed (the one instance is a global that lives as long as the process), so
/// every access to `lastMicros` is serialised across threads.
private final class DeliveryKeyClock: @unchecked Sendable {
    static let shared = DeliveryKeyClock()

    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private var lastMicros: Int64 = 0

    private init() {
        self.mutex = .allocate(capacity: 1)
        self.mutex.initialize(to: pthread_mutex_t())
        pthread_mutex_init(self.mutex, nil)
    }

    /// Returns `now`, or one microsecond after the last value returned if `now` is not later.
    func next(notBefore now: Int64) -> Int64 {
        pthread_mutex_lock(self.mutex)
        defer { pthread_mutex_unlock(self.mutex) }
        let value = max(now, self.lastMicros + 1)
        self.lastMicros = value
        return value
    }
}
