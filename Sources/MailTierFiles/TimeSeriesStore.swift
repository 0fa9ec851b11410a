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

/// The timeseries `MessageContentStore` (API.md, "Storage API → Time-Series Storage"): one
/// file per message at `<root>/YYYY/MM/DD/<messageID>.eml`, the date being the day the message
/// was received, in UTC. Pair it with a `MailboxIndex` in an `IndexedMailboxStore`.
///
/// Writes are durable before `write` returns: the content goes to a hidden temporary file in
/// the day directory (`.<name>.<random>.tmp`), is fsync'd, renamed into place, and the
/// directory is fsync'd. Directories are created 0700 (their parents' entries fsync'd), files
/// are 0600.
///
/// Encryption: with an `encryptionKey` (`SMTP_ENCRYPTION_KEY`), every file is sealed with
/// AES-256-GCM in the `SealedFile` format (magic `MTENC`, version byte 1, a fresh random 12-byte
/// nonce, ciphertext, 16-byte tag; the 18-byte header is authenticated as AAD). Reading:
/// - with a key: a file that fails authentication (wrong key, any byte changed, truncated)
///   throws `MailboxError` of kind `.corrupt`. A file without the `MTENC` magic (written
///   before encryption was turned on) is refused with `.corrupt` too, unless the store was
///   made with `acceptsPlaintextFiles: true` (a migration setting: it is then returned as
///   stored). The strict default means that nobody who can write the directory can swap in
///   unauthenticated content.
/// - without a key: a file starting with `MTENC` is refused with `.corrupt` ("encrypted, but
///   no key"), never returned as garbage; other files are returned as stored. (So a message
///   whose first five bytes are `MTENC` cannot be stored in plain files; delivered messages
///   start with `Return-Path:`.)
///
/// Every blocking call runs on `threadPool`.
public struct TimeSeriesContentStore: MessageContentStore {
    public let root: String
    let encryptionKey: SealingKey?
    /// With a key: return files that have no `MTENC` magic as they are (see above).
    public let acceptsPlaintextFiles: Bool
    let threadPool: NIOThreadPool

    public init(root: String, encryptionKey: SealingKey?, threadPool: NIOThreadPool, acceptsPlaintextFiles: Bool = false) {
        self.root = FileStoreIO.normalize(root)
        self.encryptionKey = encryptionKey
        self.threadPool = threadPool
        self.acceptsPlaintextFiles = acceptsPlaintextFiles
    }

    /// True when files are sealed.
    public var isEncrypted: Bool { self.encryptionKey != nil }

    /// Parses `SMTP_ENCRYPTION_KEY`: base64 of exactly 32 bytes. Throws `SealedFile.KeyError`
    /// saying what is wrong (empty, not base64, wrong length) without echoing the key.
    public static func key(fromBase64 text: String) throws -> SealingKey {
        try SealedFile.key(fromBase64: text)
    }

    // MARK: Locations

    /// `YYYY/MM/DD/<messageID>.eml`, the date being `receivedAt` in UTC. A message id with a
    /// character outside `A-Z a-z 0-9 _ -` (or `.` after the first character) has it written
    /// as `%XX` (its UTF-8 bytes in hex), so that every id gives one safe file name.
    public func location(for delivery: MailboxDelivery) -> String {
        "\(MailDate.day(delivery.receivedAt).replacing("-", with: "/"))/\(Self.fileName(for: delivery.messageID)).eml"
    }

