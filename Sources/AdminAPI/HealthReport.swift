#if canImport(Glibc)
import Glibc
#endif
import MailTier

/// The body of `GET /health`: API.md's shape, plus `checks` (beyond API.md).
public struct HealthReport: Sendable, Equatable {
    public var version: String
    public var uptimeSeconds: Int
    public var activeConnections: Int
    public var totalConnections: Int
    public var memory: MemoryUsage
    public var checks: [HealthCheckResult]

    /// Healthy when every check is.
    public var isHealthy: Bool { checks.allSatisfy(\.isOK) }

    public init(
        version: String = MailTierVersion.current, uptimeSeconds: Int, activeConnections: Int, totalConnections: Int,
        memory: MemoryUsage, checks: [HealthCheckResult]
    ) {
        self.version = version
        self.uptimeSeconds = uptimeSeconds
        self.activeConnections = activeConnections
        self.totalConnections = totalConnections
        self.memory = memory
        self.checks = checks
    }

    /// The JSON text, keys in API.md's order, megabytes with one decimal.
    public var json: String {
        let checkFields = checks.map { "\(JSON.string($0.name)): \(JSON.string($0.problem ?? "ok"))" }
        return """
            {"status": \(JSON.string(isHealthy ? "healthy" : "unhealthy")), "version": \(JSON.string(version)), \
            "uptime_seconds": \(uptimeSeconds), \
            "connections": {"active": \(activeConnections), "total": \(totalConnections)}, \
            "memory": {"allocated_mb": \(JSON.megabytes(memory.residentBytes)), "heap_mb": \(JSON.megabytes(memory.heapBytes))}, \
            "checks": {\(checkFields.joined(separator: ", "))}}
            """
    }
}

/// This process's memory, from /proc/self/status: the resident set (`VmRSS`) and its anonymous
/// part (`RssAnon`: the malloc heap and the thread stacks, without mapped files such as the
/// binary). 0 where the system does not say (not Linux).
public struct MemoryUsage: Sendable, Equatable {
    public var residentBytes: UInt64
    public var heapBytes: UInt64

    public init(residentBytes: UInt64, heapBytes: UInt64) {
        self.residentBytes = residentBytes
        self.heapBytes = heapBytes
    }

    public static func current() -> MemoryUsage {
        #if os(Linux)
        guard let file = fopen("/proc/self/status", "r") else { return MemoryUsage(residentBytes: 0, heapBytes: 0) }
        defer { fclose(file) }
        var lines: [String] = []
        var line = [CChar](repeating: 0, count: 256)
        while fgets(&line, Int32(line.count), file) != nil {
            lines.append(String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self))
        }
        return MemoryUsage(status: lines)
        #else
        return MemoryUsage(residentBytes: 0, heapBytes: 0)
        #endif
    }

    /// From the lines of /proc/self/status (`VmRSS:     12345 kB`).
    init(status lines: [String]) {
        func bytes(_ field: String) -> UInt64 {
            for line in lines where line.hasPrefix(field + ":") {
                let words = line.dropFirst(field.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" })
                if let kilobytes = words.first.flatMap({ UInt64($0) }) { return kilobytes * 1024 }
            }
            return 0
        }
        self.init(residentBytes: bytes("VmRSS"), heapBytes: bytes("RssAnon"))
    }
}

/// The little JSON writing the health and error bodies need.
enum JSON {
    static func string(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20 || scalar.value == 0x7F:
                let hex = String(scalar.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }

    /// Bytes as megabytes (2^20) with one decimal: `45.2`.
    static func megabytes(_ bytes: UInt64) -> String {
        let tenths = megabyteTenths(bytes)
        return "\(tenths / 10).\(tenths % 10)"
    }

    /// Bytes as megabytes (2^20) rounded to one decimal, for Codable bodies (`used_mb`).
    static func megabytes(_ bytes: Int64) -> Double { Double(megabyteTenths(UInt64(max(0, bytes)))) / 10 }

    /// Tenths of a megabyte (2^20), rounded half up.
    private static func megabyteTenths(_ bytes: UInt64) -> UInt64 { (bytes * 10 + 524_288) / 1_048_576 }
}
