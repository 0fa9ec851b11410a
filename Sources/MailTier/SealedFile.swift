#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Crypto
import NIOCore

/// The key type of `SealedFile`: swift-crypto's `SymmetricKey` (32 bytes for AES-256-GCM).
/// Named here so that adapters which do not depend on swift-crypto themselves (MailTierFiles)
/// can take and pass keys.
public typealias SealingKey = SymmetricKey

/// Whole-file authenticated encryption for stored messages (`SMTP_ENCRYPTION_KEY`).
///
/// Format, version 1 (all integers are single bytes; no length fields, the file is one blob):
///
/// ```
/// offset  size  content
///      0     5  magic "MTENC" (0x4D 0x54 0x45 0x4E 0x43)
///      5     1  version = 1
///      6    12  nonce: fresh random for every file sealed
///     18     n  AES-256-GCM ciphertext of the plaintext (n = plaintext length)
///   18+n    16  GCM tag
/// ```
///
/// The 18-byte header (magic, version, nonce) is the GCM additional authenticated data, so a
/// changed byte anywhere in the file, a truncated file, or a wrong key all fail `open` with
/// `MailboxError.Kind.corrupt`; garbage is never returned.
public enum SealedFile {
    public static let magic: [UInt8] = Array("MTENC".utf8)
    public static let version: UInt8 = 1
    public static let nonceSize = 12
    public static let tagSize = 16
    /// magic + version + nonce.
    public static let headerSize = 5 + 1 + 12
    /// The smallest sealed file: header and tag around an empty plaintext.
    public static let minimumSize = headerSize + tagSize
    /// AES-256: the key is exactly this many bytes.
    public static let keySize = 32

    /// Why `key(fromBase64:)` refused a key.
    public struct KeyError: Error, Sendable, Equatable, CustomStringConvertible {
        public var message: String
        public init(_ message: String) { self.message = message }
        public var description: String { message }
    }

    /// True when `data` starts with the magic `MTENC` (whatever follows).
    public static func hasMagic(_ data: ByteBuffer) -> Bool {
        data.readableBytes >= magic.count && data.getBytes(at: data.readerIndex, length: magic.count) == magic
    }

    /// Parses `SMTP_ENCRYPTION_KEY`: standard base64 (padding required, blanks around ignored)
    /// of exactly 32 bytes.
    public static func key(fromBase64 text: String) throws(KeyError) -> SealingKey {
        let trimmed = text.trimmingSpacesAndTabs().trimmingNewlines()
        guard !trimmed.isEmpty else {
            throw KeyError("encryption key is empty: expected base64 of exactly 32 bytes (e.g. openssl rand -base64 32)")
        }
        guard let data = Data(base64Encoded: trimmed) else {
            throw KeyError("encryption key is not valid base64: expected base64 of exactly 32 bytes (e.g. openssl rand -base64 32)")
        }
        guard data.count == keySize else {
            throw KeyError(
                "encryption key decodes to \(data.count) bytes, expected exactly \(keySize) (AES-256; e.g. openssl rand -base64 32)")
        }
        return SymmetricKey(data: data)
    }

    /// Seals `plaintext` with a fresh random nonce. Throws only if the key is not 32 bytes
    /// (a `MailboxError` of kind `.unavailable`) or the crypto library fails.
    public static func seal(_ plaintext: ByteBuffer, key: SealingKey) throws -> ByteBuffer {
        guard key.bitCount == keySize * 8 else {
            throw MailboxError(.unavailable, "encryption key must be \(keySize) bytes (AES-256), got \(key.bitCount / 8)")
        }
        let nonce = AES.GCM.Nonce()
        var header = magic
        header.append(version)
        nonce.withUnsafeBytes { header.append(contentsOf: $0) }
        let sealed = try plaintext.withUnsafeReadableBytes { bytes in
            try AES.GCM.seal(bytes, using: key, nonce: nonce, authenticating: header)
        }
        var result = ByteBuffer()
        result.reserveCapacity(headerSize + plaintext.readableBytes + tagSize)
        result.writeBytes(header)
        result.writeBytes(sealed.ciphertext)
        result.writeBytes(sealed.tag)
        return result
    }

    /// Opens a file made by `seal`. Every failure is a `MailboxError` of kind `.corrupt` that
    /// says what is wrong: not a sealed file, unknown version, truncated, or failed
    /// authentication (wrong key, or the file was changed).
    public static func open(_ sealed: ByteBuffer, key: SealingKey) throws(MailboxError) -> ByteBuffer {
        guard hasMagic(sealed) else {
            throw MailboxError(.corrupt, "not an encrypted MailTier file (no MTENC header)")
        }
        guard sealed.readableBytes > magic.count else {
            throw MailboxError(.corrupt, "encrypted file is truncated (\(sealed.readableBytes) bytes, header incomplete)")
        }
        let fileVersion = sealed.getInteger(at: sealed.readerIndex + magic.count, as: UInt8.self)!
        guard fileVersion == version else {
            throw MailboxError(.corrupt, "encrypted file has unsupported format version \(fileVersion) (this build reads \(version))")
        }
        guard sealed.readableBytes >= minimumSize else {
            throw MailboxError(
                .corrupt, "encrypted file is truncated (\(sealed.readableBytes) bytes, at least \(minimumSize) expected)")
        }
        guard key.bitCount == keySize * 8 else {
            throw MailboxError(.corrupt, "cannot decrypt: the encryption key must be \(keySize) bytes (AES-256)")
        }
        let all = Array(sealed.readableBytesView)
        let header = all[0..<headerSize]
        let nonceBytes = all[(magic.count + 1)..<headerSize]
        let ciphertext = all[headerSize..<(all.count - tagSize)]
        let tag = all[(all.count - tagSize)...]
        let plaintext: [UInt8]
        do {
            let box = try AES.GCM.SealedBox(nonce: AES.GCM.Nonce(data: nonceBytes), ciphertext: ciphertext, tag: tag)
            plaintext = Array(try AES.GCM.open(box, using: key, authenticating: header))
        } catch {
            throw MailboxError(
                .corrupt, "encrypted file failed authentication: wrong encryption key, or the file was modified or truncated")
        }
        return ByteBuffer(bytes: plaintext)
    }
}

extension String {
    fileprivate func trimmingNewlines() -> String {
        var slice = Substring(self)
        while let first = slice.first, first == "\n" || first == "\r" || first == " " { slice = slice.dropFirst() }
        while let last = slice.last, last == "\n" || last == "\r" || last == " " { slice = slice.dropLast() }
        return String(slice)
    }
}
