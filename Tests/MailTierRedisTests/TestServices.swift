#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import MailTier
import MailTierRedis
import NIOCore
import NIOPosix
import Testing

/// The one place that decides whether a test needing Redis runs, is skipped, or fails.
///
/// - `MAILTIER_TEST_REDIS_URL` set (by `scripts/test-services.sh start`, in `.test-services/env`): the test runs.
/// - Missing, and `MAILTIER_REQUIRE_SERVICES=1` (as `make test` sets): the test runs and fails
///   with an issue naming what is missing.
/// - Missing otherwise: the test is skipped.
///
/// Tests that start their own `redis-server` (`PrivateRedisServer`) need only the binary and
/// always run.
enum TestServices {
    static let redisVariable = "MAILTIER_TEST_REDIS_URL"

    static var servicesRequired: Bool { ProcessInfo.processInfo.environment["MAILTIER_REQUIRE_SERVICES"] == "1" }

    static var redisURL: String? {
        ProcessInfo.processInfo.environment[redisVariable].flatMap { $0.isEmpty ? nil : $0 }
    }

    /// For `.enabled(if:)`: false only when the test should be skipped.
    static var shouldRunRedisTests: Bool { redisURL != nil || servicesRequired }

    /// The shared test server's endpoint; nil (after recording a failing issue) when it is
    /// missing although required.
    static func requireRedis(sourceLocation: SourceLocation = #_sourceLocation) -> RedisEndpoint? {
        if let redisURL {
            do {
                return try RedisEndpoint(url: redisURL)
            } catch {
                Issue.record("\(redisVariable) is not a redis:// URL", sourceLocation: sourceLocation)
                return nil
            }
        }
        if servicesRequired {
            Issue.record(
                "MAILTIER_REQUIRE_SERVICES=1 but \(redisVariable) not set: start the services with scripts/test-services.sh start and load .test-services/env",
                sourceLocation: sourceLocation)
        }
        return nil
    }
}

/// A namespace no other test or run uses.
func uniqueNamespace(_ test: String = #function) -> String {
    "mailtier-test:\(UUID().uuidString.prefix(8)):\(test.prefix { $0 != "(" })"
}

func testLogger(_ label: String = "redis-test") -> Logger {
    var logger = Logger(label: label)
    logger.logLevel = .warning
    return logger
}

/// A client for `endpoint` with short timeouts, shut down by the caller.
func makeClient(
    _ endpoint: RedisEndpoint, commandTimeout: TimeAmount = .seconds(2), backoff: TimeAmount = .milliseconds(50), logger: Logger? = nil
) -> RedisClient {
    RedisClient(
        configuration: .init(
            // Generous connect timeout: the full test run keeps both cores busy.
            endpoint: endpoint, connectTimeout: .seconds(5), commandTimeout: commandTimeout,
            minimumBackoff: backoff, maximumBackoff: backoff * 4),
        logger: logger ?? testLogger())
}

/// A TCP port nothing listens on (it was free a moment ago).
func freePort() async throws -> Int {
    let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .bind(host: "127.0.0.1", port: 0).get()
    let port = channel.localAddress!.port!
    try await channel.close()
    return port
}

/// A `redis-server` of the test's own, on 127.0.0.1, with its state in a temporary
/// directory: it can be killed and started again on the same port.
final class PrivateRedisServer: @unchecked Sendable {
    // @unchecked: `process` is only touched by the test that owns the server, one call at a time.
    let port: Int
    let password: String?
    let directory: URL
    private var process: Process?

    init(port: Int, password: String? = nil) throws {
        self.port = port
        self.password = password
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-redis-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
    }

    static func start(password: String? = nil) async throws -> PrivateRedisServer {
        let server = try PrivateRedisServer(port: try await freePort(), password: password)
        try await server.start()
        return server
    }

    var url: String {
        if let password { return "redis://:\(password)@127.0.0.1:\(port)" }
        return "redis://127.0.0.1:\(port)"
    }

    var endpoint: RedisEndpoint { try! RedisEndpoint(url: url) }

    func start() async throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/redis-server")
        var arguments = [
            "--bind", "127.0.0.1", "--port", String(port), "--dir", directory.path, "--daemonize", "no",
            "--save", "", "--appendonly", "no", "--logfile", directory.appendingPathComponent("redis.log").path,
        ]
        if let password { arguments += ["--requirepass", password] }
        process.arguments = arguments
        try process.run()
        self.process = process
        // Up when it accepts a connection.
        let deadline = ContinuousClock.now + .seconds(10)
        while ContinuousClock.now < deadline {
            if let channel = try? await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
                .connect(host: "127.0.0.1", port: port).get()
            {
                try? await channel.close()
                return
            }
            guard process.isRunning else { break }
            try await Task.sleep(for: .milliseconds(50))
        }
        throw ServerDidNotStart(log: (try? String(contentsOf: directory.appendingPathComponent("redis.log"), encoding: .utf8)) ?? "")
    }

    struct ServerDidNotStart: Error { var log: String }

    /// SIGKILL: no goodbye to the clients, as in a crash.
    func kill() {
        guard let process, process.isRunning else { return }
        Glibc.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        self.process = nil
    }

    func stop() {
        kill()
        try? FileManager.default.removeItem(at: directory)
    }

    deinit { stop() }
}
