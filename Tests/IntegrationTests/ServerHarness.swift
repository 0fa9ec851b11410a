// Black-box harness for the SMTP server: starts the real `smtp-server` executable as
// a child process in a fresh temporary directory, and drives it with real clients
// (Python scripts in Support/, swaks, user-cli). No project module is imported.

import Foundation
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

// MARK: - Errors

struct HarnessError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

// MARK: - Small concurrency helpers

/// A value behind a lock. `@unchecked Sendable` is sound: every access to `value`
/// goes through `lock`.
final class Locked<Value>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Value
    init(_ value: Value) { self.value = value }
    func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        lock.lock()
        defer { lock.unlock() }
        return try body(&value)
    }
}

/// Runs blocking work (sockets) off the cooperative thread pool: the test machine has
/// two cores, and a blocked cooperative thread would stall the parallel tests.
func onBackgroundThread<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
    await withCheckedContinuation { continuation in
        DispatchQueue.global().async { continuation.resume(returning: body()) }
    }
}

/// Limits how many servers run at once, so that parallel tests do not starve each
/// other on a small machine (the timing-sensitive tests stay reliable).
///
/// A soft limit: a test holding slots may wait for another (a cluster of nodes, a second
/// server as the MX), and two such tests could each hold what the other waits for. So a
/// waiter that has not been given a slot within `patience` starts over the limit instead of
/// waiting for ever.
actor ServerSlots {
    static let shared = ServerSlots(
        limit: Int(ProcessInfo.processInfo.environment["MAILTIER_IT_MAX_SERVERS"] ?? "") ?? 4)
    private let limit: Int
    private let patience: Duration
    private var inUse = 0
    private var waiters: [(id: Int, continuation: CheckedContinuation<Void, Never>)] = []
    private var nextWaiter = 0

    init(limit: Int, patience: Duration = .seconds(30)) {
        self.limit = max(1, limit)
        self.patience = patience
    }

    func acquire() async {
        if inUse < limit {
            inUse += 1
            return
        }
        let id = nextWaiter
        nextWaiter += 1
        await withCheckedContinuation { continuation in
            waiters.append((id, continuation))
            Task { [patience] in
                try? await Task.sleep(for: patience)
                await self.giveUpWaiting(id)
            }
        }
    }

    /// The waiter `id`, if still waiting, starts over the limit.
    private func giveUpWaiting(_ id: Int) {
        guard let index = waiters.firstIndex(where: { $0.id == id }) else { return }
        inUse += 1
        waiters.remove(at: index).continuation.resume()
    }

    func release() {
        inUse -= 1
        while inUse < limit, !waiters.isEmpty {
            inUse += 1
            waiters.removeFirst().continuation.resume()
        }
    }
}

/// Polls `condition` every `interval` until it is true or `timeout` passes.
func poll(
    timeout: Duration, interval: Duration = .milliseconds(50), _ condition: () async throws -> Bool
) async rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while true {
        if try await condition() { return true }
        if ContinuousClock.now >= deadline { return false }
        try? await Task.sleep(for: interval)
    }
}

// MARK: - Tools

enum Tools {
    private static let cache = Locked<[String: String]>([:])

    /// The absolute path of `name` on PATH; throws (the test fails, it does not skip)
    /// when the tool is missing.
    static func path(_ name: String) throws -> String {
        if let hit = cache.withLock({ $0[name] }) { return hit }
        let dirs = (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin")
            .split(separator: ":")
        for dir in dirs {
            let candidate = "\(dir)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) {
                cache.withLock { $0[name] = candidate }
                return candidate
            }
        }
        throw HarnessError("required tool '\(name)' is not installed (not found on PATH)")
    }

    /// python3's real interpreter (not a pyenv shim, which costs a shell per start).
    static func python() async throws -> String {
        if let hit = cache.withLock({ $0["python3-real"] }) { return hit }
        let shim = try path("python3")
        let result = try await runProcess(shim, ["-c", "import sys; print(sys.executable)"], timeout: .seconds(30))
        let real = result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        let resolved = result.status == 0 && FileManager.default.isExecutableFile(atPath: real) ? real : shim
        cache.withLock { $0["python3-real"] = resolved }
        return resolved
    }

    static let supportDirectory = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("Support")

    static func script(_ name: String) throws -> String {
        let path = supportDirectory.appendingPathComponent(name).path
        guard FileManager.default.fileExists(atPath: path) else {
            throw HarnessError("support script missing: \(path)")
        }
        return path
    }
}

// MARK: - Child processes

struct ProcessResult: Sendable {
    var status: Int32
    var signalled: Bool
    var stdout: String
    var stderr: String
    var timedOut: Bool
    var output: String { stdout + (stderr.isEmpty ? "" : "\n[stderr]\n" + stderr) }
}

/// A child process whose stdout and stderr go to files (no pipes: nothing can block).
final class ChildProcess {
    let process = Process()
    let stdoutURL: URL
    let stderrURL: URL
    private let scratch: URL?
    /// The parent's copies of the child's descriptors; closed once the child has exited
    /// (never `FileHandle.nullDevice`, which is shared).
    private var handles: [FileHandle] = []

