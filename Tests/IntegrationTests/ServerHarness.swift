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
actor ServerSlots {
    static let shared = ServerSlots(
        limit: Int(ProcessInfo.processInfo.environment["MAILTIER_IT_MAX_SERVERS"] ?? "") ?? 4)
    private var available: Int
    private var waiters: [CheckedContinuation<Void, Never>] = []
    init(limit: Int) { available = max(1, limit) }
    func acquire() async {
        if available > 0 {
            available -= 1
            return
        }
        await withCheckedContinuation { waiters.append($0) }
    }
    func release() {
        if waiters.isEmpty {
            available += 1
        } else {
            waiters.removeFirst().resume()
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
        FileManager.default.createFile(atPath: stdoutURL.path, contents: nil)
        FileManager.default.createFile(atPath: stderrURL.path, contents: nil)
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if let environment { process.environment = environment }
        process.standardOutput = try FileHandle(forWritingTo: stdoutURL)
        process.standardError = try FileHandle(forWritingTo: stderrURL)
        if let stdin {
            let inURL = dir.appendingPathComponent("\(unique).stdin")
            try stdin.write(to: inURL)
            process.standardInput = try FileHandle(forReadingFrom: inURL)
        } else {
            process.standardInput = FileHandle.nullDevice
        }
        try process.run()
        // The parent's copies of the descriptors are not needed once the child has them.
        try? (process.standardOutput as? FileHandle)?.close()
        try? (process.standardError as? FileHandle)?.close()
        try? (process.standardInput as? FileHandle)?.close()
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

    /// Starts the server and waits (up to `timeout`) for a `220 ` greeting on the SMTP port.
    func start(timeout: Duration = .seconds(30)) async throws {
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
            lastAnswer = await onBackgroundThread { Ports.probeGreeting(port: port) }
            return lastAnswer?.hasPrefix("220 ") == true
        }
        if !run.isRunning {
            let status = run.process.terminationStatus
            child = nil
            throw HarnessError("smtp-server exited during start-up (status \(status)); log:\n\(log)")
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
    prepare: (URL) throws -> [String: String] = { _ in [:] },
    _ body: (ServerHarness) async throws -> T
) async throws -> T {
    let harness = try ServerHarness(overrides: overrides, unset: unset)
    do {
        harness.addEnvironment(try prepare(harness.directory))
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