    static func fileName(for messageID: String) -> String {
        var name = ""
        for (position, byte) in messageID.utf8.enumerated() {
            let plain =
                (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z")) || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")) || byte == UInt8(ascii: "_")
                || byte == UInt8(ascii: "-") || (byte == UInt8(ascii: ".") && position > 0)
            if plain {
                name.append(Character(UnicodeScalar(byte)))
            } else {
                let hex = String(byte, radix: 16, uppercase: true)
                name += "%" + (hex.count == 1 ? "0" : "") + hex
            }
        }
        return name.isEmpty ? "%" : String(name.prefix(240))
    }

    /// True for `DDDD/DD/DD/<name>.eml`, the name made of `A-Z a-z 0-9 _ - . %` and not
    /// starting with `.`: what `location(for:)` makes. Anything else (`..`, `/`, absolute
    /// paths) is rejected before any file is touched.
    public static func isValidLocation(_ location: String) -> Bool {
        let parts = location.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 4, location.utf8.count <= 255 else { return false }
        let digits = { (part: Substring, count: Int) in part.utf8.count == count && part.utf8.allSatisfy { $0 >= 48 && $0 <= 57 } }
        guard digits(parts[0], 4), digits(parts[1], 2), digits(parts[2], 2) else { return false }
        let name = parts[3]
        guard name.hasSuffix(".eml"), name.utf8.count > 4, !name.hasPrefix(".") else { return false }
        return name.utf8.allSatisfy { byte in
            (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z")) || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")) || byte == UInt8(ascii: "_")
                || byte == UInt8(ascii: "-") || byte == UInt8(ascii: ".") || byte == UInt8(ascii: "%")
        }
    }

    func path(of location: String, operation: String) throws(FileStoreError) -> String {
        guard Self.isValidLocation(location) else {
            throw FileStoreError(
                kind: .invalidKey, operation: operation, path: self.root,
                reason: "invalid timeseries location \(String(reflecting: String(location.prefix(80)))): expected YYYY/MM/DD/<name>.eml")
        }
        return "\(self.root)/\(location)"
    }

    // MARK: MessageContentStore

    public func write(_ content: ByteBuffer, at location: String) async throws {
        let path = try self.path(of: location, operation: "write")
        let key = self.encryptionKey
        let directory = FileStoreIO.parent(of: path)
        let root = self.root
        let name = String(path.dropFirst(directory.count + 1))
        let tmpPath = "\(directory)/.\(name).\(FileStoreIO.randomSuffix()).tmp"
        try await self.threadPool.runIfActive {
            // Sealing a large message is CPU work: here, not on the concurrency pool.
            let data = try key.map { try SealedFile.seal(content, key: $0) } ?? content
            try FileStoreIO.makeDirectories(root, mode: 0o700, syncParents: true)
            try Self.makeDateDirectories(root: root, location: location)
            let fd = try FileStoreIO.open(tmpPath, flags: O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode: 0o600)
            var open = true
            do {
                try FileStoreIO.writeAll(fd, data, path: tmpPath)
                try FileStoreIO.fsync(fd, path: tmpPath)
                open = false
                try FileStoreIO.close(fd, path: tmpPath)
                try FileStoreIO.rename(tmpPath, path)
            } catch {
                if open { try? FileStoreIO.close(fd, path: tmpPath) }
                try? FileStoreIO.unlinkIfExists(tmpPath)
                throw error
            }
            try FileStoreIO.fsyncDirectory(directory)
        }
    }

    /// `YYYY`, `YYYY/MM`, `YYYY/MM/DD` under `root`, each 0700, with the parent fsync'd after a
    /// directory is created.
    static func makeDateDirectories(root: String, location: String) throws(FileStoreError) {
        var current = root
        for part in location.split(separator: "/").dropLast() {
            let next = "\(current)/\(part)"
            if try FileStoreIO.makeDirectory(next, mode: 0o700) { try FileStoreIO.fsyncDirectory(current) }
            current = next
        }
    }

    /// The content as written. A missing file throws a `FileStoreError` with `isNotFound`;
    /// integrity failures throw `MailboxError` of kind `.corrupt` (see the type's documentation).
    public func read(at location: String) async throws -> ByteBuffer {
        let path = try self.path(of: location, operation: "read")
        return try await self.threadPool.runIfActive {
            try self.unseal(try FileStoreIO.readAll(path), location: location)
        }
    }

    func unseal(_ stored: ByteBuffer, location: String) throws(MailboxError) -> ByteBuffer {
        let sealed = SealedFile.hasMagic(stored)
        guard let key = self.encryptionKey else {
            if sealed {
                throw MailboxError(.corrupt, "\(location) is encrypted, but no encryption key is configured (SMTP_ENCRYPTION_KEY)")
            }
            return stored
        }
        guard sealed else {
            if self.acceptsPlaintextFiles { return stored }
            throw MailboxError(
                .corrupt, "\(location) is not encrypted, but an encryption key is configured: refusing unauthenticated content")
        }
        do {
            return try SealedFile.open(stored, key: key)
        } catch {
            throw MailboxError(.corrupt, "\(location): \(error.message)")
        }
    }

    /// Removes the file (a missing one is fine) and fsyncs its directory.
    public func remove(at location: String) async throws {
        let path = try self.path(of: location, operation: "remove")
        try await self.threadPool.runIfActive {
            guard try FileStoreIO.lstatIfExists(path) != nil else { return }
            try FileStoreIO.unlinkIfExists(path)
            try FileStoreIO.fsyncDirectory(FileStoreIO.parent(of: path))
        }
    }
}
