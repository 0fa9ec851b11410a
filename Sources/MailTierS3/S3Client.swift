#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import AsyncHTTPClient
import Crypto
import Logging
import NIOCore

// A small S3 client: the handful of operations MailTier needs, signed with SigV4, on a caller's
// AsyncHTTPClient. Path-style addressing when an endpoint is configured (MinIO, SeaweedFS, …),
// virtual-host style on AWS otherwise.

// MARK: - Configuration

/// Where the bucket is and how to sign for it. `description` and `dump` never show the secret.
public struct S3Configuration: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// Base URL of an S3-compatible server, e.g. `http://127.0.0.1:58333`: path-style requests
    /// (`<endpoint>/<bucket>/<key>`). Nil: AWS, `https://<bucket>.s3.<region>.amazonaws.com/<key>`.
    public var endpoint: String?
    public var region: String
    public var accessKey: String
    public var secretKey: String
    public var bucket: String
    /// The limit for one whole request: connecting, sending, and reading the response body.
    public var requestTimeout: TimeAmount
    /// The largest response body read (an object fetched with `getObject`).
    public var maxResponseBytes: Int

    public init(
        endpoint: String? = nil, region: String, accessKey: String, secretKey: String, bucket: String,
        requestTimeout: TimeAmount = .seconds(30), maxResponseBytes: Int = 512 * 1024 * 1024
    ) {
        self.endpoint = endpoint
        self.region = region
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.bucket = bucket
        self.requestTimeout = requestTimeout
        self.maxResponseBytes = maxResponseBytes
    }

    public var description: String {
        "S3Configuration(endpoint: \(endpoint ?? "AWS"), region: \(region), bucket: \(bucket), accessKey: \(accessKey), secretKey: <redacted>)"
    }

    public var debugDescription: String { description }

    public var customMirror: Mirror {
        Mirror(
            self,
            children: [
                "endpoint": endpoint as Any, "region": region, "bucket": bucket, "accessKey": accessKey,
                "secretKey": "<redacted>", "requestTimeout": requestTimeout, "maxResponseBytes": maxResponseBytes,
            ], displayStyle: .struct)
    }
}

// MARK: - Errors

/// A failed S3 request. `description` never contains credentials or request headers.
public struct S3Error: Error, Sendable, Equatable, CustomStringConvertible {
    /// The S3 error code of the response's XML body (`NoSuchKey`, `SlowDown`, …), `HTTP <status>`
    /// when the body had none, or for failures without a response: `ConnectionError`, `Timeout`,
    /// `InvalidRequest` (rejected before sending), `MalformedResponse`, `ResponseTooLarge`.
    public var code: String
    /// The HTTP status, 0 when there was no response.
    public var status: Int
    public var message: String
    /// True when the same request may succeed later: 5xx, 429, `SlowDown`, `RequestTimeout`,
    /// `InternalError`, connection failures and timeouts.
    public var isRetryable: Bool

    public init(code: String, status: Int, message: String, isRetryable: Bool) {
        self.code = code
        self.status = status
        self.message = message
        self.isRetryable = isRetryable
    }

    /// An error from an S3 response, classified by `isRetryable(code:status:)`.
    public init(code: String, status: Int, message: String) {
        self.init(code: code, status: status, message: message, isRetryable: S3Error.isRetryable(code: code, status: status))
    }

    public static func isRetryable(code: String, status: Int) -> Bool {
        if status >= 500 || status == 429 { return true }
        switch code {
        case "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException",
            "RequestTimeTooSkewed":
            return true
        default:
            return false
        }
    }

    /// The object (or bucket) does not exist.
    public var isNotFound: Bool { code == "NoSuchKey" || code == "NoSuchBucket" || status == 404 }

    public var description: String {
        let where_ = status > 0 ? "HTTP \(status)" : "no response"
        return "S3 error \(code) (\(where_)\(isRetryable ? ", retryable" : "")): \(message)"
    }
}

// MARK: - Client

/// S3 operations on one bucket. Thread-safe: every stored property is an immutable `Sendable` value.
public final class S3Client: Sendable {
    public let configuration: S3Configuration
    private let httpClient: HTTPClient
    private let signer: SigV4Signer
    private let target: Result<Target, S3Error>
    private let logger: Logger
    private let ownsHTTPClient: Bool