    init(
        _ executable: String, _ arguments: [String], environment: [String: String]? = nil,
        stdin: Data? = nil, outputDirectory: URL? = nil, name: String = "proc"
    ) throws {
        let dir: URL
        if let outputDirectory {
            dir = outputDirectory
            scratch = nil
        } else {
            dir = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-proc-\(UUID().uuidString)")
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            scratch = dir
        }
        let unique = "\(name)-\(UUID().uuidString.prefix(8))"
        stdoutURL = dir.appendingPathComponent("\(unique).stdout")
        stderrURL = dir.appendingPathComponent("\(unique).stderr")
        _ = FileManager.default.createFile(atPath: stdoutURL.path, contents: nil)
        _ = FileManager.default.createFile(atPath: stderrURL.path, contents: nil)
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if let environment { process.environment = environment }
        let out = try FileHandle(forWritingTo: stdoutURL)
        let err = try FileHandle(forWritingTo: stderrURL)
        handles = [out, err]
        process.standardOutput = out
        process.standardError = err
        if let stdin {
            let inURL = dir.appendingPathComponent("\(unique).stdin")
            try stdin.write(to: inURL)
            let input = try FileHandle(forReadingFrom: inURL)
            handles.append(input)
            process.standardInput = input
        } else {
            process.standardInput = FileHandle.nullDevice
        }
        do {
            try process.run()
        } catch {
            closeHandles()
            throw error
        }
    }

    private func closeHandles() {
        for handle in handles { try? handle.close() }
        handles = []
    }

    var pid: Int32 { process.processIdentifier }
    var isRunning: Bool { process.isRunning }
    var stdout: String { (try? String(contentsOf: stdoutURL, encoding: .utf8)) ?? "" }
    var stderr: String { (try? String(contentsOf: stderrURL, encoding: .utf8)) ?? "" }

    func signal(_ signal: Int32) {
        if process.isRunning { _ = kill(process.processIdentifier, signal) }
    }

    /// Waits for the exit; on timeout kills the process (SIGKILL) and reports `timedOut`.
    func wait(timeout: Duration) async -> ProcessResult {
        let exited = await poll(timeout: timeout, interval: .milliseconds(20)) { !process.isRunning }
        if !exited {
            signal(SIGKILL)
            _ = await poll(timeout: .seconds(10), interval: .milliseconds(20)) { !process.isRunning }
        }
        if !process.isRunning { closeHandles() }
        let result = ProcessResult(
            status: process.isRunning ? -1 : process.terminationStatus,
            signalled: !process.isRunning && process.terminationReason == .uncaughtSignal,
            stdout: stdout, stderr: stderr, timedOut: !exited)
        if let scratch { try? FileManager.default.removeItem(at: scratch) }
        return result
    }
}

/// Runs a program to completion (default time limit 60 s).
func runProcess(
    _ executable: String, _ arguments: [String], environment: [String: String]? = nil,
    stdin: Data? = nil, timeout: Duration = .seconds(60)
) async throws -> ProcessResult {
    let child = try ChildProcess(executable, arguments, environment: environment, stdin: stdin)
    return await child.wait(timeout: timeout)
}

/// The inherited environment without any `SMTP_*` variable, plus Python settings.
func cleanEnvironment() -> [String: String] {
    var env = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("SMTP_") }
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env
}

// MARK: - Ports and sockets

enum Ports {
    private static let handedOut = Locked<Set<Int>>([])

    /// A free TCP port on 127.0.0.1 (bind port 0, read it, close), never the same one
    /// twice in this test process.
    static func free() throws -> Int {
        for _ in 0..<50 {
            let port = try bindZero()
            let fresh = handedOut.withLock { $0.insert(port).inserted }
            if fresh { return port }
        }
        throw HarnessError("could not find a free port")
    }

    private static func bindZero() throws -> Int {
        #if canImport(Glibc)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        #else
        let fd = socket(AF_INET, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { throw HarnessError("socket() failed: errno \(errno)") }
        defer { close(fd) }
        var addr = loopback(port: 0)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard bound == 0 else { throw HarnessError("bind() failed: errno \(errno)") }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let named = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard named == 0 else { throw HarnessError("getsockname() failed: errno \(errno)") }
        return Int(UInt16(bigEndian: addr.sin_port))
    }

    static func loopback(port: Int) -> sockaddr_in {
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        return addr
    }

    /// Connects, reads the first complete reply line; when it is a `220 ` greeting,
    /// sends QUIT and waits for the server to close, so that the probe no longer
    /// counts as an open connection. Returns the first reply line, or nil.
    ///
    /// The probe connects from 127.0.0.2 so that it does not count against the per-address
    /// limits of the tests, whose clients connect from 127.0.0.1.
    static func probeGreeting(port: Int) -> String? {
        #if canImport(Glibc)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        #else
        let fd = socket(AF_INET, SOCK_STREAM, 0)
        #endif
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var tv = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var source = loopback(port: 0)
        source.sin_addr.s_addr = inet_addr("127.0.0.2")
        let bound = withUnsafePointer(to: &source) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0 else { return nil }
        var addr = loopback(port: port)
        let connected = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard connected == 0 else { return nil }
        var buffer = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 4096)
        var firstLine: String?
        while firstLine == nil {
            let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            guard n > 0 else { return nil }
            buffer += chunk[0..<n]
            while let lf = buffer.firstIndex(of: 10) {
                var line = Array(buffer[..<lf])
                buffer.removeSubrange(...lf)
                if line.last == 13 { line.removeLast() }
                if line.count < 4 || line[3] != UInt8(ascii: "-") {
                    firstLine = String(decoding: line, as: UTF8.self)
                    break
                }
            }
        }
        if let firstLine, firstLine.hasPrefix("220 ") {
            let quit = Array("QUIT\r\n".utf8)
            _ = quit.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            while true {  // until EOF (or the 2 s receive timeout)
                let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
                if n <= 0 { break }
            }
        }
        return firstLine
    }
}

