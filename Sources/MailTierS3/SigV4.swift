#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Crypto

// AWS Signature Version 4 (https://docs.aws.amazon.com/IAM/latest/UserGuide/reference_sigv.html),
// as S3 uses it: pure functions, no I/O, no clock (every date is passed in).
//
// The path given to the signer is the *decoded* path (`/bucket/a key+1.txt`): it is encoded here,
// once, segment by segment, and the same encoding must be sent on the wire
// (`SigV4.canonicalURI(path:)`). S3 does not normalize paths (`.`/`..`/`//` are kept as they are),
// and neither does this signer.

/// The pieces of SigV4 that have no state.
public enum SigV4 {
    public static let algorithm = "AWS4-HMAC-SHA256"
    /// SHA-256 of the empty payload, hex.
    public static let emptyPayloadHash = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    /// The `x-amz-content-sha256` value for an unsigned payload.
    public static let unsignedPayload = "UNSIGNED-PAYLOAD"

    // MARK: Encoding

    /// AWS `UriEncode`: every byte of the UTF-8 form except the unreserved characters
    /// `A-Z a-z 0-9 - . _ ~` becomes `%XX` (upper-case hex); space is `%20`, never `+`.
    /// `/` is kept when `encodeSlash` is false (path segments of an object key).
    public static func uriEncode(_ text: String, encodeSlash: Bool = true) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count)
        for byte in text.utf8 {
            if isUnreserved(byte) || (!encodeSlash && byte == UInt8(ascii: "/")) {
                out.append(byte)
            } else {
                out.append(UInt8(ascii: "%"))
                out.append(hexDigitsUpper[Int(byte >> 4)])
                out.append(hexDigitsUpper[Int(byte & 0x0F)])
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// The canonical URI of a decoded path: each segment URI-encoded, `/` kept, no normalization.
    /// An empty path is `/`.
    public static func canonicalURI(path: String) -> String {
        if path.isEmpty { return "/" }
        let encoded = uriEncode(path, encodeSlash: false)
        return encoded.hasPrefix("/") ? encoded : "/" + encoded
    }

    /// The canonical query string of decoded name/value pairs: both URI-encoded (RFC 3986, `/`
    /// encoded too), sorted by encoded name then encoded value (byte order), joined with `&`.
    /// A parameter without a value is `name=`.
    public static func canonicalQueryString(_ items: [(name: String, value: String)]) -> String {
        items
            .map { (uriEncode($0.name), uriEncode($0.value)) }
            .sorted { lhs, rhs in
                lhs.0 == rhs.0 ? lhs.1.utf8.lexicographicallyPrecedes(rhs.1.utf8) : lhs.0.utf8.lexicographicallyPrecedes(rhs.0.utf8)
            }
            .map { "\($0.0)=\($0.1)" }
            .joined(separator: "&")
    }

    /// Canonical headers and the signed-headers list: names lower-cased and sorted, values
    /// trimmed with runs of spaces collapsed to one, repeated names joined with `,` in the order
    /// given. Returns the block (each line ends with `\n`) and `a;b;c`.
    public static func canonicalHeaders(_ headers: [(name: String, value: String)]) -> (canonical: String, signed: String) {
        var names: [String] = []
        var values: [String: [String]] = [:]
        for (name, value) in headers {
            let lower = name.lowercased()
            if values[lower] == nil { names.append(lower) }
            values[lower, default: []].append(canonicalHeaderValue(value))
        }
        names.sort { $0.utf8.lexicographicallyPrecedes($1.utf8) }
        var block = ""
        for name in names {
            block += name + ":" + values[name, default: []].joined(separator: ",") + "\n"
        }
        return (block, names.joined(separator: ";"))
    }

    /// Trims leading and trailing whitespace and collapses every run of spaces, tabs and line
    /// breaks into one space.
    public static func canonicalHeaderValue(_ value: String) -> String {
        var out: [UInt8] = []
        var pendingSpace = false
        for byte in value.utf8 {
            if byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\t") || byte == UInt8(ascii: "\r") || byte == UInt8(ascii: "\n") {
                pendingSpace = !out.isEmpty
            } else {
                if pendingSpace { out.append(UInt8(ascii: " ")) }
                pendingSpace = false
                out.append(byte)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    // MARK: Hashing

    public static func hexSHA256<Bytes: Sequence>(_ bytes: Bytes) -> String where Bytes.Element == UInt8 {
        var hasher = SHA256()
        hasher.update(data: Array(bytes))
        return hex(hasher.finalize())
    }

    public static func hexSHA256(_ text: String) -> String { hexSHA256(Array(text.utf8)) }

    static func hex<Bytes: Sequence>(_ bytes: Bytes) -> String where Bytes.Element == UInt8 {
        var out: [UInt8] = []
        for byte in bytes {
            out.append(hexDigitsLower[Int(byte >> 4)])
            out.append(hexDigitsLower[Int(byte & 0x0F)])
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// `kSigning = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, yyyyMMdd), region), service), "aws4_request")`.
    public static func signingKey(secretKey: String, dateStamp: String, region: String, service: String) -> [UInt8] {
        var key = Array(("AWS4" + secretKey).utf8)
        for part in [dateStamp, region, service, "aws4_request"] {
            key = Array(HMAC<SHA256>.authenticationCode(for: Array(part.utf8), using: SymmetricKey(data: key)))
        }
        return key
    }

    // MARK: Dates

    /// `yyyyMMdd'T'HHmmss'Z'` in UTC (the `x-amz-date` header).
    public static func amzDate(_ date: Date) -> String {
        let t = UTCTime(date)
        return "\(pad(t.year, 4))\(pad(t.month, 2))\(pad(t.day, 2))T\(pad(t.hour, 2))\(pad(t.minute, 2))\(pad(t.second, 2))Z"
    }

    /// `yyyyMMdd` in UTC (the credential scope's date).
    public static func dateStamp(_ date: Date) -> String {
        let t = UTCTime(date)
        return "\(pad(t.year, 4))\(pad(t.month, 2))\(pad(t.day, 2))"
    }

    // MARK: Private

    private static func isUnreserved(_ byte: UInt8) -> Bool {
        switch byte {
        case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
            UInt8(ascii: "-"), UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "~"):
            return true
        default:
            return false
        }
    }

    private static let hexDigitsUpper = Array("0123456789ABCDEF".utf8)
    private static let hexDigitsLower = Array("0123456789abcdef".utf8)

    static func pad(_ value: Int, _ width: Int) -> String {
        let digits = String(value)
        return digits.count >= width ? digits : String(repeating: "0", count: width - digits.count) + digits
    }
}

/// Every intermediate of one signature, for tests and debugging. Holds no secret: the
/// signature is an HMAC output and safe to log.
public struct SigV4Signature: Sendable, Equatable {
    public var canonicalRequest: String
    public var stringToSign: String
    /// `yyyyMMdd/region/service/aws4_request`.
    public var credentialScope: String
    /// `host;x-amz-date;…`.
    public var signedHeaders: String
    /// Lower-case hex.
    public var signature: String
    /// The whole `Authorization` header value.
    public var authorization: String
}

/// Signs requests with one access key for one region and service.
public struct SigV4Signer: Sendable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    public let accessKey: String
    private let secretKey: String
    public let region: String
    public let service: String

    public init(accessKey: String, secretKey: String, region: String, service: String = "s3") {
        self.accessKey = accessKey
        self.secretKey = secretKey
        self.region = region
        self.service = service
    }

    /// Signs a request whose headers to sign are `headers` (they must already include `host`
    /// and `x-amz-date`, whose value must be `SigV4.amzDate(date)`).
    /// - Parameters:
    ///   - path: the decoded path (`/bucket/key with spaces`); encoded here.
    ///   - query: decoded name/value pairs; encoded here.
    ///   - payloadHash: hex SHA-256 of the body, or `SigV4.unsignedPayload`.
    public func sign(
        method: String, path: String, query: [(name: String, value: String)] = [],
        headers: [(name: String, value: String)], payloadHash: String, date: Date
    ) -> SigV4Signature {
        let (canonicalHeaders, signedHeaders) = SigV4.canonicalHeaders(headers)
        let canonicalRequest = [
            method.uppercased(),
            SigV4.canonicalURI(path: path),
            SigV4.canonicalQueryString(query),
            canonicalHeaders,
            signedHeaders,
            payloadHash,
        ].joined(separator: "\n")
        let dateStamp = SigV4.dateStamp(date)
        let scope = "\(dateStamp)/\(region)/\(service)/aws4_request"
        let stringToSign = [SigV4.algorithm, SigV4.amzDate(date), scope, SigV4.hexSHA256(canonicalRequest)].joined(separator: "\n")
        let key = SigV4.signingKey(secretKey: secretKey, dateStamp: dateStamp, region: region, service: service)
        let signature = SigV4.hex(HMAC<SHA256>.authenticationCode(for: Array(stringToSign.utf8), using: SymmetricKey(data: key)))
        let authorization =
            "\(SigV4.algorithm) Credential=\(accessKey)/\(scope), SignedHeaders=\(signedHeaders), Signature=\(signature)"
        return SigV4Signature(
            canonicalRequest: canonicalRequest, stringToSign: stringToSign, credentialScope: scope,
            signedHeaders: signedHeaders, signature: signature, authorization: authorization)
    }

    /// Adds `x-amz-date` (when absent) to `headers`, signs them all, and returns them followed
    /// by `Authorization`: the headers to send.
    public func authorize(
        method: String, path: String, query: [(name: String, value: String)] = [],
        headers: [(name: String, value: String)], payloadHash: String, date: Date
    ) -> [(name: String, value: String)] {
        var headers = headers
        if !headers.contains(where: { $0.name.lowercased() == "x-amz-date" }) {
            headers.append(("x-amz-date", SigV4.amzDate(date)))
        }
        let signature = sign(method: method, path: path, query: query, headers: headers, payloadHash: payloadHash, date: date)
        headers.append(("Authorization", signature.authorization))
        return headers
    }

    public var description: String { "SigV4Signer(accessKey: \(accessKey), region: \(region), service: \(service))" }
    public var debugDescription: String { description }
    /// Keeps the secret out of `dump` and the debugger.
    public var customMirror: Mirror {
        Mirror(self, children: ["accessKey": accessKey, "region": region, "service": service], displayStyle: .struct)
    }
}

// MARK: - UTC calendar arithmetic (FoundationEssentials has no DateFormatter)

/// A `Date` broken into UTC fields, and back (proleptic Gregorian; Hinnant's algorithms).
struct UTCTime: Equatable {
    var year: Int
    var month: Int
    var day: Int
    var hour: Int
    var minute: Int
    var second: Int

    init(year: Int, month: Int, day: Int, hour: Int = 0, minute: Int = 0, second: Int = 0) {
        self.year = year
        self.month = month
        self.day = day
        self.hour = hour
        self.minute = minute
        self.second = second
    }

    init(_ date: Date) {
        let seconds = Int(date.timeIntervalSince1970.rounded(.down))
        var days = seconds / 86_400
        var rest = seconds % 86_400
        if rest < 0 {
            rest += 86_400
            days -= 1
        }
        let (y, m, d) = UTCTime.civil(fromDays: days)
        self.init(year: y, month: m, day: d, hour: rest / 3600, minute: (rest % 3600) / 60, second: rest % 60)
    }

    var date: Date {
        let days = UTCTime.days(year: year, month: month, day: day)
        return Date(timeIntervalSince1970: Double(days * 86_400 + hour * 3600 + minute * 60 + second))
    }

    static func civil(fromDays z0: Int) -> (Int, Int, Int) {
        let z = z0 + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (m <= 2 ? 1 : 0), m, d)
    }

    static func days(year: Int, month: Int, day: Int) -> Int {
        let y = month <= 2 ? year - 1 : year
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let doy = (153 * (month > 2 ? month - 3 : month + 9) + 2) / 5 + day - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146_097 + doe - 719_468
    }
}