    /// `httpClient` is the caller's: this client uses it and never shuts it down.
    /// Give it a client that does not follow redirects (a redirect would resend signed headers).
    public convenience init(configuration: S3Configuration, httpClient: HTTPClient, logger: Logger = Logger(label: "mailtier.s3")) {
        self.init(configuration: configuration, httpClient: httpClient, owned: false, logger: logger)
    }

    /// Creates its own `HTTPClient` (on AsyncHTTPClient's shared event loop group, no redirects,
    /// connect timeout 10 s) for callers that do not depend on AsyncHTTPClient themselves.
    /// Call `shutdown()` when done with it.
    public convenience init(configuration: S3Configuration, logger: Logger = Logger(label: "mailtier.s3")) {
        let httpClient = HTTPClient(
            eventLoopGroup: HTTPClient.defaultEventLoopGroup,
            configuration: HTTPClient.Configuration(
                redirectConfiguration: .disallow, timeout: HTTPClient.Configuration.Timeout(connect: .seconds(10))),
            backgroundActivityLogger: logger)
        self.init(configuration: configuration, httpClient: httpClient, owned: true, logger: logger)
    }

    private init(configuration: S3Configuration, httpClient: HTTPClient, owned: Bool, logger: Logger) {
        self.configuration = configuration
        self.httpClient = httpClient
        self.ownsHTTPClient = owned
        self.signer = SigV4Signer(
            accessKey: configuration.accessKey, secretKey: configuration.secretKey, region: configuration.region, service: "s3")
        self.target = Target.make(configuration)
        self.logger = logger
    }

    /// Shuts down the `HTTPClient` this client created; does nothing for a caller's client.
    public func shutdown() async throws {
        if ownsHTTPClient { try await httpClient.shutdown() }
    }

    // MARK: Operations

    /// Stores `body` at `key`, replacing any object there. Returns once S3 acknowledged it.
    public func putObject(key: String, body: ByteBuffer, contentType: String = "application/octet-stream") async throws {
        try Self.validate(key: key)
        var md5 = Insecure.MD5()
        body.withUnsafeReadableBytes { md5.update(bufferPointer: $0) }
        let contentMD5 = Data(md5.finalize()).base64EncodedString()
        _ = try await send(
            .PUT, key: key, body: body,
            headers: [("content-md5", contentMD5), ("content-type", contentType)],
            unsignedHeaders: [("content-length", String(body.readableBytes))])
    }

    /// The object's bytes. Throws `S3Error` with code `NoSuchKey` when there is none.
    public func getObject(key: String) async throws -> ByteBuffer {
        try Self.validate(key: key)
        return try await send(.GET, key: key, maxBody: configuration.maxResponseBytes).body
    }

    /// Size and modification time, nil when there is no such object.
    public func headObject(key: String) async throws -> (size: Int, lastModified: Date)? {
        try Self.validate(key: key)
        let response: Response
        do {
            response = try await send(.HEAD, key: key)
        } catch let error as S3Error where error.status == 404 {
            return nil
        }
        guard let size = response.header("content-length").flatMap({ Int($0) }) else {
            throw S3Error(code: "MalformedResponse", status: response.status, message: "HEAD response without Content-Length", isRetryable: false)
        }
        guard let modified = response.header("last-modified").flatMap(S3Dates.parseHTTPDate) else {
            throw S3Error(code: "MalformedResponse", status: response.status, message: "HEAD response without a valid Last-Modified", isRetryable: false)
        }
        return (size, modified)
    }

    /// Deletes the object; deleting a missing object is not an error.
    public func deleteObject(key: String) async throws {
        try Self.validate(key: key)
        do {
            _ = try await send(.DELETE, key: key)
        } catch let error as S3Error where error.code == "NoSuchKey" {
            return
        }
    }

    /// One page of ListObjectsV2: keys starting with `prefix` in key order, and the token of the
    /// next page (nil on the last page).
    public func listObjects(
        prefix: String, continuationToken: String? = nil, maxKeys: Int = 1000
    ) async throws -> (keys: [(key: String, size: Int, lastModified: Date)], nextToken: String?) {
        var query: [(name: String, value: String)] = [("list-type", "2"), ("prefix", prefix), ("max-keys", String(maxKeys))]
        if let continuationToken { query.append(("continuation-token", continuationToken)) }
        let response = try await send(.GET, key: nil, query: query, maxBody: 64 * 1024 * 1024)
        return try S3XML.parseListObjectsV2(response.body, status: response.status)
    }