// MARK: - The server harness

/// One `smtp-server` child process with its own directory and ports.
final class ServerHarness {
    static let hostname = "mail.example.test"
    static let adminPassword = "Adm1n-Passw0rd!"

    let directory: URL
    let smtpPort: Int
    let healthPort: Int
    let metricsPort: Int
    private(set) var environment: [String: String]
    private var child: ChildProcess?
    private var runs: [ChildProcess] = []
    private var holdsSlot = false

    /// Creates the directory and picks the ports; does not start the server.
    /// `overrides` are added to (and replace) the default environment; `unset`
    /// removes default variables.
    init(overrides: [String: String] = [:], unset: Set<String> = []) throws {
        directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("mailtier-it-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        smtpPort = try Ports.free()
        healthPort = try Ports.free()
        metricsPort = try Ports.free()
        var env = cleanEnvironment()
        let defaults: [String: String] = [
            "SMTP_HOST": "127.0.0.1",
            "SMTP_PORT": "\(smtpPort)",
            "SMTP_HEALTH_PORT": "\(healthPort)",
            "SMTP_METRICS_PORT": "\(metricsPort)",
            "SMTP_HOSTNAME": Self.hostname,
            "SMTP_DB_PATH": directory.appendingPathComponent("smtp.db").path,
            "SMTP_STORAGE_PATH": directory.appendingPathComponent("mail").path,
            "SMTP_SPOOL_PATH": directory.appendingPathComponent("spool").path,
            "SMTP_LOCAL_DOMAINS": "example.test",
            "SMTP_ADMIN_PASSWORD": Self.adminPassword,
            "SMTP_QUEUE_POLL_SECONDS": "1",
            "SMTP_LOG_LEVEL": "info",
            // Every test connects from 127.0.0.1: the per-address limits are off unless a test sets them.
            "SMTP_RATE_CONNECTIONS_PER_MINUTE": "0",
            "SMTP_RATE_COMMANDS_PER_MINUTE": "0",
            "SMTP_RATE_AUTH_FAILURES_PER_HOUR": "0",
            "SMTP_RATE_MESSAGES_PER_HOUR": "0",
            // A test machine's disk may be nearly full; the disk check has tests of its own.
            "SMTP_HEALTH_MIN_FREE_DISK_PERCENT": "1",
        ]
        env.merge(defaults) { _, new in new }
        env.merge(overrides) { _, new in new }
        for key in unset { env.removeValue(forKey: key) }
        environment = env
    }

    var mailDirectory: URL { directory.appendingPathComponent("mail") }

    static func executable(_ name: String) throws -> String {
        let path = binaryPath(name)
        guard FileManager.default.isExecutableFile(atPath: path) else {
            throw HarnessError("executable '\(name)' not found at \(path) — build it first (swift build)")
        }
        return path
    }

    /// Starts the server and waits (up to `timeout`) for a `220 ` greeting on the SMTP port —
    /// or, with `readyLine`, for that text in its log (a role without an SMTP listener).
    func start(timeout: Duration = .seconds(30), readyLine: String? = nil) async throws {
        precondition(child == nil, "server already running")
        if !holdsSlot {
            await ServerSlots.shared.acquire()
            holdsSlot = true
        }
        let exe = try Self.executable("smtp-server")
        let run = try ChildProcess(
            exe, [], environment: environment, outputDirectory: directory, name: "server-\(runs.count + 1)")
        runs.append(run)
        child = run
        let port = smtpPort
        var lastAnswer: String?
        let ready = await poll(timeout: timeout, interval: .milliseconds(100)) {
            if !run.isRunning { return true }
            if let readyLine { return run.stdout.contains(readyLine) }
            lastAnswer = await onBackgroundThread { Ports.probeGreeting(port: port) }
            return lastAnswer?.hasPrefix("220 ") == true
        }
        if !run.isRunning {
            let status = run.process.terminationStatus
            let how = run.process.terminationReason == .uncaughtSignal ? "killed by signal" : "exit status"
            child = nil
            throw HarnessError("smtp-server exited during start-up (\(how) \(status)); log:\n\(log)")
        }
        if !ready {
            throw HarnessError(
                "smtp-server did not greet on port \(smtpPort) within \(timeout) (last answer: \(lastAnswer ?? "none")); log:\n\(log)"
            )
        }
    }

    /// SIGTERM, then waits (SIGKILL after `timeout`). Returns the exit status (nil if not running).
    @discardableResult
    func stop(timeout: Duration = .seconds(20)) async -> ProcessResult? {
        guard let child else { return nil }
        child.signal(SIGTERM)
        let result = await child.wait(timeout: timeout)
        self.child = nil
        return result
    }

    /// Sends a signal without waiting (e.g. SIGTERM for the graceful-shutdown test).
    func signal(_ sig: Int32) { child?.signal(sig) }

    /// Waits for the running server to exit on its own (after `signal`).
    func waitForExit(timeout: Duration) async -> ProcessResult? {
        guard let child else { return nil }
        let result = await child.wait(timeout: timeout)
        self.child = nil
        return result
    }

    /// SIGKILL, no grace.
    func kill9() async {
        guard let child else { return }
        child.signal(SIGKILL)
        _ = await child.wait(timeout: .seconds(10))
        self.child = nil
    }

    /// Starts again with the same directories, ports and environment.
    func restart() async throws {
        if child != nil { await stop() }
        try await start()
    }

    var isRunning: Bool { child?.isRunning ?? false }

    /// Everything every run of the server wrote to stdout and stderr, in run order.
    var log: String {
        runs.enumerated().map { index, run in
            "--- server run \(index + 1) stdout ---\n\(run.stdout)--- server run \(index + 1) stderr ---\n\(run.stderr)"
        }.joined(separator: "\n")
    }

    /// stdout + stderr of one run (1-based).
    func log(run index: Int) -> String {
        guard index >= 1, index <= runs.count else { return "" }
        return runs[index - 1].stdout + runs[index - 1].stderr
    }

    var runCount: Int { runs.count }

    /// The last lines of the log, for failure messages.
    func logTail(_ lines: Int = 60) -> String {
        log.split(separator: "\n", omittingEmptySubsequences: false).suffix(lines).joined(separator: "\n")
    }

    /// Stops the server (if running), releases its slot and removes the directory.
    func cleanup() async {
        await stop()
        if holdsSlot {
            holdsSlot = false
            await ServerSlots.shared.release()
        }
        try? FileManager.default.removeItem(at: directory)
    }

    // MARK: Accounts

    /// Environment for user-cli: the server's (same database and storage).
    var cliEnvironment: [String: String] { environment }

    func userCLI(_ arguments: [String]) async throws -> ProcessResult {
        try await runProcess(try Self.executable("user-cli"), arguments, environment: cliEnvironment)
    }

    /// `user-cli create <username> <email> <password>`; throws unless it exits 0.
    func createUser(_ username: String, _ email: String, _ password: String) async throws {
        let result = try await userCLI(["create", username, email, password])
        guard result.status == 0, !result.signalled else {
            throw HarnessError("user-cli create \(username) failed (status \(result.status)):\n\(result.output)")
        }
    }

    // MARK: Maildir

    /// Message files in `<storage>/<email>/new` and `/cur`, sorted by path.
    func maildirFiles(for email: String) -> [URL] {
        let base = mailDirectory.appendingPathComponent(email)
        var files: [URL] = []
        for sub in ["new", "cur"] {
            let dir = base.appendingPathComponent(sub)
            guard let names = try? FileManager.default.contentsOfDirectory(atPath: dir.path) else { continue }
            for name in names where !name.hasPrefix(".") {
                let url = dir.appendingPathComponent(name)
                var isDir: ObjCBool = false
                if FileManager.default.fileExists(atPath: url.path, isDirectory: &isDir), !isDir.boolValue {
                    files.append(url)
                }
            }
        }
        return files.sorted { $0.path < $1.path }
    }

    /// Polls every 50 ms until the mailbox holds at least `count` files.
    @discardableResult
    func waitForMaildirFiles(for email: String, count: Int, timeout: Duration = .seconds(20)) async throws -> [URL] {
        var files: [URL] = []
        let ok = await poll(timeout: timeout) {
            files = maildirFiles(for: email)
            return files.count >= count
        }
        guard ok else {
            throw HarnessError(
                "mailbox \(email) holds \(files.count) file(s), expected \(count) within \(timeout); log tail:\n\(logTail())")
        }
        return files
    }

    /// Polls until a file of the mailbox contains `needle` (e.g. the queue id in Received:).
    func waitForStoredMessage(for email: String, containing needle: String, timeout: Duration = .seconds(20))
        async throws -> (url: URL, bytes: [UInt8])
    {
        var found: (URL, [UInt8])?
        let needleBytes = Array(needle.utf8)
        _ = await poll(timeout: timeout) {
            for url in maildirFiles(for: email) {
                if let data = try? Data(contentsOf: url), data.range(of: Data(needleBytes)) != nil {
                    found = (url, Array(data))
                    return true
                }
            }
            return false
        }
        guard let found else {
            throw HarnessError(
                "no message containing \(needle) in mailbox \(email) within \(timeout); files: \(maildirFiles(for: email).map(\.lastPathComponent)); log tail:\n\(logTail())"
            )
        }
        return (found.0, found.1)
    }
}

/// Runs `body` with a started server; the server is always stopped and its directory
/// removed afterwards, also when `body` throws or an expectation failed.
func withServer<T>(
    _ overrides: [String: String] = [:], unset: Set<String> = [],
    prepare: (URL) async throws -> [String: String] = { _ in [:] },
    _ body: (ServerHarness) async throws -> T
) async throws -> T {
    let harness = try ServerHarness(overrides: overrides, unset: unset)
    do {
        harness.addEnvironment(try await prepare(harness.directory))
        try await harness.start()
        let result = try await body(harness)
        await harness.cleanup()
        return result
    } catch {
        if harness.runCount > 0 {
            Issue.record("server log tail:\n\(harness.logTail(80))")
        }
        await harness.cleanup()
        throw error
    }
}

extension ServerHarness {
    /// Adds variables before the first start (e.g. certificate paths made in `directory`).
    func addEnvironment(_ extra: [String: String]) {
        environment.merge(extra) { _, new in new }
    }
}

// MARK: - Raw-socket dialogues (Support/smtp_session.py)

/// What one reading step of `smtp_session.py` saw.
struct StepResult: Decodable, Sendable {
    var step: Int?
    var replies: [[String]]?
    var extra: [String]?
    var eof: Bool?
    var timeout: Bool?
    var error: String?
    var mark: String?

