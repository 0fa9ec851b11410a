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

// MARK: - Errors

/// An error from the file adapters (spool, maildir): what was attempted, on which path,
/// and why (the `errno` text for a failed system call).
public struct FileStoreError: Error, Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable {
        /// A blob key outside `[A-Za-z0-9_.-]+` (or `.`, `..`, `tmp`): rejected before any I/O.
        case invalidKey
        /// A mailbox address that cannot name a maildir directory.
        case invalidMailbox
        /// A maildir delivery key that cannot be a file name.
        case invalidDeliveryKey
        /// A system call failed; `errorNumber` holds its `errno`.
        case systemCall
    }

    public var kind: Kind
    /// The system call or operation (`open`, `fsync`, `rename`, `put`, ...).
    public var operation: String
    /// The file or directory concerned.
    public var path: String
    /// The `errno` of a failed system call, 0 otherwise.
    public var errorNumber: Int32
    /// The `strerror` text, or why the input was rejected.
    public var reason: String

    public init(kind: Kind, operation: String, path: String, errorNumber: Int32 = 0, reason: String) {
        self.kind = kind
        self.operation = operation
        self.path = path
        self.errorNumber = errorNumber
        self.reason = reason
    }

    static func system(_ operation: String, _ path: String, _ code: Int32) -> FileStoreError {
        FileStoreError(
            kind: .systemCall, operation: operation, path: path, errorNumber: code,
            reason: String(cString: strerror(code)))
    }

    /// True when the file did not exist (`ENOENT`), e.g. `get` of a missing blob.
    public var isNotFound: Bool { self.kind == .systemCall && self.errorNumber == ENOENT }

    public var description: String { "\(self.operation) \(self.path): \(self.reason)" }
}

// MARK: - Blocking file helpers (call only on an NIOThreadPool thread, or from synchronous APIs)

/// Thin, `errno`-checked wrappers around the POSIX calls the file adapters need.
/// Every function blocks: callers run them inside `NIOThreadPool.runIfActive`.
enum FileStoreIO {
    static func open(_ path: String, flags: Int32, mode: mode_t = 0) throws(FileStoreError) -> Int32 {
        while true {
            #if canImport(Darwin)
            let fd = Darwin.open(path, flags | O_CLOEXEC, mode)
            #else
            let fd = Glibc.open(path, flags | O_CLOEXEC, mode)
            #endif
            if fd >= 0 { return fd }
            let code = errno
            if code == EINTR { continue }
            throw .system("open", path, code)
        }
    }

    /// Closes `fd`. Not retried on EINTR (on Linux the descriptor is released anyway).
    static func close(_ fd: Int32, path: String) throws(FileStoreError) {
        #if canImport(Darwin)
        let result = Darwin.close(fd)
        #else
        let result = Glibc.close(fd)
        #endif
        if result != 0, errno != EINTR { throw .system("close", path, errno) }
    }

    /// Writes every readable byte of `buffer`, looping on short writes and EINTR.
    static func writeAll(_ fd: Int32, _ buffer: ByteBuffer, path: String) throws(FileStoreError) {
        let failure: Int32? = buffer.withUnsafeReadableBytes { bytes -> Int32? in
            var offset = 0
            while offset < bytes.count {
                #if canImport(Darwin)
                let written = Darwin.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
                #else
                let written = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
                #endif
                if written < 0 {
                    let code = errno
                    if code == EINTR { continue }
                    return code
                }
                if written == 0 { return EIO }
                offset += written
            }
            return nil
        }
        if let failure { throw .system("write", path, failure) }
    }

    static func fsync(_ fd: Int32, path: String) throws(FileStoreError) {
        while true {
            #if canImport(Darwin)
            let result = Darwin.fsync(fd)
            #else
            let result = Glibc.fsync(fd)
            #endif
            if result == 0 { return }
            let code = errno
            if code == EINTR { continue }
            throw .system("fsync", path, code)
        }
    }

