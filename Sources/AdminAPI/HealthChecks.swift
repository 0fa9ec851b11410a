#if canImport(Glibc)
import Glibc
#endif
import MailTier
import NIOConcurrencyHelpers
import Foundation

/// One dependency `GET /health` asks about: `run` answers when it is fine, throws when not.
public struct HealthCheck: Sendable {
    public var name: String
    public var run: @Sendable () async throws -> Void

    public init(_ name: String, _ run: @escaping @Sendable () async throws -> Void) {
        self.name = name
        self.run = run
    }
}

/// What one check said: nil for fine, otherwise the problem in one line.
public struct HealthCheckResult: Sendable, Equatable {
    public var name: String
    public var problem: String?
    public var isOK: Bool { problem == nil }

    public init(name: String, problem: String?) {
        self.name = name
        self.problem = problem
    }
}

/// Runs the checks, each bounded by `timeout`, and keeps the results for `cacheDuration`, so a
/// storm of probes costs the database one trivial query per period. Callers that arrive while a
/// round is running wait for that round instead of starting another.
public actor HealthChecks {
    public let checks: [HealthCheck]
    public let timeout: Duration
    public let cacheDuration: Duration
    private var cached: (at: ContinuousClock.Instant, results: [HealthCheckResult])?
    private var running: Task<[HealthCheckResult], Never>?

    public init(_ checks: [HealthCheck], timeout: Duration = .seconds(2), cacheDuration: Duration = .seconds(2)) {
        self.checks = checks
        self.timeout = timeout
        self.cacheDuration = cacheDuration
    }

    /// The results of the latest round, in the order of `checks`; a new round when they are older
    /// than `cacheDuration`.
    public func results() async -> [HealthCheckResult] {
        if let cached, ContinuousClock.now - cached.at < cacheDuration { return cached.results }
        if let running { return await running.value }
        let (checks, timeout) = (self.checks, self.timeout)
        // Unstructured on purpose: a probe that hangs up must not cancel the round others wait for.
        let round = Task {
            await withTaskGroup(of: (Int, HealthCheckResult).self) { group in
                for (index, check) in checks.enumerated() {
                    group.addTask { (index, await Self.outcome(of: check, within: timeout)) }
                }
                var results = [HealthCheckResult?](repeating: nil, count: checks.count)
                for await (index, result) in group { results[index] = result }
                return results.compactMap { $0 }
            }
        }
        running = round
        let results = await round.value
        cached = (ContinuousClock.now, results)
        running = nil
        return results
    }

    /// Runs `check` and answers within `timeout` even when the check does not react to
    /// cancellation (a blocking SQLite call, a pool that queues the request): the check and a
    /// timer race, the first to report wins, and the other is cancelled and left to finish.
    static func outcome(of check: HealthCheck, within timeout: Duration) async -> HealthCheckResult {
        let (reports, report) = AsyncStream.makeStream(of: HealthCheckResult.self)
        let work = Task {
            do {
                try await check.run()
                report.yield(HealthCheckResult(name: check.name, problem: nil))
            } catch {
                report.yield(HealthCheckResult(name: check.name, problem: Self.oneLine("\(error)")))
            }
        }
        let timer = Task {
            guard (try? await Task.sleep(for: timeout)) != nil else { return }
            report.yield(HealthCheckResult(name: check.name, problem: "no answer within \(Self.seconds(timeout))"))
        }
        var first = reports.makeAsyncIterator()
        let result = await first.next() ?? HealthCheckResult(name: check.name, problem: "cancelled")
        report.finish()
        work.cancel()
        timer.cancel()
        return result
    }

    static func oneLine(_ text: String) -> String {
        let line = text.split(whereSeparator: \.isNewline).joined(separator: " ")
        return line.isEmpty ? "failed" : String(line.prefix(300))
    }

    static func seconds(_ duration: Duration) -> String {
        let (seconds, attoseconds) = duration.components
        return attoseconds == 0 ? "\(seconds) s" : "\(Double(seconds) + Double(attoseconds) / 1e18) s"
    }
}