    var lines: [String] { (replies ?? []).flatMap { $0 } + (extra ?? []) }
}

/// A scripted raw-socket SMTP dialogue. Each `cmd`/`send(_:expect:)` records the exact
/// reply lines it expects; `run` plays the script and checks every expectation,
/// reporting a mismatch at the line of the test that stated it.
///
/// An expected line ending in `*` matches any line with that prefix (for queue ids).
struct SMTPScript {
    fileprivate enum Op {
        case send([UInt8])
        case expect(Int, Double)
        case eof(Double)
        case tls(String)
        case close
        case mark(String)
        case waitFile(String, Double)
    }

    fileprivate struct Step {
        var conn: String
        var op: Op
    }

    fileprivate struct Check {
        var step: Int
        var sent: String
        var expected: [String]
        var closed: Bool
        var location: SourceLocation
    }

    fileprivate var steps: [Step] = []
    fileprivate var checks: [Check] = []
    private var lastSent: [String: String] = [:]

    static let greetingLine = "220 \(ServerHarness.hostname) ESMTP MailTier"

    /// Number of replies in `lines` (a reply ends at a line whose 4th octet is not `-`).
    static func replyCount(_ lines: [String]) -> Int {
        lines.filter { line in
            let chars = Array(line.utf8)
            return chars.count < 4 || chars[3] != UInt8(ascii: "-")
        }.count
    }