    /// Makes the entries of directory `path` durable (after a create, rename, link or mkdir in it).
    static func fsyncDirectory(_ path: String) throws(FileStoreError) {
        let fd = try Self.open(path, flags: O_RDONLY | O_DIRECTORY)
        do {
            try Self.fsync(fd, path: path)
        } catch {
            try? Self.close(fd, path: path)
            throw error
        }
        try Self.close(fd, path: path)
    }

    /// Reads the whole file at `path`.
    static func readAll(_ path: String) throws(FileStoreError) -> ByteBuffer {
        let fd = try Self.open(path, flags: O_RDONLY)
        defer { try? Self.close(fd, path: path) }
        var info = stat()
        guard fstat(fd, &info) == 0 else { throw .system("fstat", path, errno) }
        var buffer = ByteBufferAllocator().buffer(capacity: max(Int(info.st_size), 0) + 1)
        while true {
            var failure: Int32 = 0
            let count = buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: 4096) { space -> Int in
                while true {
                    #if canImport(Darwin)
                    let got = Darwin.read(fd, space.baseAddress!, space.count)
                    #else
                    let got = Glibc.read(fd, space.baseAddress!, space.count)
                    #endif
                    if got >= 0 { return got }
                    if errno == EINTR { continue }
                    failure = errno
                    return 0
                }
            }
            if failure != 0 { throw .system("read", path, failure) }
            if count == 0 { return buffer }
        }
    }

    /// `lstat(path)`, or nil when it does not exist.
    static func lstatIfExists(_ path: String) throws(FileStoreError) -> stat? {
        var info = stat()
        if lstat(path, &info) == 0 { return info }
        let code = errno
        if code == ENOENT || code == ENOTDIR { return nil }
        throw .system("lstat", path, code)
    }

    static func isRegularFile(_ info: stat) -> Bool { (info.st_mode & S_IFMT) == S_IFREG }
    static func isDirectory(_ info: stat) -> Bool { (info.st_mode & S_IFMT) == S_IFDIR }

    static func modificationDate(_ info: stat) -> Date {
        #if canImport(Darwin)
        let time = info.st_mtimespec
        #else
        let time = info.st_mtim
        #endif
        return Date(timeIntervalSince1970: Double(time.tv_sec) + Double(time.tv_nsec) / 1_000_000_000)
    }

    /// The names in directory `path` (without `.` and `..`), or nil when it does not exist.
    static func listDirectory(_ path: String) throws(FileStoreError) -> [String]? {
        guard let dir = opendir(path) else {
            let code = errno
            if code == ENOENT { return nil }
            throw .system("opendir", path, code)
        }
        defer { closedir(dir) }
        var names: [String] = []
        while true {
            errno = 0
            guard let entry = readdir(dir) else {
                if errno != 0 { throw .system("readdir", path, errno) }
                return names
            }
            let name = withUnsafePointer(to: &entry.pointee.d_name) { pointer in
                String(cString: UnsafeRawPointer(pointer).assumingMemoryBound(to: CChar.self))
            }
            if name != "." && name != ".." { names.append(name) }
        }
    }

    /// Removes `path`; a missing file is not an error.
    static func unlinkIfExists(_ path: String) throws(FileStoreError) {
        if unlink(path) != 0, errno != ENOENT { throw .system("unlink", path, errno) }
    }

    static func rename(_ from: String, _ to: String) throws(FileStoreError) {
        #if canImport(Darwin)
        let result = Darwin.rename(from, to)
        #else
        let result = Glibc.rename(from, to)
        #endif
        if result != 0 { throw .system("rename", "\(from) -> \(to)", errno) }
    }

    /// `mkdir(path, mode)`; returns false when a directory is already there.
    @discardableResult
    static func makeDirectory(_ path: String, mode: mode_t) throws(FileStoreError) -> Bool {
        if mkdir(path, mode) == 0 { return true }
        let code = errno
        if code == EEXIST, let info = try Self.lstatIfExists(path), Self.isDirectory(info) { return false }
        throw .system("mkdir", path, code)
    }

    /// `mkdir -p`: missing parents get 0755, `path` itself gets `mode`. With `syncParents`, the
    /// parent of every directory created is fsync'd, so that the new entries survive a crash.
    static func makeDirectories(_ path: String, mode: mode_t, syncParents: Bool) throws(FileStoreError) {
        if let info = try Self.lstatIfExists(path) {
            if Self.isDirectory(info) { return }
            throw .system("mkdir", path, ENOTDIR)
        }
        let parent = Self.parent(of: path)
        if parent != path { try Self.makeDirectories(parent, mode: 0o755, syncParents: syncParents) }
        if try Self.makeDirectory(path, mode: mode), syncParents {
            try Self.fsyncDirectory(parent)
        }
    }

    static func parent(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        if slash == path.startIndex { return "/" }
        return String(path[..<slash])
    }

    /// `path` without trailing slashes (but `/` stays `/`).
    static func normalize(_ path: String) -> String {
        var result = path
        while result.count > 1, result.hasSuffix("/") { result.removeLast() }
        return result
    }

    static func nowSeconds() -> Double {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return Double(now.tv_sec) + Double(now.tv_nsec) / 1_000_000_000
    }
}

