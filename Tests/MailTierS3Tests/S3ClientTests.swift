#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import MailTier
import NIOCore
import Testing

#if canImport(Glibc)
import Glibc
#endif

@testable import MailTierS3

// Against a real S3 server (SeaweedFS with signature checking on): see TestServices.swift.

/// A client on a fresh bucket of its own, emptied and deleted afterwards.
private func withFreshBucket(
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: (S3Client, S3TestSettings) async throws -> Void
) async throws {
    guard let settings = TestServices.requireS3(sourceLocation: sourceLocation) else { return }
    let bucket = "mailtier-test-" + String(UInt64.random(in: 0...UInt64.max), radix: 16)
    let client = S3Client(configuration: configuration(settings, bucket: bucket))
    do {
        try await client.createBucket()
        try await body(client, settings)
    } catch {
        await removeBucket(client)
        try? await client.shutdown()
        throw error
    }
    await removeBucket(client)
    try await client.shutdown()
}

/// A client with its own HTTPClient, shut down afterwards whatever happens.
private func withClient(_ configuration: S3Configuration, _ body: (S3Client) async throws -> Void) async throws {
    let client = S3Client(configuration: configuration)
    do {
        try await body(client)
    } catch {
        try? await client.shutdown()
        throw error
    }
    try await client.shutdown()
}

private func configuration(_ settings: S3TestSettings, bucket: String, secretKey: String? = nil) -> S3Configuration {
    S3Configuration(
        endpoint: settings.endpoint, region: settings.region, accessKey: settings.accessKey,
        secretKey: secretKey ?? settings.secretKey, bucket: bucket, requestTimeout: .seconds(30))
}

/// Best effort: every object, then the bucket.
private func removeBucket(_ client: S3Client) async {
    var token: String?
    repeat {
        guard let page = try? await client.listObjects(prefix: "", continuationToken: token) else { break }
        for object in page.keys { try? await client.deleteObject(key: object.key) }
        token = page.nextToken
    } while token != nil
    try? await client.deleteBucket()
}

private func buffer(_ bytes: [UInt8]) -> ByteBuffer { ByteBuffer(bytes: bytes) }
private func buffer(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }

/// The S3Error thrown by `operation`, recording an issue if it threw nothing or something else.
private func s3Error(
    sourceLocation: SourceLocation = #_sourceLocation, _ operation: () async throws -> Void
) async -> S3Error? {
    do {
        try await operation()
        Issue.record("expected an S3Error, nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as S3Error {
        return error
    } catch {
        Issue.record("expected an S3Error, got \(type(of: error)): \(error)", sourceLocation: sourceLocation)
    }
    return nil
}

@Suite("S3 client against a real S3 server", .enabled(if: TestServices.shouldRunS3Tests, TestServices.s3SkipNote))
struct S3ClientTests {
    @Test func binaryRoundTrip() async throws {
        try await withFreshBucket { client, _ in
            let allBytes = (0...255).map { UInt8($0) }
            try await client.putObject(key: "bytes.bin", body: buffer(allBytes))
            #expect(Array(try await client.getObject(key: "bytes.bin").readableBytesView) == allBytes)

            var generator = SystemRandomNumberGenerator()
            let large = (0..<(2 * 1024 * 1024)).map { _ in UInt8.random(in: 0...255, using: &generator) }
            try await client.putObject(key: "large.bin", body: buffer(large))
            let fetched = try await client.getObject(key: "large.bin")
            #expect(fetched.readableBytes == large.count)
            #expect(Array(fetched.readableBytesView) == large)

            try await client.putObject(key: "empty", body: ByteBuffer())
            #expect(try await client.getObject(key: "empty").readableBytes == 0)
        }
    }

    @Test func putReplacesAnObject() async throws {
        try await withFreshBucket { client, _ in
            try await client.putObject(key: "k", body: buffer("first"), contentType: "text/plain")
            try await client.putObject(key: "k", body: buffer("second, longer"), contentType: "text/plain")
            #expect(String(buffer: try await client.getObject(key: "k")) == "second, longer")
        }
    }

    @Test func awkwardKeys() async throws {
        let keys = [
            "with space.eml", "plus+sign.eml", "dossier/été ☃ 日本.eml", "a/b/c/deep key.txt", "tilde~percent%25.txt",
            "amp&lt<gt>'quote\".txt", "equals=and?question#hash.txt", "(parens)!*$,;:@.txt",
        ]
        try await withFreshBucket { client, _ in
            for (index, key) in keys.enumerated() {
                try await client.putObject(key: key, body: buffer("content \(index)"))
            }
            for (index, key) in keys.enumerated() {
                #expect(String(buffer: try await client.getObject(key: key)) == "content \(index)", "key \(key)")
                #expect(try await client.headObject(key: key)?.size == "content \(index)".utf8.count, "key \(key)")
            }
            // Listing returns the keys exactly (XML entities decoded).
            let listed = try await client.listObjects(prefix: "")
            #expect(Set(listed.keys.map(\.key)) == Set(keys))
            #expect(listed.nextToken == nil)
            // A prefix with a space, a slash and UTF-8.
            let dossier = try await client.listObjects(prefix: "dossier/été")
            #expect(dossier.keys.map(\.key) == ["dossier/été ☃ 日本.eml"])
            for key in keys { try await client.deleteObject(key: key) }
            #expect(try await client.listObjects(prefix: "").keys.isEmpty)
        }
    }

    @Test func head() async throws {
        try await withFreshBucket { client, _ in
            let before = Date()
            try await client.putObject(key: "h/object", body: buffer("12345"))
            let head = try #require(try await client.headObject(key: "h/object"))
            #expect(head.size == 5)
            // A local server: its clock is ours, to within the second precision of HTTP dates.
            #expect(abs(head.lastModified.timeIntervalSince(before)) < 120)
            #expect(try await client.headObject(key: "h/missing") == nil)
        }
    }

    @Test func deleteAndDeleteMissing() async throws {
        try await withFreshBucket { client, _ in
            try await client.putObject(key: "gone", body: buffer("x"))
            try await client.deleteObject(key: "gone")
            #expect(try await client.headObject(key: "gone") == nil)
            try await client.deleteObject(key: "gone")
            try await client.deleteObject(key: "never/existed")
        }
    }

    @Test func listWithPrefixAndPagination() async throws {
        try await withFreshBucket { client, _ in
            let pageKeys = (0..<7).map { "page/item-\($0)" }
            for (index, key) in pageKeys.enumerated() {
                try await client.putObject(key: key, body: buffer(String(repeating: "x", count: index + 1)))
            }
            try await client.putObject(key: "other/one", body: buffer("o"))
            try await client.putObject(key: "pagex", body: buffer("o"))

            var seen: [(key: String, size: Int, lastModified: Date)] = []
            var token: String?
            var pages = 0
            repeat {
                let page = try await client.listObjects(prefix: "page/", continuationToken: token, maxKeys: 2)
                #expect(page.keys.count <= 2)
                seen += page.keys
                token = page.nextToken
                pages += 1
                if pages > 20 { Issue.record("pagination does not end"); break }
            } while token != nil
            #expect(pages >= 4)
            #expect(seen.map(\.key) == pageKeys)
            #expect(seen.map(\.size) == Array(1...7))
            #expect(seen.allSatisfy { abs($0.lastModified.timeIntervalSinceNow) < 600 })

            let nothing = try await client.listObjects(prefix: "nothing/")
            #expect(nothing.keys.isEmpty)
            #expect(nothing.nextToken == nil)
        }
    }

    @Test func createBucketTwiceIsFine() async throws {
        try await withFreshBucket { client, _ in
            try await client.createBucket()
        }
    }

    @Test func wrongSecretKeyIsRejectedAndNotRetryable() async throws {
        try await withFreshBucket { client, settings in
            let wrongSecret = "not-the-secret-0123456789"
            try await withClient(configuration(settings, bucket: client.configuration.bucket, secretKey: wrongSecret)) { intruder in
            for operation in [
                { try await intruder.putObject(key: "x", body: buffer("x")) },
                { _ = try await intruder.getObject(key: "x") },
            ] as [@Sendable () async throws -> Void] {
                let error = try #require(await s3Error(operation))
                #expect(["SignatureDoesNotMatch", "AccessDenied"].contains(error.code), "\(error)")
                #expect(error.status == 403)
                #expect(!error.isRetryable)
                #expect(!error.description.contains(wrongSecret))
                #expect(!error.description.contains(settings.secretKey))
                #expect(!error.description.contains("AWS4-HMAC-SHA256"))
            }
            }
            #expect(try await client.headObject(key: "x") == nil)
        }
    }

    @Test func missingKeyIsNoSuchKeyAndNotRetryable() async throws {
        try await withFreshBucket { client, _ in
            let error = try #require(await s3Error { _ = try await client.getObject(key: "no/such/key") })
            #expect(error.code == "NoSuchKey")
            #expect(error.status == 404)
            #expect(error.isNotFound)
            #expect(!error.isRetryable)
        }
    }

    @Test func missingBucketIsNoSuchBucketAndNotRetryable() async throws {
        guard let settings = TestServices.requireS3() else { return }
        // Reads only: SeaweedFS (like some other S3 servers) creates a missing bucket on a PUT.
        try await withClient(configuration(settings, bucket: "mailtier-test-absent-\(UInt32.random(in: 0...UInt32.max))")) { client in
            let get = try #require(await s3Error { _ = try await client.getObject(key: "k") })
            #expect(get.code == "NoSuchBucket")
            #expect(get.isNotFound)
            #expect(!get.isRetryable)
            let list = try #require(await s3Error { _ = try await client.listObjects(prefix: "") })
            #expect(list.code == "NoSuchBucket")
            #expect(!list.isRetryable)
        }
    }

    // MARK: Stores

    @Test func blobStore() async throws {
        try await withFreshBucket { client, _ in
            let store = S3BlobStore(client: client, listPageSize: 2)
            try await client.putObject(key: "not-spool/x", body: buffer("outside"))
            let keys = (0..<5).map { "msg_\($0)" }
            for key in keys { try await store.put(key: key, data: buffer("body of \(key)")) }
            #expect(String(buffer: try await store.get(key: "msg_3")) == "body of msg_3")
            #expect(try await client.headObject(key: "spool/msg_3")?.size == "body of msg_3".utf8.count)

            let listed = try await store.list()
            #expect(listed.map(\.key).sorted() == keys)
            #expect(listed.allSatisfy { abs($0.modified.timeIntervalSinceNow) < 600 })

            try await store.delete(key: "msg_3")
            try await store.delete(key: "msg_3")
            #expect(try await store.list().map(\.key).sorted() == keys.filter { $0 != "msg_3" })
            let error = try #require(await s3Error { _ = try await store.get(key: "msg_3") })
            #expect(error.isNotFound)
        }
    }

    @Test func messageContentStore() async throws {
        try await withFreshBucket { client, _ in
            let store = S3MessageContentStore(client: client)
            // 2024-03-07T23:59:59Z: still the 7th in UTC whatever the local time zone.
            let delivery = MailboxDelivery(
                mailbox: "alice@example.com", messageID: "msg_01HXYZ", deliveryKey: "k1", sender: "bob@example.org",
                receivedAt: Date(timeIntervalSince1970: 1_709_855_999))
            let location = store.location(for: delivery)
            #expect(location == "2024/03/07/msg_01HXYZ.eml")

            let message = buffer("From: bob@example.org\r\nSubject: hi\r\n\r\nbody\r\n")
            try await store.write(message, at: location)
            try await store.write(message, at: location)  // idempotent
            #expect(try await store.read(at: location) == message)
            #expect(try await client.listObjects(prefix: "2024/03/07/").keys.map(\.key) == [location])

            try await store.remove(at: location)
            try await store.remove(at: location)
            let error = try #require(await s3Error { _ = try await store.read(at: location) })
            #expect(error.isNotFound)
        }
    }
}

// MARK: - Without a server

@Suite("S3 pieces that need no server")
struct S3OfflineTests {
    @Test func locationIsAUTCDatePath() async throws {
        try await withClient(S3Configuration(region: "us-east-1", accessKey: "a", secretKey: "s", bucket: "b")) { client in
        let store = S3MessageContentStore(client: client)
        func location(_ seconds: Double, _ id: String = "msg_1") -> String {
            store.location(
                for: MailboxDelivery(
                    mailbox: "a@b.c", messageID: id, deliveryKey: "k", sender: "", receivedAt: Date(timeIntervalSince1970: seconds)))
        }
        #expect(location(0) == "1970/01/01/msg_1.eml")
        #expect(location(1_709_855_999) == "2024/03/07/msg_1.eml")
        #expect(location(1_709_856_000) == "2024/03/08/msg_1.eml")
        #expect(location(951_825_600, "msg_leap") == "2000/02/29/msg_leap.eml")
        #expect(location(1_735_689_599) == "2024/12/31/msg_1.eml")
        }
    }

    @Test func listObjectsV2Parsing() throws {
        let xml = """
            <?xml version="1.0" encoding="UTF-8"?>
            <ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
              <Name>b</Name><Prefix>spool/</Prefix><KeyCount>3</KeyCount><MaxKeys>3</MaxKeys>
              <IsTruncated>true</IsTruncated>
              <Contents><Key>spool/a &amp; b &lt;c&gt; &quot;d&quot; &apos;e&apos;</Key><LastModified>2024-03-07T23:59:59.000Z</LastModified>
                <ETag>&quot;abc&quot;</ETag><Size>12</Size><StorageClass>STANDARD</StorageClass></Contents>
              <Contents>
                <Key> leading space &#233;&#x263A;</Key>
                <LastModified>2024-03-08T00:00:00Z</LastModified>
                <Size>0</Size>
              </Contents>
              <Contents><Key><![CDATA[spool/<raw> & cdata]]></Key><LastModified>2024-03-08T00:00:01.5Z</LastModified><Size>3</Size></Contents>
              <NextContinuationToken>token+/=&amp;</NextContinuationToken>
            </ListBucketResult>
            """
        let page = try S3XML.parseListObjectsV2(ByteBuffer(string: xml), status: 200)
        #expect(page.keys.map(\.key) == ["spool/a & b <c> \"d\" 'e'", " leading space é☺", "spool/<raw> & cdata"])
        #expect(page.keys.map(\.size) == [12, 0, 3])
        #expect(page.keys[0].lastModified == Date(timeIntervalSince1970: 1_709_855_999))
        #expect(page.keys[2].lastModified == Date(timeIntervalSince1970: 1_709_856_001.5))
        #expect(page.nextToken == "token+/=&")

        let last = try S3XML.parseListObjectsV2(
            ByteBuffer(string: "<ListBucketResult><KeyCount>0</KeyCount><IsTruncated>false</IsTruncated></ListBucketResult>"),
            status: 200)
        #expect(last.keys.isEmpty)
        #expect(last.nextToken == nil)

        #expect(throws: S3Error.self) { try S3XML.parseListObjectsV2(ByteBuffer(string: "<html>nope</html>"), status: 200) }
        #expect(throws: S3Error.self) {
            try S3XML.parseListObjectsV2(
                ByteBuffer(string: "<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>"), status: 200)
        }
    }

    @Test func errorParsing() {
        let body = """
            <?xml version="1.0" encoding="UTF-8"?>
            <Error><Code>NoSuchKey</Code><Message>The specified key does not exist.</Message><Key>a&amp;b</Key></Error>
            """
        let fields = S3XML.parseError(ByteBuffer(string: body))
        #expect(fields.code == "NoSuchKey")
        #expect(fields.message == "The specified key does not exist.")
        #expect(S3XML.parseError(ByteBuffer()).code == nil)
        #expect(S3XML.parseError(ByteBuffer(string: "<KeyCount>1</KeyCount>")).code == nil)
    }

    @Test func dateParsing() {
        #expect(S3Dates.parseISO8601("2009-10-12T17:50:30.000Z") == Date(timeIntervalSince1970: 1_255_369_830))
        #expect(S3Dates.parseISO8601("2009-10-12T19:50:30+02:00") == Date(timeIntervalSince1970: 1_255_369_830))
        #expect(S3Dates.parseISO8601("2009-10-12") == nil)
        #expect(S3Dates.parseISO8601("2009-13-12T17:50:30Z") == nil)
        #expect(S3Dates.parseHTTPDate("Mon, 12 Oct 2009 17:50:30 GMT") == Date(timeIntervalSince1970: 1_255_369_830))
        #expect(S3Dates.parseHTTPDate("yesterday") == nil)
    }

    @Test func retryClassification() {
        #expect(S3Error(code: "InternalError", status: 500, message: "").isRetryable)
        #expect(S3Error(code: "ServiceUnavailable", status: 503, message: "").isRetryable)
        #expect(S3Error(code: "SlowDown", status: 503, message: "").isRetryable)
        #expect(S3Error(code: "HTTP 429", status: 429, message: "").isRetryable)
        #expect(S3Error(code: "RequestTimeout", status: 400, message: "").isRetryable)
        #expect(!S3Error(code: "NoSuchKey", status: 404, message: "").isRetryable)
        #expect(!S3Error(code: "AccessDenied", status: 403, message: "").isRetryable)
        #expect(!S3Error(code: "SignatureDoesNotMatch", status: 403, message: "").isRetryable)
        #expect(!S3Error(code: "NoSuchBucket", status: 404, message: "").isRetryable)
        #expect(!S3Error(code: "HTTP 400", status: 400, message: "").isRetryable)
    }

    @Test func configurationHidesTheSecret() {
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        let configuration = S3Configuration(region: "us-east-1", accessKey: "AKID", secretKey: secret, bucket: "b")
        var dumped = ""
        dump(configuration, to: &dumped)
        #expect(!"\(configuration)".contains(secret))
        #expect(!String(reflecting: configuration).contains(secret))
        #expect(!dumped.contains(secret))
    }

    @Test func unreachableEndpointIsRetryable() async throws {
        // Port 1 on the loopback: nothing listens there, every connection is refused. AsyncHTTPClient
        // retries refused connections until its connect timeout, so this ends as ConnectionError or
        // as this client's own Timeout, whichever comes first: both retryable.
        let unreachable = S3Configuration(
            endpoint: "http://127.0.0.1:1", region: "us-east-1", accessKey: "a", secretKey: "secret-never-shown",
            bucket: "b", requestTimeout: .seconds(3))
        try await withClient(unreachable) { client in
            let error = try #require(await s3Error { _ = try await client.getObject(key: "k") })
            #expect(error.isRetryable, "\(error)")
            #expect(error.status == 0)
            #expect(["ConnectionError", "Timeout"].contains(error.code), "\(error)")
            #expect(!error.description.contains("secret-never-shown"))
        }
    }

    #if canImport(Glibc)
    @Test func aServerThatNeverAnswersTimesOut() async throws {
        let listener = try #require(SilentListener())
        let silent = S3Configuration(
            endpoint: "http://127.0.0.1:\(listener.port)", region: "us-east-1", accessKey: "a", secretKey: "s", bucket: "b",
            requestTimeout: .milliseconds(500))
        try await withClient(silent) { client in
            let start = ContinuousClock.now
            let error = try #require(await s3Error { _ = try await client.getObject(key: "k") })
            #expect(error.code == "Timeout", "\(error)")
            #expect(error.isRetryable)
            // The point is that it returns; a loaded machine stretches the 500 ms.
            #expect(ContinuousClock.now - start < .seconds(20))
        }
        withExtendedLifetime(listener) {}
    }
    #endif

    @Test func invalidEndpointIsRejectedWithoutSending() async throws {
        let invalid = S3Configuration(endpoint: "ftp://example", region: "us-east-1", accessKey: "a", secretKey: "s", bucket: "b")
        try await withClient(invalid) { client in
            let error = try #require(await s3Error { _ = try await client.getObject(key: "k") })
            #expect(error.code == "InvalidRequest")
            #expect(!error.isRetryable)
            let empty = try #require(await s3Error { _ = try await client.getObject(key: "") })
            #expect(empty.code == "InvalidRequest")
        }
    }
}

#if canImport(Glibc)
/// A TCP socket on 127.0.0.1 that listens but never accepts: connections complete in the kernel's
/// backlog, requests are sent, and no byte ever comes back.
private final class SilentListener {
    let fd: Int32
    let port: Int

    init?() {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return nil }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { generic in
                bind(fd, generic, length) == 0 && listen(fd, 16) == 0 && getsockname(fd, generic, &length) == 0
            }
        }
        guard bound else {
            close(fd)
            return nil
        }
        self.fd = fd
        self.port = Int(UInt16(bigEndian: address.sin_port))
    }

    deinit { close(fd) }
}
#endif