    static func describe(_ bytes: [UInt8]) -> String {
        var text = String(decoding: bytes.prefix(300), as: UTF8.self)
        text = text.replacingOccurrences(of: "\r", with: "\\r").replacingOccurrences(of: "\n", with: "\\n")
        return bytes.count > 300 ? text + "…(\(bytes.count) octets)" : text
    }

    /// Expects the greeting on connection `conn` (opened on first use).
    mutating func greeting(conn: String = "0", sourceLocation: SourceLocation = #_sourceLocation) {
        expect([Self.greetingLine], conn: conn, sourceLocation: sourceLocation)
    }

    /// Sends exactly `bytes` in one write, expecting nothing yet.
    mutating func send(_ bytes: [UInt8], conn: String = "0") {
        steps.append(Step(conn: conn, op: .send(bytes)))
        lastSent[conn] = Self.describe(bytes)
    }

    mutating func send(_ text: String, conn: String = "0") { send(Array(text.utf8), conn: conn) }

    /// Sends exactly `bytes` in one write and expects these reply lines.
    @discardableResult
    mutating func send(
        _ bytes: [UInt8], expect expected: [String], conn: String = "0", timeout: Double = 10,
        sourceLocation: SourceLocation = #_sourceLocation
    ) -> Int {
        send(bytes, conn: conn)
        return expect(expected, conn: conn, timeout: timeout, sourceLocation: sourceLocation)
    }

    @discardableResult
    mutating func send(
        _ text: String, expect expected: [String], conn: String = "0", timeout: Double = 10,
        sourceLocation: SourceLocation = #_sourceLocation
    ) -> Int {
        send(Array(text.utf8), expect: expected, conn: conn, timeout: timeout, sourceLocation: sourceLocation)
    }

    /// Sends `line` + CRLF and expects these reply lines.
    @discardableResult
    mutating func cmd(
        _ line: String, _ expected: [String], conn: String = "0", timeout: Double = 10,
        sourceLocation: SourceLocation = #_sourceLocation
    ) -> Int {
        send(Array((line + "\r\n").utf8), expect: expected, conn: conn, timeout: timeout, sourceLocation: sourceLocation)
    }

    @discardableResult
    mutating func cmd(
        _ line: String, _ expected: String..., conn: String = "0", timeout: Double = 10,
        sourceLocation: SourceLocation = #_sourceLocation
    ) -> Int {
        cmd(line, expected, conn: conn, timeout: timeout, sourceLocation: sourceLocation)
    }

