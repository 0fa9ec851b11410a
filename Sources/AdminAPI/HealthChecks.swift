import MailTier

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