    /// Creates the bucket; a bucket that already exists and is ours is fine.
    public func createBucket() async throws {
        var body = ByteBuffer()
        if configuration.region != "us-east-1" {
            body.writeString(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><LocationConstraint>"
                    + S3XML.escape(configuration.region) + "</LocationConstraint></CreateBucketConfiguration>")
        }
        do {
            _ = try await send(.PUT, key: nil, body: body, headers: body.readableBytes > 0 ? [("content-type", "application/xml")] : [])
        } catch let error as S3Error where error.code == "BucketAlreadyOwnedByYou" {
            return
        }
    }

    /// Deletes the (empty) bucket; a missing bucket is fine.
    public func deleteBucket() async throws {
        do {
            _ = try await send(.DELETE, key: nil)
        } catch let error as S3Error where error.code == "NoSuchBucket" {
            return
        }
    }

    // MARK: Sending

    private enum Method: String, Sendable {
        case GET, PUT, HEAD, DELETE, POST
    }

    private struct Response: Sendable {
        var status: Int
        var headers: [(name: String, value: String)]
        var body: ByteBuffer

        /// The first value of the header `name` (case-insensitive).
        func header(_ name: String) -> String? {
            let lower = name.lowercased()
            return headers.first { $0.name.lowercased() == lower }?.value
        }
    }

    private static func validate(key: String) throws {
        if key.isEmpty { throw S3Error(code: "InvalidRequest", status: 0, message: "empty object key", isRetryable: false) }
        if key.utf8.count > 1024 {
            throw S3Error(code: "InvalidRequest", status: 0, message: "object key longer than 1024 bytes", isRetryable: false)
        }
    }

    /// Signs and sends one request, within `requestTimeout`; a non-2xx status becomes `S3Error`.
    private func send(
        _ method: Method, key: String?, query: [(name: String, value: String)] = [], body: ByteBuffer? = nil,
        headers extra: [(name: String, value: String)] = [], unsignedHeaders: [(name: String, value: String)] = [],
        maxBody: Int = 1024 * 1024
    ) async throws -> Response {
        let target = try self.target.get()
        let path = target.path(for: key)
        var url = target.base + SigV4.canonicalURI(path: path)
        let canonicalQuery = SigV4.canonicalQueryString(query)
        if !canonicalQuery.isEmpty { url += "?" + canonicalQuery }

        var payloadHash = SigV4.emptyPayloadHash
        if let body, body.readableBytes > 0 {
            var sha = SHA256()
            body.withUnsafeReadableBytes { sha.update(bufferPointer: $0) }
            payloadHash = SigV4.hex(sha.finalize())
        }
        let date = Date()
        let signed = signer.authorize(
            method: method.rawValue, path: path, query: query,
            headers: [("host", target.host), ("x-amz-content-sha256", payloadHash), ("x-amz-date", SigV4.amzDate(date))] + extra,
            payloadHash: payloadHash, date: date)

        var request = HTTPClientRequest(url: url)
        switch method {
        case .GET: request.method = .GET
        case .PUT: request.method = .PUT
        case .HEAD: request.method = .HEAD
        case .DELETE: request.method = .DELETE
        case .POST: request.method = .POST
        }
        for (name, value) in signed + unsignedHeaders { request.headers.add(name: name, value: value) }
        if let body {
            request.body = .bytes(body)
        } else if method == .PUT || method == .POST {
            request.body = .bytes(ByteBuffer())
        }

        let prepared = request
        let timeout = configuration.requestTimeout
        let client = httpClient
        let errorLimit = 64 * 1024
        let bodyLimit = method == .HEAD ? 0 : maxBody
        let secret = configuration.secretKey
        logger.trace("S3 request", metadata: ["method": "\(method.rawValue)", "path": "\(path)"])

        let response: Response
        do {
            response = try await Self.withTimeout(timeout) {
                let response = try await client.execute(prepared, timeout: timeout)
                let status = Int(response.status.code)
                let isSuccess = (200..<300).contains(status)
                let body = try await response.body.collect(upTo: isSuccess ? max(bodyLimit, 1) : errorLimit)
                return Response(status: status, headers: response.headers.map { ($0.name, $0.value) }, body: body)
            }
        } catch let error as S3Error {
            throw error
        } catch {
            if Task.isCancelled { throw CancellationError() }
            throw Self.transportError(error, secret: secret)
        }
        logger.trace("S3 response", metadata: ["method": "\(method.rawValue)", "path": "\(path)", "status": "\(response.status)"])

        guard (200..<300).contains(response.status) else {
            let fields = S3XML.parseError(response.body)
            let code = fields.code ?? "HTTP \(response.status)"
            var message = fields.message ?? (response.status == 404 ? "not found" : "request failed")
            if !secret.isEmpty { message = message.replacingAll(secret, with: "<redacted>") }
            throw S3Error(code: code, status: response.status, message: message)
        }
        return response
    }

