import Foundation
import Hummingbird
import MailTier

/// A JSON value as a request body holds it, for validation with precise messages.
enum JSONValue: Decodable, Equatable {
    case null
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    init(from decoder: any Decoder) throws {
        let container = try decoder.singleValueContainer()
        if container.decodeNil() {
            self = .null
        } else if let value = try? container.decode(Bool.self) {
            self = .bool(value)
        } else if let value = try? container.decode(Int64.self) {
            self = .integer(value)
        } else if let value = try? container.decode(Double.self) {
            self = .number(value)
        } else if let value = try? container.decode(String.self) {
            self = .string(value)
        } else if let value = try? container.decode([JSONValue].self) {
            self = .array(value)
        } else {
            self = .object(try container.decode([String: JSONValue].self))
        }
    }

    var typeName: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .integer, .number: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }
}

/// A request's JSON object, read once, with typed fields that fail as 400 with the field's name.
struct JSONBody {
    static let maximumSize = 65_536

    let fields: [String: JSONValue]

    /// Reads the body (at most 64 KiB) as one JSON object whose keys are all in `allowed`.
    static func read(_ request: Request, allowing allowed: Set<String>) async throws -> JSONBody {
        let buffer: ByteBuffer
        do {
            buffer = try await request.body.collect(upTo: maximumSize)
        } catch {
            throw APIError(.contentTooLarge, "too_large", "the request body is over \(maximumSize) bytes")
        }
        guard buffer.readableBytes > 0 else { throw APIError.badRequest("a JSON object is required as the request body") }
        let value: JSONValue
        do {
            value = try JSONDecoder().decode(JSONValue.self, from: Data(buffer.readableBytesView))
        } catch {
            throw APIError.badRequest("the request body is not valid JSON")
        }
        guard case .object(let fields) = value else {
            throw APIError.badRequest("the request body must be a JSON object, not \(value.typeName)")
        }
        if let unknown = fields.keys.sorted().first(where: { !allowed.contains($0) }) {
            throw APIError.badRequest(
                "unknown field \(AccountError.sanitized(unknown)) (allowed: \(allowed.sorted().joined(separator: ", ")))")
        }
        return JSONBody(fields: fields)
    }

    var isEmpty: Bool { fields.isEmpty }
    func has(_ key: String) -> Bool { fields[key] != nil }

    func string(_ key: String) throws -> String? {
        switch fields[key] {
        case nil: return nil
        case .string(let value): return value
        case let other?: throw APIError.badRequest("\(key) must be a string, not \(other.typeName)")
        }
    }

    func integer(_ key: String) throws -> Int? {
        switch fields[key] {
        case nil: return nil
        case .integer(let value) where value >= Int64(Int.min) && value <= Int64(Int.max): return Int(value)
        case let other?: throw APIError.badRequest("\(key) must be an integer, not \(other.typeName)")
        }
    }

    func bool(_ key: String) throws -> Bool? {
        switch fields[key] {
        case nil: return nil
        case .bool(let value): return value
        case let other?: throw APIError.badRequest("\(key) must be true or false, not \(other.typeName)")
        }
    }

    func required<T>(_ key: String, _ read: (String) throws -> T?) throws -> T {
        guard let value = try read(key) else { throw APIError.badRequest("\(key) is required") }
        return value
    }
}

/// `offset` and `limit` of a list request: integers, offset ≥ 0, limit 1…1000 (default 100).
struct Paging {
    static let maximumLimit = 1000

    var offset: Int
    var limit: Int

    init(_ request: Request) throws {
        offset = try Self.integer(request, "offset", default: 0, in: 0...Int(Int32.max))
        limit = try Self.integer(request, "limit", default: 100, in: 1...Self.maximumLimit)
    }

    static func integer(_ request: Request, _ name: String, default value: Int, in range: ClosedRange<Int>) throws -> Int {
        guard let text = request.uri.queryParameters[Substring(name)] else { return value }
        guard let number = Int(text), range.contains(number) else {
            throw APIError.badRequest(
                "\(name) must be an integer from \(range.lowerBound) to \(range.upperBound), not \(AccountError.sanitized(String(text)))")
        }
        return number
    }
}

/// Encodes a response body: keys sorted, slashes unescaped.
enum ResponseJSON {
    static func response<Value: Encodable>(_ value: Value) -> Response { response(.ok, value) }

    static func response<Value: Encodable>(_ status: HTTPResponse.Status, _ value: Value) -> Response {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        let text = (try? encoder.encode(value)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        return AdminAPI.jsonResponse(status, text)
    }

    struct Success: Encodable {
        var success = true
        var message: String
    }
}