extension Duration {
    var fileStoreSeconds: Double {
        let parts = self.components
        return Double(parts.seconds) + Double(parts.attoseconds) / 1e18
    }
}

// MARK: - Spool

/// The embedded-mode `BlobStore`: one file per blob in a local spool directory.
///
/// Layout: `<directory>/<key>` for each blob, `<directory>/tmp/` for replacements in progress.
/// `put` returns only when the blob is durable: a new key is written to `<key>` (created
/// exclusively), fsync'd, and the directory fsync'd; an existing key is replaced whole by a
/// file written in `tmp/` and renamed into place. Every blocking call runs on `threadPool`.
public struct SpoolBlobStore: BlobStore {
    public let directory: String
    let threadPool: NIOThreadPool

    /// Longest accepted key, leaving room in NAME_MAX (255) for the temporary suffix.
    public static let maximumKeyLength = 200

    /// Creates `directory` (mode 0700, parents as needed) and its `tmp/` if missing — unless
    /// `creating` is false (a program that only reads or deletes blobs, if any are there).
    /// Blocks briefly (a few `mkdir`/`stat` calls): call it at start-up.
    public init(directory: String, threadPool: NIOThreadPool, creating: Bool = true) throws {
        guard !directory.isEmpty, !directory.utf8.contains(0) else {
            throw FileStoreError(
                kind: .systemCall, operation: "mkdir", path: directory, errorNumber: EINVAL,
                reason: "empty or invalid spool directory")
        }
        self.directory = FileStoreIO.normalize(directory)
        self.threadPool = threadPool
        guard creating else { return }
        try FileStoreIO.makeDirectories(self.directory, mode: 0o700, syncParents: true)
        if try FileStoreIO.makeDirectory(self.tmpDirectory, mode: 0o700) {
            try FileStoreIO.fsyncDirectory(self.directory)
        }
    }

    var tmpDirectory: String { "\(self.directory)/tmp" }

    /// True for keys made only of `A-Z a-z 0-9 _ . -`, at most `maximumKeyLength` long, and
    /// not `.`, `..` or `tmp` (which name directories).
    public static func isValidKey(_ key: String) -> Bool {
        guard !key.isEmpty, key.utf8.count <= Self.maximumKeyLength else { return false }
        guard key != ".", key != "..", key != "tmp" else { return false }
        return key.utf8.allSatisfy { byte in
            (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
                || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9"))
                || byte == UInt8(ascii: "_") || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "-")
        }
    }

    private func checkedPath(for key: String, operation: String) throws(FileStoreError) -> String {
        guard Self.isValidKey(key) else {
            throw FileStoreError(
                kind: .invalidKey, operation: operation, path: self.directory,
                reason: "invalid blob key \(String(reflecting: String(key.prefix(80)))): "
                    + "use 1 to \(Self.maximumKeyLength) of A-Z a-z 0-9 _ . - (not \".\", \"..\" or \"tmp\")")
        }
        return "\(self.directory)/\(key)"
    }