    /// Runs `operation`, throwing a retryable `Timeout` error when it takes longer than `timeout`
    /// (AsyncHTTPClient's own deadline stops at the response head, not the body).
    private static func withTimeout<T: Sendable>(
        _ timeout: TimeAmount, _ operation: @escaping @Sendable () async throws -> T
    ) async throws -> T {
        try await withThrowingTaskGroup(of: T.self) { group in
            group.addTask { try await operation() }
            group.addTask {
                try await Task.sleep(nanoseconds: UInt64(max(timeout.nanoseconds, 0)))
                throw S3Error(
                    code: "Timeout", status: 0, message: "no complete response within \(timeout.nanoseconds / 1_000_000) ms",
                    isRetryable: true)
            }
            defer { group.cancelAll() }
            guard let result = try await group.next() else { throw CancellationError() }
            return result
        }
    }

    /// A failure without an S3 response: connection refused or reset, timeouts, … (retryable),
    /// or a request that could not be built (not retryable).
    private static func transportError(_ error: any Error, secret: String) -> S3Error {
        var message = String(describing: error)
        if !secret.isEmpty { message = message.replacingAll(secret, with: "<redacted>") }
        if let error = error as? HTTPClientError {
            switch error {
            case .deadlineExceeded, .connectTimeout, .readTimeout, .writeTimeout, .getConnectionFromPoolTimeout,
                .tlsHandshakeTimeout:
                return S3Error(code: "Timeout", status: 0, message: message, isRetryable: true)
            case .invalidURL, .emptyHost, .emptyScheme, .alreadyShutdown, .bodyLengthMismatch, .traceRequestWithBody:
                return S3Error(code: "InvalidRequest", status: 0, message: message, isRetryable: false)
            default:
                break
            }
            if message.contains("unsupportedScheme") || message.contains("invalidHeaderField") {
                return S3Error(code: "InvalidRequest", status: 0, message: message, isRetryable: false)
            }
        }
        if error is NIOTooManyBytesError {
            return S3Error(code: "ResponseTooLarge", status: 0, message: message, isRetryable: false)
        }
        return S3Error(code: "ConnectionError", status: 0, message: message, isRetryable: true)
    }
}

// MARK: - Addressing

/// Scheme, authority and path layout of the configured endpoint.
private struct Target: Sendable {
    /// `scheme://authority`, no trailing slash.
    var base: String
    /// The `Host` header (and signed `host`).
    var host: String
    /// Path-style: the bucket is the first path segment.
    var bucketInPath: String?

    func path(for key: String?) -> String {
        var path = ""
        if let bucketInPath { path = "/" + bucketInPath }
        if let key { path += "/" + key }
        return path.isEmpty ? "/" : path
    }

