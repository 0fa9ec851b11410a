#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import MailTier
import NIOCore

/// The spool on S3 (cluster mode): blob `<key>` is the object `spool/<key>`.
/// `put` returns once S3 acknowledged the PUT (S3 PUTs are durable when acknowledged).
public struct S3BlobStore: BlobStore {
    public let client: S3Client
    /// `spool/`.
    public let prefix: String
    /// Keys per ListObjectsV2 page in `list()` (S3 caps it at 1000).
    public let listPageSize: Int

    public init(client: S3Client, prefix: String = "spool/", listPageSize: Int = 1000) {
        self.client = client
        self.prefix = prefix
        self.listPageSize = max(1, min(listPageSize, 1000))
    }

    public func put(key: String, data: ByteBuffer) async throws {
        try await client.putObject(key: objectKey(key), body: data, contentType: "application/octet-stream")
    }

    /// Throws `S3Error` with code `NoSuchKey` (`isNotFound`) for a missing blob.
    public func get(key: String) async throws -> ByteBuffer {
        try await client.getObject(key: objectKey(key))
    }

    public func delete(key: String) async throws {
        try await client.deleteObject(key: objectKey(key))
    }

    /// Every blob under the prefix (all pages), keys without the prefix.
    public func list() async throws -> [(key: String, modified: Date)] {
        var blobs: [(key: String, modified: Date)] = []
        var token: String?
        repeat {
            let page = try await client.listObjects(prefix: prefix, continuationToken: token, maxKeys: listPageSize)
            for object in page.keys where object.key.hasPrefix(prefix) {
                let key = String(object.key.dropFirst(prefix.count))
                if !key.isEmpty { blobs.append((key, object.lastModified)) }
            }
            token = page.nextToken
        } while token != nil
        return blobs
    }

    private func objectKey(_ key: String) throws -> String {
        guard !key.isEmpty else {
            throw S3Error(code: "InvalidRequest", status: 0, message: "empty blob key", isRetryable: false)
        }
        return prefix + key
    }
}

/// Message content in an S3 bucket, for `IndexedMailboxStore` (the `s3` storage type):
/// `{year}/{month}/{day}/{message-id}.eml`, the date being when the message was received (UTC).
/// One object per message: several recipients' index rows share it.
public struct S3MessageContentStore: MessageContentStore {
    public let client: S3Client

    public init(client: S3Client) {
        self.client = client
    }

    /// `2024/03/07/msg_….eml`: month and day zero-padded, in UTC.
    public func location(for delivery: MailboxDelivery) -> String {
        let time = UTCTime(delivery.receivedAt)
        return "\(SigV4.pad(time.year, 4))/\(SigV4.pad(time.month, 2))/\(SigV4.pad(time.day, 2))/\(delivery.messageID).eml"
    }

    /// A PUT: writing the same location again replaces the object.
    public func write(_ content: ByteBuffer, at location: String) async throws {
        try await client.putObject(key: location, body: content, contentType: "message/rfc822")
    }

    /// Throws `S3Error` with code `NoSuchKey` (`isNotFound`) when there is no such object.
    public func read(at location: String) async throws -> ByteBuffer {
        try await client.getObject(key: location)
    }

    public func remove(at location: String) async throws {
        try await client.deleteObject(key: location)
    }
}