    /// Reads replies (as many as `expected` holds) and checks them.
    @discardableResult
    mutating func expect(
        _ expected: [String], conn: String = "0", timeout: Double = 10,
        sourceLocation: SourceLocation = #_sourceLocation
    ) -> Int {
        let index = steps.count
        steps.append(Step(conn: conn, op: .expect(Self.replyCount(expected), timeout)))
        checks.append(Check(step: index, sent: lastSent[conn] ?? "(nothing)", expected: expected, closed: false, location: sourceLocation))
        lastSent[conn] = nil
        return index
    }

    /// Reads until the server closes; checks that exactly `lines` arrived before EOF.
    @discardableResult
    mutating func expectClosed(
        after lines: [String] = [], conn: String = "0", timeout: Double = 10,
        sourceLocation: SourceLocation = #_sourceLocation
    ) -> Int {
        let index = steps.count
        steps.append(Step(conn: conn, op: .eof(timeout)))
        checks.append(Check(step: index, sent: lastSent[conn] ?? "(nothing)", expected: lines, closed: true, location: sourceLocation))
        lastSent[conn] = nil
        return index
    }

    /// Reads until EOF (or `timeout`) without checking; inspect the result yourself.
    @discardableResult
    mutating func readToEnd(conn: String = "0", timeout: Double = 10) -> Int {
        steps.append(Step(conn: conn, op: .eof(timeout)))
        return steps.count - 1
    }

    /// TLS handshake on `conn`, trusting `cafile`, server name `localhost`.
    @discardableResult
    mutating func startTLS(cafile: String, conn: String = "0", sourceLocation: SourceLocation = #_sourceLocation) -> Int {
        let index = steps.count
        steps.append(Step(conn: conn, op: .tls(cafile)))
        checks.append(Check(step: index, sent: "(TLS handshake)", expected: [], closed: false, location: sourceLocation))
        return index
    }

    mutating func close(conn: String = "0") { steps.append(Step(conn: conn, op: .close)) }
    mutating func mark(_ name: String) { steps.append(Step(conn: "0", op: .mark(name))) }
    mutating func waitForFile(_ path: String, timeout: Double = 30) {
        steps.append(Step(conn: "0", op: .waitFile(path, timeout)))
    }

    fileprivate func json() throws -> Data {
        let list: [[String: Any]] = steps.map { step in
            var item: [String: Any] = ["c": step.conn]
            switch step.op {
            case .send(let bytes): item["op"] = "send"; item["data"] = Data(bytes).base64EncodedString()
            case .expect(let n, let timeout): item["op"] = "expect"; item["n"] = n; item["timeout"] = timeout
            case .eof(let timeout): item["op"] = "eof"; item["timeout"] = timeout
            case .tls(let cafile): item["op"] = "tls"; item["cafile"] = cafile
            case .close: item["op"] = "close"
            case .mark(let name): item["op"] = "mark"; item["name"] = name
            case .waitFile(let path, let timeout): item["op"] = "wait_file"; item["path"] = path; item["timeout"] = timeout
            }
            return item
        }
        return try JSONSerialization.data(withJSONObject: list)
    }

    /// Starts the dialogue against `port` without waiting for it to finish.
    func start(port: Int) async throws -> RunningScript {
        let python = try await Tools.python()
        let script = try Tools.script("smtp_session.py")
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-script-\(UUID().uuidString).json")
        try json().write(to: file)
        let child = try ChildProcess(python, [script, "\(port)", file.path], environment: cleanEnvironment(), name: "session")
        return RunningScript(script: self, child: child, file: file)
    }

    /// Plays the dialogue against `harness` (or `port`) and checks every expectation.
    @discardableResult
    func run(_ harness: ServerHarness, timeout: Duration = .seconds(120)) async throws -> SMTPTranscript {
        let running = try await start(port: harness.smtpPort)
        return try await running.finish(timeout: timeout, harness: harness)
    }
}

final class RunningScript {
    fileprivate let script: SMTPScript
    let child: ChildProcess
    let file: URL

    fileprivate init(script: SMTPScript, child: ChildProcess, file: URL) {
        self.script = script
        self.child = child
        self.file = file
    }

    /// Waits until the script printed the mark `name`.
    func waitForMark(_ name: String, timeout: Duration = .seconds(30)) async throws {
        let needle = "{\"mark\": \"\(name)\"}"
        let seen = await poll(timeout: timeout) { child.stdout.contains(needle) || !child.isRunning }
        guard seen, child.stdout.contains(needle) else {
            throw HarnessError("dialogue never reached mark '\(name)'; output:\n\(child.stdout)\n\(child.stderr)")
        }
    }