    static func make(_ configuration: S3Configuration) -> Result<Target, S3Error> {
        func invalid(_ why: String) -> Result<Target, S3Error> {
            .failure(S3Error(code: "InvalidRequest", status: 0, message: why, isRetryable: false))
        }
        let bucket = configuration.bucket
        guard !bucket.isEmpty, !bucket.contains("/") else { return invalid("invalid bucket name '\(bucket)'") }
        guard let endpoint = configuration.endpoint, !endpoint.isEmpty else {
            let host = "\(bucket).s3.\(configuration.region).amazonaws.com"
            return .success(Target(base: "https://" + host, host: host, bucketInPath: nil))
        }
        let scheme: String
        var rest: Substring
        if endpoint.lowercased().hasPrefix("http://") {
            scheme = "http"
            rest = endpoint.dropFirst(7)
        } else if endpoint.lowercased().hasPrefix("https://") {
            scheme = "https"
            rest = endpoint.dropFirst(8)
        } else {
            return invalid("S3 endpoint '\(endpoint)' is not an http:// or https:// URL")
        }
        if let slash = rest.firstIndex(of: "/") {
            guard rest[slash...].allSatisfy({ $0 == "/" }) else {
                return invalid("S3 endpoint '\(endpoint)' must not have a path")
            }
            rest = rest[..<slash]
        }
        if let at = rest.lastIndex(of: "@") { rest = rest[rest.index(after: at)...] }
        guard !rest.isEmpty else { return invalid("S3 endpoint '\(endpoint)' has no host") }
        var authority = String(rest).lowercased()
        // The Host header leaves out the scheme's default port, as HTTP clients do.
        if scheme == "http", authority.hasSuffix(":80") { authority.removeLast(3) }
        if scheme == "https", authority.hasSuffix(":443") { authority.removeLast(4) }
        return .success(Target(base: "\(scheme)://\(rest)", host: authority, bucketInPath: bucket))
    }
}

// MARK: - Dates

enum S3Dates {
    private static let months = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]

    /// ISO 8601 as S3 writes it: `2009-10-12T17:50:30.000Z` (fraction and zone suffix optional).
    static func parseISO8601(_ text: String) -> Date? {
        let bytes = Array(text.utf8)
        guard bytes.count >= 19, bytes[4] == UInt8(ascii: "-"), bytes[7] == UInt8(ascii: "-"),
            bytes[10] == UInt8(ascii: "T") || bytes[10] == UInt8(ascii: "t") || bytes[10] == UInt8(ascii: " "),
            bytes[13] == UInt8(ascii: ":"), bytes[16] == UInt8(ascii: ":"),
            let year = number(bytes[0..<4]), let month = number(bytes[5..<7]), let day = number(bytes[8..<10]),
            let hour = number(bytes[11..<13]), let minute = number(bytes[14..<16]), let second = number(bytes[17..<19]),
            (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 61
        else { return nil }
        var index = 19
        var fraction = 0.0
        if index < bytes.count, bytes[index] == UInt8(ascii: ".") {
            index += 1
            var scale = 0.1
            while index < bytes.count, let digit = digit(bytes[index]) {
                fraction += Double(digit) * scale
                scale /= 10
                index += 1
            }
        }
        var offset = 0
        if index < bytes.count {
            switch bytes[index] {
            case UInt8(ascii: "Z"), UInt8(ascii: "z"):
                index += 1
            case UInt8(ascii: "+"), UInt8(ascii: "-"):
                let sign = bytes[index] == UInt8(ascii: "+") ? 1 : -1
                let zone = bytes[(index + 1)...].filter { $0 != UInt8(ascii: ":") }
                guard zone.count == 4, let hours = number(zone[zone.startIndex..<(zone.startIndex + 2)]),
                    let minutes = number(zone[(zone.startIndex + 2)...])
                else { return nil }
                offset = sign * (hours * 3600 + minutes * 60)
                index = bytes.count
            default:
                return nil
            }
        }
        guard index == bytes.count else { return nil }
        let base = UTCTime(year: year, month: month, day: day, hour: hour, minute: minute, second: second).date
        return Date(timeIntervalSince1970: base.timeIntervalSince1970 - Double(offset) + fraction)
    }

    /// An HTTP date (RFC 9110 IMF-fixdate): `Wed, 12 Oct 2009 17:50:00 GMT`.
    static func parseHTTPDate(_ text: String) -> Date? {
        let parts = text.split(separator: " ").map { $0.lowercased() }
        guard parts.count == 6, parts[5] == "gmt" || parts[5] == "utc",
            let day = Int(parts[1]), let monthIndex = months.firstIndex(of: String(parts[2].prefix(3))), let year = Int(parts[3])
        else { return nil }
        let clock = parts[4].split(separator: ":")
        guard clock.count == 3, let hour = Int(clock[0]), let minute = Int(clock[1]), let second = Int(clock[2]) else { return nil }
        return UTCTime(year: year, month: monthIndex + 1, day: day, hour: hour, minute: minute, second: second).date
    }

    private static func digit(_ byte: UInt8) -> Int? {
        (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte) ? Int(byte - UInt8(ascii: "0")) : nil
    }

    private static func number<C: Collection>(_ bytes: C) -> Int? where C.Element == UInt8 {
        var value = 0
        for byte in bytes {
            guard let digit = digit(byte) else { return nil }
            value = value * 10 + digit
        }
        return bytes.isEmpty ? nil : value
    }
}