    public func put(key: String, data: ByteBuffer) async throws {
        let finalPath = try self.checkedPath(for: key, operation: "put")
        let directory = self.directory
        let tmpDirectory = self.tmpDirectory
        try await self.threadPool.runIfActive {
            // A new key (the normal case: keys are fresh queue ids) is written in place: nobody
            // reads a blob before the job that names it is committed, which is after this
            // returns, and a crash leaves an orphan for the garbage collector (see `list()`).
            // Only an existing key goes through tmp/ and rename(), so that it is replaced whole.
            // (A cross-directory rename takes the file system's rename lock and both directory
            // locks: under load most of the ingress's kernel time was spent waiting for them.)
            var path = finalPath
            var fd: Int32
            do {
                fd = try FileStoreIO.open(finalPath, flags: O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode: 0o600)
            } catch let error as FileStoreError where error.errorNumber == EEXIST {
                path = "\(tmpDirectory)/\(key).\(String(UInt64.random(in: .min ... .max), radix: 16))"
                fd = try FileStoreIO.open(path, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600)
            }
            var open = true
            do {
                try FileStoreIO.writeAll(fd, data, path: path)
                try FileStoreIO.fsync(fd, path: path)
                open = false
                try FileStoreIO.close(fd, path: path)
                if path != finalPath { try FileStoreIO.rename(path, finalPath) }
            } catch {
                if open { try? FileStoreIO.close(fd, path: path) }
                try? FileStoreIO.unlinkIfExists(path)
                throw error
            }
            // If this fails the blob may not be durable: the put fails (no 250 is sent) and the
            // file, if it survives, is an orphan for the garbage collector.
            try FileStoreIO.fsyncDirectory(directory)
        }
    }

    /// Throws a `FileStoreError` with `isNotFound` when there is no such blob.
    public func get(key: String) async throws -> ByteBuffer {
        let path = try self.checkedPath(for: key, operation: "get")
        return try await self.threadPool.runIfActive {
            try FileStoreIO.readAll(path)
        }
    }

    public func delete(key: String) async throws {
        let path = try self.checkedPath(for: key, operation: "delete")
        try await self.threadPool.runIfActive {
            try FileStoreIO.unlinkIfExists(path)
        }
    }

    /// Every blob (regular files named by a valid key; `tmp/` excluded) with its mtime.
    public func list() async throws -> [(key: String, modified: Date)] {
        let directory = self.directory
        return try await self.threadPool.runIfActive {
            var result: [(key: String, modified: Date)] = []
            for name in try FileStoreIO.listDirectory(directory) ?? [] where Self.isValidKey(name) {
                guard let info = try FileStoreIO.lstatIfExists("\(directory)/\(name)"),
                    FileStoreIO.isRegularFile(info)
                else { continue }
                result.append((key: name, modified: FileStoreIO.modificationDate(info)))
            }
            return result.sorted { $0.key < $1.key }
        }
    }

    /// Removes files in `tmp/` last modified more than `age` ago: leftovers of puts
    /// interrupted by a crash. Run at start-up and periodically (e.g. with `.seconds(3600)`).
    /// Returns how many were removed.
    @discardableResult
    public func removeStaleTemporaryFiles(olderThan age: Duration) async throws -> Int {
        let tmpDirectory = self.tmpDirectory
        let cutoff = FileStoreIO.nowSeconds() - age.fileStoreSeconds
        return try await self.threadPool.runIfActive {
            var removed = 0
            for name in try FileStoreIO.listDirectory(tmpDirectory) ?? [] {
                let path = "\(tmpDirectory)/\(name)"
                guard let info = try FileStoreIO.lstatIfExists(path), !FileStoreIO.isDirectory(info),
                    FileStoreIO.modificationDate(info).timeIntervalSince1970 < cutoff
                else { continue }
                try FileStoreIO.unlinkIfExists(path)
                removed += 1
            }
            return removed
        }
    }
}