// MARK: - Local resources (API.md "Unhealthy Conditions")

extension HealthCheck {
    /// Fails when the file system holding `path` has less than `minimumFreePercent` free (as
    /// an unprivileged process sees it: `f_bavail`).
    public static func diskSpace(_ path: String, minimumFreePercent: Double = 10) -> HealthCheck {
        HealthCheck("disk") {
            var stats = statvfs()
            guard statvfs(path, &stats) == 0 else {
                throw HealthProblem("cannot read the file system of \(path): \(String(cString: strerror(errno)))")
            }
            guard stats.f_blocks > 0 else { return }
            let free = Double(stats.f_bavail) / Double(stats.f_blocks) * 100
            if free < minimumFreePercent {
                throw HealthProblem(
                    "\(String(format: "%.1f", free))% free on the file system of \(path) (under \(Int(minimumFreePercent))%)")
            }
        }
    }

    /// Fails when this process's resident memory is above `maximumPercent` of what it may use: the
    /// cgroup's `memory.max` (a container limit), else the machine's memory.
    public static func memory(maximumPercent: Double = 90, usage: @escaping @Sendable () -> MemoryUsage = MemoryUsage.current)
        -> HealthCheck
    {
        HealthCheck("memory") {
            guard let limit = MemoryUsage.limitBytes(), limit > 0 else { return }
            let used = Double(usage().residentBytes) / Double(limit) * 100
            if used > maximumPercent {
                throw HealthProblem(
                    "\(String(format: "%.1f", used))% of the memory limit in use (over \(Int(maximumPercent))%)")
            }
        }
    }

    /// Fails while more than `limit` connections were refused (over the connection limit or a
    /// rate limit) within the last `window`. `refused` is the count since the start.
    public static func refusedConnections(
        limit: Int = 100, window: Duration = .seconds(60), refused: @escaping @Sendable () -> Int
    ) -> HealthCheck {
        let samples = SpikeWindow(window: window)
        return HealthCheck("connections") {
            let recent = samples.increase(now: ContinuousClock.now, total: refused())
            if recent > limit {
                throw HealthProblem("\(recent) connections refused in the last \(HealthChecks.seconds(window)) (over \(limit))")
            }
        }
    }
}

/// A health problem, as the check's one line.
struct HealthProblem: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// How much a growing total rose within the last `window`, from samples taken when asked.
final class SpikeWindow: Sendable {
    private let window: Duration
    private let samples = NIOLockedValueBox<[(at: ContinuousClock.Instant, total: Int)]>([])

    init(window: Duration) { self.window = window }

    func increase(now: ContinuousClock.Instant, total: Int) -> Int {
        samples.withLockedValue { samples in
            samples.append((now, total))
            // Keep one sample at or before the window's start, as the baseline.
            while samples.count > 1, now - samples[1].at >= window { samples.removeFirst() }
            return total - samples[0].total
        }
    }
}

extension MemoryUsage {
    /// The cgroup v2 `memory.max` of this process, or v1's `memory.limit_in_bytes`, when set;
    /// otherwise `MemTotal` of /proc/meminfo. nil when none can be read.
    static func limitBytes() -> UInt64? {
        func read(_ path: String) -> String? {
            guard let file = fopen(path, "r") else { return nil }
            defer { fclose(file) }
            var buffer = [CChar](repeating: 0, count: 4096)
            let count = fread(&buffer, 1, buffer.count - 1, file)
            return String(decoding: buffer.prefix(count).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        let machine = read("/proc/meminfo")?.split(separator: "\n").first { $0.hasPrefix("MemTotal:") }
            .flatMap { $0.split(separator: " ").dropFirst().first.flatMap { UInt64($0) } }.map { $0 * 1024 }
        for path in ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"] {
            if let text = read(path)?.trimmingCharacters(in: .whitespacesAndNewlines), let value = UInt64(text),
                value < (machine ?? .max)
            {
                return value
            }
        }
        return machine
    }
}