// MARK: - XML

/// Just enough XML for S3's responses: find elements by name, decode their text (the five
/// predefined entities, numeric character references, CDATA). Namespaces and attributes are
/// ignored; elements of one name are assumed not to nest in themselves (true of S3's schemas).
enum S3XML {
    /// The raw content of every `<name …>…</name>` (and `<name/>`, empty) in order.
    static func elements(_ name: String, in bytes: ArraySlice<UInt8>) -> [ArraySlice<UInt8>] {
        let name = Array(name.utf8)
        var results: [ArraySlice<UInt8>] = []
        var index = bytes.startIndex
        while let open = bytes[index...].firstIndex(of: UInt8(ascii: "<")) {
            var cursor = open + 1
            // Skip comments, CDATA, processing instructions and declarations as a whole.
            if bytes[cursor...].starts(with: Array("!--".utf8)) {
                index = find(Array("-->".utf8), in: bytes, from: cursor).map { $0 + 3 } ?? bytes.endIndex
                continue
            }
            if bytes[cursor...].starts(with: Array("![CDATA[".utf8)) {
                index = find(Array("]]>".utf8), in: bytes, from: cursor).map { $0 + 3 } ?? bytes.endIndex
                continue
            }
            guard bytes[cursor...].starts(with: name), cursor + name.count < bytes.endIndex else {
                index = cursor
                continue
            }
            cursor += name.count
            let after = bytes[cursor]
            guard after == UInt8(ascii: ">") || after == UInt8(ascii: "/") || isSpace(after) else {
                index = cursor
                continue
            }
            guard let close = bytes[cursor...].firstIndex(of: UInt8(ascii: ">")) else { break }
            if bytes[close - 1] == UInt8(ascii: "/") {
                results.append(bytes[close..<close])
                index = close + 1
                continue
            }
            let contentStart = close + 1
            // The end tag: `</name` then optional spaces then `>`, skipping CDATA on the way.
            var search = contentStart
            var found: (start: Int, end: Int)?
            while found == nil, let lt = bytes[search...].firstIndex(of: UInt8(ascii: "<")) {
                if bytes[(lt + 1)...].starts(with: Array("![CDATA[".utf8)) {
                    guard let cdataEnd = find(Array("]]>".utf8), in: bytes, from: lt) else { break }
                    search = cdataEnd + 3
                    continue
                }
                var tail = lt + 1
                if tail < bytes.endIndex, bytes[tail] == UInt8(ascii: "/"), bytes[(tail + 1)...].starts(with: name) {
                    tail += 1 + name.count
                    while tail < bytes.endIndex, isSpace(bytes[tail]) { tail += 1 }
                    if tail < bytes.endIndex, bytes[tail] == UInt8(ascii: ">") {
                        found = (lt, tail + 1)
                        break
                    }
                }
                search = lt + 1
            }
            guard let found else { break }
            results.append(bytes[contentStart..<found.start])
            index = found.end
        }
        return results
    }

    /// The decoded text of the first `<name>` element.
    static func text(_ name: String, in bytes: ArraySlice<UInt8>) -> String? {
        elements(name, in: bytes).first.map(decodeText)
    }