    func finish(timeout: Duration = .seconds(120), harness: ServerHarness? = nil) async throws -> SMTPTranscript {
        let result = await child.wait(timeout: timeout)
        try? FileManager.default.removeItem(at: file)
        guard !result.timedOut, result.status == 0 else {
            throw HarnessError("smtp_session.py failed (status \(result.status), timed out: \(result.timedOut)):\n\(result.output)")
        }
        var results: [Int: StepResult] = [:]
        for line in result.stdout.split(separator: "\n") {
            guard let data = line.data(using: .utf8),
                let item = try? JSONDecoder().decode(StepResult.self, from: data)
            else { throw HarnessError("unparsable output line from smtp_session.py: \(line)") }
            if let step = item.step { results[step] = item }
        }
        let transcript = SMTPTranscript(results: results, output: result.stdout)
        transcript.verify(script, harness: harness)
        return transcript
    }
}

struct SMTPTranscript {
    var results: [Int: StepResult]
    var output: String

    func result(_ step: Int) -> StepResult? { results[step] }
    func lines(_ step: Int) -> [String] { results[step]?.lines ?? [] }

    /// Every queue id from `250 2.0.0 Ok: queued as <id>` replies, in order.
    var queueIDs: [String] {
        results.keys.sorted().flatMap { lines($0) }.compactMap(parseQueueID)
    }

    static func matches(_ actual: [String], _ expected: [String]) -> Bool {
        guard actual.count == expected.count else { return false }
        return zip(actual, expected).allSatisfy { actual, expected in
            expected.hasSuffix("*") ? actual.hasPrefix(String(expected.dropLast())) : actual == expected
        }
    }

    fileprivate func verify(_ script: SMTPScript, harness: ServerHarness?) {
        for check in script.checks {
            guard let result = results[check.step] else {
                Issue.record(
                    "no result for step \(check.step) (sent: \(check.sent)); the dialogue stopped early. Output:\n\(output)\n\(harness.map { "log tail:\n" + $0.logTail() } ?? "")",
                    sourceLocation: check.location)
                continue
            }
            var problems: [String] = []
            if let error = result.error, !check.closed { problems.append("connection error: \(error)") }
            if result.timeout == true { problems.append("timed out waiting") }
            if check.closed && result.eof != true { problems.append("connection was not closed by the server") }
            if !Self.matches(result.lines, check.expected) {
                problems.append("expected \(check.expected)\n  actual \(result.lines)")
            }
            if !problems.isEmpty {
                Issue.record(
                    "after sending \(check.sent):\n  \(problems.joined(separator: "\n  "))\n\(harness.map { "log tail:\n" + $0.logTail(30) } ?? "")",
                    sourceLocation: check.location)
            }
        }
    }
}

func parseQueueID(_ line: String) -> String? {
    guard let range = line.range(of: "Ok: queued as ") else { return nil }
    let id = line[range.upperBound...].trimmingCharacters(in: .whitespaces)
    return id.isEmpty ? nil : id
}

// MARK: - smtplib client (Support/smtp_client.py)

struct ClientReply: Decodable, Sendable {
    var step: String
    var code: Int
    var text: String
    /// The reply as it was on the wire (smtplib strips the code and joins lines with \n).
    var lines: [String] {
        let parts = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        return parts.enumerated().map { i, part in
            "\(code)\(i == parts.count - 1 ? " " : "-")\(part)"
        }
    }
    var line: String { lines.joined(separator: "\n") }
}

struct SMTPClientResult {
    var replies: [ClientReply]
    var process: ProcessResult
    func reply(_ step: String) -> ClientReply? { replies.first { $0.step == step } }
    func all(_ step: String) -> [ClientReply] { replies.filter { $0.step == step } }
    var queueID: String? { reply("data").flatMap { parseQueueID($0.line) } }
}

struct SMTPClientOptions {
    var ehlo = "client.test"
    var starttlsCA: String?
    var auth: (mechanism: String, user: String, password: String)?
    var smtputf8 = false
}

/// Sends one message with smtplib; `body` is the message as it should be stored.
func smtplibSend(
    _ harness: ServerHarness, from sender: String, to recipients: [String], body: [UInt8],
    options: SMTPClientOptions = SMTPClientOptions()
) async throws -> SMTPClientResult {
    let python = try await Tools.python()
    let script = try Tools.script("smtp_client.py")
    let bodyFile = harness.directory.appendingPathComponent("body-\(UUID().uuidString).eml")
    try Data(body).write(to: bodyFile)
    defer { try? FileManager.default.removeItem(at: bodyFile) }
    var args = [script, "--port", "\(harness.smtpPort)", "--ehlo", options.ehlo, "--from", sender, "--body-file", bodyFile.path]
    for rcpt in recipients { args += ["--to", rcpt] }
    if let ca = options.starttlsCA { args += ["--starttls", ca] }
    if let auth = options.auth { args += ["--auth", auth.mechanism, "--user", auth.user, "--password", auth.password] }
    if options.smtputf8 { args.append("--smtputf8") }
    let result = try await runProcess(python, args, environment: cleanEnvironment(), timeout: .seconds(60))
    var replies: [ClientReply] = []
    for line in result.stdout.split(separator: "\n") {
        if let data = line.data(using: .utf8), let reply = try? JSONDecoder().decode(ClientReply.self, from: data) {
            replies.append(reply)
        }
    }
    if result.timedOut || replies.contains(where: { $0.step == "error" }) {
        throw HarnessError("smtp_client.py failed:\n\(result.output)\nlog tail:\n\(harness.logTail())")
    }
    return SMTPClientResult(replies: replies, process: result)
}

// MARK: - Stored messages

/// Checks a maildir file: `Return-Path: <sender>\r\n`, then exactly one `Received:`
/// field (possibly folded) naming the HELO name, this host, the queue id and the
/// recipient, then the message exactly as sent (after dot-unstuffing).
func expectStoredMessage(
    _ stored: [UInt8], sender: String, helo: String, queueID: String, recipient: String, body: [UInt8],
    sourceLocation: SourceLocation = #_sourceLocation
) {
    let prefix = Array("Return-Path: <\(sender)>\r\n".utf8)
    guard stored.starts(with: prefix) else {
        Issue.record(
            "stored message does not start with \(SMTPScript.describe(prefix)):\n\(SMTPScript.describe(Array(stored.prefix(400))))",
            sourceLocation: sourceLocation)
        return
    }
    var rest = Array(stored[prefix.count...])
    let receivedName = Array("Received: ".utf8)
    guard rest.starts(with: receivedName) else {
        Issue.record("no Received: field after Return-Path:\n\(SMTPScript.describe(Array(stored.prefix(400))))", sourceLocation: sourceLocation)
        return
    }
    // The field ends at the first CRLF not followed by SP or HTAB.
    var end: Int?
    var i = 0
    while i + 1 < rest.count {
        if rest[i] == 13, rest[i + 1] == 10 {
            let next = i + 2 < rest.count ? rest[i + 2] : 0
            if next != 32 && next != 9 {
                end = i + 2
                break
            }
            i += 2
        } else {
            if rest[i] == 10 || rest[i] == 13 {
                Issue.record("bare CR or LF inside the Received: field: \(SMTPScript.describe(Array(rest.prefix(400))))", sourceLocation: sourceLocation)
                return
            }
            i += 1
        }
    }
    guard let end else {
        Issue.record("unterminated Received: field: \(SMTPScript.describe(rest))", sourceLocation: sourceLocation)
        return
    }
    let field = String(decoding: rest[..<end], as: UTF8.self)
    let unfolded = field.replacingOccurrences(of: "\r\n", with: "")
    for needle in ["from \(helo)", "by \(ServerHarness.hostname)", queueID, "for <\(recipient)>"] {
        #expect(unfolded.contains(needle), "Received: field lacks \"\(needle)\": \(unfolded)", sourceLocation: sourceLocation)
    }
    rest.removeFirst(end)
    if rest != body {
        Issue.record(
            "stored body differs from what was sent.\n  sent:   \(SMTPScript.describe(body))\n  stored: \(SMTPScript.describe(rest))",
            sourceLocation: sourceLocation)
    }
}

// MARK: - Certificates

/// A self-signed certificate for CN/SAN `localhost` made by openssl in `directory`;
/// returns the server environment that enables STARTTLS with it, and the CA file.
func makeTLSCertificate(in directory: URL) async throws -> (environment: [String: String], caFile: String) {
    let openssl = try Tools.path("openssl")
    let cert = directory.appendingPathComponent("cert.pem").path
    let key = directory.appendingPathComponent("key.pem").path
    let result = try await runProcess(openssl, [
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
        "-keyout", key, "-out", cert, "-subj", "/CN=localhost",
        "-addext", "subjectAltName=DNS:localhost",
    ])
    guard result.status == 0, FileManager.default.fileExists(atPath: cert) else {
        throw HarnessError("openssl req failed with status \(result.status):\n\(result.output)")
    }
    return (["SMTP_ENABLE_TLS": "true", "SMTP_TLS_CERT": cert, "SMTP_TLS_KEY": key], cert)
}

// MARK: - Common dialogue pieces

enum SMTP {
    static let hostname = ServerHarness.hostname

