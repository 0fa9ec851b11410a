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

/// The maildir `MailboxStore` (API.md, "Storage API → Maildir Storage").
///
/// Layout: `<root>/<email, lowercased>/{cur,new,tmp}`, directories 0700, files 0600.
/// A message is written to `tmp/<key>` (under an exclusive `flock`), fsync'd, hard-linked to
/// `new/<key>`, and `new/` is fsync'd before `deliver` returns. The delivery key is the maildir unique name, so a retried
/// delivery of the same job finds its earlier copy and stores nothing.
/// Every blocking call of the async API runs on `threadPool`.
public struct MaildirStore: MailboxStore {
    public let root: String
    /// The hostname as it appears in unique names (`/` → `\057`, `:` → `\072`).
    public let sanitizedHostname: String
    let threadPool: NIOThreadPool

    /// Longest accepted delivery key (a file name, with room for `:2,<flags>`).
    public static let maximumDeliveryKeyLength = 200

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

    /// The maildir directory of `mailbox` (lowercased). Rejects an empty address, `/`, NUL, a
    /// leading `.`, and names longer than 255 bytes.
    public func maildirPath(of mailbox: String) throws(FileStoreError) -> String {
        let name = mailbox.lowercased()
        guard !name.isEmpty, !name.hasPrefix("."), !name.contains("/"), !name.utf8.contains(0),
            name.utf8.count <= 255
        else {
            throw FileStoreError(
                kind: .invalidMailbox, operation: "maildir", path: self.root,
                reason: "invalid mailbox \(String(reflecting: String(mailbox.prefix(80))))")
        }
        return "\(self.root)/\(name)"
    }

    static func checkDeliveryKey(_ key: String, root: String) throws(FileStoreError) {
        guard !key.isEmpty, !key.hasPrefix("."), key.utf8.count <= Self.maximumDeliveryKeyLength,
            !key.utf8.contains(where: { $0 == UInt8(ascii: "/") || $0 == UInt8(ascii: ":") || $0 < 0x20 })
        else {
            throw FileStoreError(
                kind: .invalidDeliveryKey, operation: "deliver", path: root,
                reason: "invalid delivery key \(String(reflecting: String(key.prefix(80))))")
        }
    }

    // MARK: MailboxStore

    public func deliver(_ message: ByteBuffer, to mailbox: String, deliveryKey key: String) async throws -> Bool {
        let box = try self.maildirPath(of: mailbox)
        try Self.checkDeliveryKey(key, root: self.root)
        let root = self.root
        return try await self.threadPool.runIfActive {
            // A root created here is 0700 too: its listing is the list of addresses.
            try FileStoreIO.makeDirectories(root, mode: 0o700, syncParents: true)
            if try FileStoreIO.makeDirectory(box, mode: 0o700) { try FileStoreIO.fsyncDirectory(root) }
            var created = false
            for sub in ["tmp", "new", "cur"] {
                if try FileStoreIO.makeDirectory("\(box)/\(sub)", mode: 0o700) { created = true }
            }
            if created { try FileStoreIO.fsyncDirectory(box) }

            let newPath = "\(box)/new/\(key)"
            let tmpPath = "\(box)/tmp/\(key)"
            // Attempts with one key are serialised by an exclusive lock on tmp/<key>, so that a
            // second worker (lost lease) can never truncate a file already linked into new/.
            let fd = try Self.openLockedTemporaryFile(tmpPath)
            defer { try? FileStoreIO.close(fd, path: tmpPath) }  // after unlink: releases the lock

            // Already delivered: still in new/, or moved to cur/ by a reader (no flags or Seen).
            for existing in [newPath, "\(box)/cur/\(key):2,", "\(box)/cur/\(key):2,S", "\(box)/cur/\(key)"] {
                if try FileStoreIO.lstatIfExists(existing) != nil {
                    try? FileStoreIO.unlinkIfExists(tmpPath)
                    return false
                }
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

            if link(tmpPath, newPath) != 0 {
                let code = errno
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

    /// Opens (creating, mode 0600, never through a symlink) `path` and takes an exclusive
    /// `flock` on it. A previous holder unlinks the file before releasing the lock, so after
    /// locking, the descriptor must still be the file `path` names; otherwise try again.
    static func openLockedTemporaryFile(_ path: String) throws(FileStoreError) -> Int32 {
        while true {
            let fd = try FileStoreIO.open(path, flags: O_WRONLY | O_CREAT | O_NOFOLLOW, mode: 0o600)
            while flock(fd, LOCK_EX) != 0 {
                let code = errno
                if code == EINTR { continue }
                try? FileStoreIO.close(fd, path: path)
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
            if let named, named.st_dev == held.st_dev, named.st_ino == held.st_ino { return fd }
            try? FileStoreIO.close(fd, path: path)
        }
    }

    /// Sum of the sizes of the regular files in `new/` and `cur/` (`tmp/` is not mail).
    /// 0 when the maildir does not exist.
    public func usageBytes(of mailbox: String) async throws -> Int64 {
        let box = try self.maildirPath(of: mailbox)
        return try await self.threadPool.runIfActive {
            var total: Int64 = 0
            for sub in ["new", "cur"] {
                let directory = "\(box)/\(sub)"
                for name in try FileStoreIO.listDirectory(directory) ?? [] {
                    // A file moved or expunged meanwhile is simply not counted.
                    if let info = try FileStoreIO.lstatIfExists("\(directory)/\(name)"),
                        FileStoreIO.isRegularFile(info)
                    {
                        total += Int64(info.st_size)
                    }
                }
            }
            return total
        }
    }

    /// Full paths of the message files (regular files in `new/` and `cur/`), sorted.
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