    /// Entity references and CDATA sections decoded; markup inside is kept as it is.
    static func decodeText(_ bytes: ArraySlice<UInt8>) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(bytes.count)
        var index = bytes.startIndex
        while index < bytes.endIndex {
            let byte = bytes[index]
            if byte == UInt8(ascii: "<"), bytes[(index + 1)...].starts(with: Array("![CDATA[".utf8)) {
                let start = index + 9
                let end = find(Array("]]>".utf8), in: bytes, from: start) ?? bytes.endIndex
                out.append(contentsOf: bytes[start..<end])
                index = min(end + 3, bytes.endIndex)
                continue
            }
            if byte == UInt8(ascii: "&"), let semicolon = bytes[index...].prefix(12).firstIndex(of: UInt8(ascii: ";")) {
                let entity = String(decoding: bytes[(index + 1)..<semicolon], as: UTF8.self)
                if let decoded = decodeEntity(entity) {
                    out.append(contentsOf: decoded.utf8)
                    index = semicolon + 1
                    continue
                }
            }
            out.append(byte)
            index += 1
        }
        return String(decoding: out, as: UTF8.self)
    }

    private static func decodeEntity(_ entity: String) -> String? {
        switch entity {
        case "amp": return "&"
        case "lt": return "<"
        case "gt": return ">"
        case "quot": return "\""
        case "apos": return "'"
        default: break
        }
        guard entity.hasPrefix("#") else { return nil }
        let digits = entity.dropFirst()
        let value: UInt32?
        if digits.first == "x" || digits.first == "X" {
            value = UInt32(digits.dropFirst(), radix: 16)
        } else {
            value = UInt32(digits, radix: 10)
        }
        return value.flatMap(Unicode.Scalar.init).map { String(Character($0)) }
    }

    /// `&`, `<`, `>`, `"` and `'` as entities.
    static func escape(_ text: String) -> String {
        var out = ""
        for character in text {
            switch character {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&apos;"
            default: out.append(character)
            }
        }
        return out
    }

    /// `<Error><Code>…</Code><Message>…</Message></Error>`.
    static func parseError(_ body: ByteBuffer) -> (code: String?, message: String?) {
        let bytes = ArraySlice(body.readableBytesView)
        let scope = elements("Error", in: bytes).first ?? bytes
        let code = text("Code", in: scope)?.trimmedWhitespace
        let message = text("Message", in: scope)?.trimmedWhitespace
        return (code.flatMap { $0.isEmpty ? nil : $0 }, message)
    }

    /// A `ListBucketResult` (ListObjectsV2).
    static func parseListObjectsV2(
        _ body: ByteBuffer, status: Int
    ) throws -> (keys: [(key: String, size: Int, lastModified: Date)], nextToken: String?) {
        let bytes = ArraySlice(body.readableBytesView)
        func malformed(_ why: String) -> S3Error {
            S3Error(code: "MalformedResponse", status: status, message: "ListObjectsV2: \(why)", isRetryable: false)
        }
        guard let result = elements("ListBucketResult", in: bytes).first else { throw malformed("no ListBucketResult") }
        var keys: [(key: String, size: Int, lastModified: Date)] = []
        for contents in elements("Contents", in: result) {
            guard let key = text("Key", in: contents) else { throw malformed("an entry without Key") }
            guard let size = text("Size", in: contents).flatMap({ Int($0.trimmedWhitespace) }) else {
                throw malformed("no valid Size for '\(key)'")
            }
            guard let modified = text("LastModified", in: contents).flatMap({ S3Dates.parseISO8601($0.trimmedWhitespace) }) else {
                throw malformed("no valid LastModified for '\(key)'")
            }
            keys.append((key, size, modified))
        }
        // IsTruncated is a direct child of ListBucketResult, after the Contents entries.
        let truncated = text("IsTruncated", in: result)?.trimmedWhitespace.lowercased() == "true"
        guard truncated else { return (keys, nil) }
        guard let token = text("NextContinuationToken", in: result), !token.isEmpty else {
            throw malformed("IsTruncated without NextContinuationToken")
        }
        return (keys, token)
    }

    private static func isSpace(_ byte: UInt8) -> Bool {
        byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") || byte == UInt8(ascii: "\r") || byte == UInt8(ascii: "\n")
    }

    private static func find(_ needle: [UInt8], in bytes: ArraySlice<UInt8>, from start: Int) -> Int? {
        var index = start
        while index + needle.count <= bytes.endIndex {
            if bytes[index...].starts(with: needle) { return index }
            index += 1
        }
        return nil
    }
}

extension String {
    fileprivate var trimmedWhitespace: String {
        var slice = Substring(self)
        while let first = slice.first, first.isWhitespace { slice = slice.dropFirst() }
        while let last = slice.last, last.isWhitespace { slice = slice.dropLast() }
        return String(slice)
    }

    /// Every occurrence of `target` replaced (FoundationEssentials has no `replacingOccurrences`).
    fileprivate func replacingAll(_ target: String, with replacement: String) -> String {
        guard !target.isEmpty else { return self }
        let parts = self.split(separator: target, omittingEmptySubsequences: false)
        return parts.joined(separator: replacement)
    }
}