    /// The EHLO reply, in the documented order.
    static func ehlo(size: Int = 52_428_800, startTLS: Bool = false, auth: Bool = true, deliverBy: Int = 86_400) -> [String] {
        var lines = ["250-\(hostname)", "250-PIPELINING", "250-SIZE \(size)", "250-ETRN"]
        if startTLS { lines.append("250-STARTTLS") }
        if auth { lines.append("250-AUTH PLAIN LOGIN") }
        lines += ["250-ENHANCEDSTATUSCODES", "250-8BITMIME", "250-SMTPUTF8", "250-CHUNKING", "250-DELIVERBY \(deliverBy)", "250 ATRN"]
        return lines
    }

    static let ok = "250 2.0.0 Ok"
    static let senderOk = "250 2.1.0 Ok"
    static let recipientOk = "250 2.1.5 Ok"
    static let startData = "354 End data with <CR><LF>.<CR><LF>"
    static let queued = "250 2.0.0 Ok: queued as msg_*"
    static let bye = "221 2.0.0 Bye"
    static let authOK = "235 2.7.0 Authentication successful"
    static let authInvalid = "535 5.7.8 Authentication credentials invalid"

    static func base64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }
    static func plain(_ user: String, _ password: String, authzid: String = "") -> String {
        base64("\(authzid)\u{0}\(user)\u{0}\(password)")
    }
}
