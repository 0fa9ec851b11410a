// smtp-server: reads the configuration, builds the adapters, runs the roles in one ServiceGroup.
#if canImport(Glibc)
import Glibc
#endif
import AdminAPI
import Foundation
import Logging
import MailTier
import MailTierArgon2
import MailTierBootstrap
import MailTierDNS
import MailTierFiles
import MailTierOutbound
import MailTierPostgres
import MailTierRedis
import MailTierS3
import MailTierSQLite
import MailTierWebhooks
import Metrics
import NIOCore
import NIOPosix
import NIOSSL
import SMTPNIO
import SMTPProtocol
import ServiceLifecycle

func fail(_ message: String, code: Int32 = 2) -> Never {
    FileHandle.standardError.write(Data("smtp-server: \(message)\n".utf8))
    exit(code)
}

let arguments = CommandLine.arguments.dropFirst()
if arguments.contains("--help") || arguments.contains("-h") {
    print(Configuration.helpText)
    exit(0)
}
// `smtp-server migrate`: apply the pending migrations, print one line, exit.
let migrateOnly = arguments.count == 1 && arguments.first == "migrate"
// `smtp-server webhooks [retry-failed]`: the webhook outbox's counts and failed events.
let webhooksReport = arguments.first == "webhooks" && (arguments.count == 1 || Array(arguments) == ["webhooks", "retry-failed"])
if !migrateOnly, !webhooksReport, let unknown = arguments.first {
    fail("unknown argument \(unknown) (see smtp-server --help)")
}

let configuration: Configuration
do {
    configuration = try Configuration.load(from: ProcessInfo.processInfo.environment)
} catch {
    fail(error.description)
}

let logLevel = configuration.loggerLevel
LoggingSystem.bootstrap { label in
    var handler = StreamLogHandler.standardOutput(label: label)
    handler.logLevel = logLevel
    return handler
}
let logger = Logger(label: "mailtier")
// GET /metrics: every swift-metrics metric of this process, in Prometheus text format.
let metricsFactory = MailTierPrometheusFactory()
MetricsSystem.bootstrap(metricsFactory)

if migrateOnly {
    let threadPool = NIOThreadPool(numberOfThreads: 1)
    threadPool.start()
    do {
        print(try await Storage.migrate(configuration: configuration, threadPool: threadPool, logger: logger))
    } catch {
        fail(error.description, code: error.exitCode)
    }
    try? await threadPool.shutdownGracefully()
    exit(0)
}

if webhooksReport {
    let threadPool = NIOThreadPool(numberOfThreads: 1)
    threadPool.start()
    do {
        print(
            try await Storage.webhooks(retryFailed: arguments.count == 2, configuration: configuration, threadPool: threadPool, logger: logger),
            terminator: "")
    } catch {
        fail(error.description, code: error.exitCode)
    }
    try? await threadPool.shutdownGracefully()
    exit(0)
}

var tlsContext: NIOSSLContext?
if configuration.enableTLS, let certPath = configuration.tlsCert, let keyPath = configuration.tlsKey {
    do {
        let chain = try NIOSSLCertificate.fromPEMFile(certPath).map { NIOSSLCertificateSource.certificate($0) }
        guard !chain.isEmpty else { fail("SMTP_TLS_CERT: no certificate in \(certPath)") }
        let key = try NIOSSLPrivateKey(file: keyPath, format: .pem)
        tlsContext = try NIOSSLContext(configuration: .makeServerConfiguration(certificateChain: chain, privateKey: .privateKey(key)))
    } catch {
        fail("SMTP_TLS_CERT/SMTP_TLS_KEY: cannot load the certificate or key: \(error)")
    }
}

let threadPool = NIOThreadPool(numberOfThreads: 8)
threadPool.start()

// Users, queue and `messages` in PostgreSQL (SMTP_DATABASE_URL; no SQLite file then) or SQLite.
let storage: Storage
do {
    storage = try Storage(configuration: configuration, threadPool: threadPool, logger: logger)
} catch {
    fail(error.description, code: error.exitCode)
}
let spool = storage.spool
let mailboxes = storage.mailboxes
let accounts = AccountService(users: storage.users, hasher: Argon2idHasher(threadPool: threadPool))
let queue = storage.queue

/// The first administrator, when there is no user at all: before the services start (SQLite), or
/// once PostgreSQL is reachable and migrated.
let createFirstAdmin: @Sendable () async throws -> Void = {
    do {
        if let password = try await accounts.ensureAdmin(
            username: configuration.adminUsername, email: configuration.adminEmail, password: configuration.adminPassword)
        {
            FileHandle.standardOutput.write(Data("Created admin user '\(configuration.adminUsername)' with password: \(password)\n".utf8))
        }
    } catch let error as AccountError {
        fail("cannot create the first admin user \(configuration.adminUsername): \(error)", code: 1)
    }
}

// Temporary files of puts interrupted by a crash; their messages were never acknowledged.
if let directorySpool = storage.spoolDirectory {
    _ = try? await directorySpool.removeStaleTemporaryFiles(olderThan: .seconds(3600))
}
let quota = QuotaChecker(mailboxes: mailboxes)

// Rate limits and leases: shared through Redis (SMTP_REDIS_URL) or in this process.
let redis: (limiter: any RateLimiter, leases: any LeaseStore, client: RedisClient?)
do {
    redis = try RedisServices.make(configuration: configuration, logger: logger)
} catch {
    fail("SMTP_REDIS_URL: \(error)")
}

let doorbell = Doorbell()
// What this process counted since it started, for GET /stats.
let counters = ProcessCounters()
// The Redis client first: a ServiceGroup stops its services in reverse order.
var services: [any Service] = redis.client.map { [$0] } ?? []
// Delivery, made before ingress: ATRN delivers through it on the connection the client turns
// around. Remote recipients: MX hosts through libc-ares (SMTP_DNS_SERVERS) or SMTP_RELAY_HOST, then
// outbound SMTP. Added before delivery, so the group stops it (closing pooled connections) after.
let transport = SMTPRemoteTransport(
    settings: .init(configuration: configuration), resolver: CAresResolver(servers: configuration.dnsServers),
    logger: logger)
let delivery = DeliveryService(
    queue: queue, spool: spool, mailboxes: mailboxes,
    settings: .init(configuration: configuration, exclusive: configuration.role == .all && configuration.databaseURL == nil),
    doorbell: doorbell, quota: (accounts.users, quota), remote: transport,
    // Bounces (RFC 3464 DSNs) to the senders of recipients that failed for good.
    notifier: BounceService(
        configuration: configuration, accounts: accounts, queue: queue, spool: spool, newMail: doorbell, logger: logger),
    // Cluster mode: each claimed job's lease mirrored in Redis (`job:<message id>:<id>`).
    leases: redis.client == nil ? nil : redis.leases,
    // smtp_messages_sent_total where mail is delivered: the delivery role, and ingress through ATRN.
    metricsFactory: configuration.role == .admin ? NOOPMetricsHandler.instance : metricsFactory,
    counters: counters, logger: logger)
var smtpServer: SMTPServer?
if configuration.role == .all || configuration.role == .ingress {
    let ingress = IngressService(
        configuration: configuration, accounts: accounts, queue: queue, spool: spool,
        newMail: configuration.role == .all ? doorbell : nil, quota: quota, limiter: redis.limiter,
        turnaround: ATRNTurnaround(delivery: delivery, hostname: configuration.hostname, logger: logger),
        metrics: IngressMetrics(factory: metricsFactory, counters: counters), events: storage.events, logger: logger)
    let server = SMTPServer(
        configuration: .init(
            host: configuration.host, port: configuration.port, maxConnections: configuration.maxConnections,
            idleTimeout: .seconds(Int64(configuration.timeoutSeconds)),
            shutdownGrace: .seconds(Int64(configuration.shutdownGraceSeconds)),
            trustedProxies: configuration.trustedProxies,
            session: SMTPServerConfiguration(
                hostname: configuration.hostname, maxMessageSize: configuration.maxMessageSize,
                maxRecipients: configuration.maxRecipients, tlsAvailable: tlsContext != nil,
                authRequired: configuration.enableAuth, deliverByMinimum: configuration.deliverByMinSeconds,
                checksConnections: ingress.checksConnections, checksCommands: ingress.checksCommands)),
        delegate: ingress, tlsContext: tlsContext, logger: logger)
    smtpServer = server
    services.append(server)
}
if configuration.role == .all || configuration.role == .delivery {
    services.append(transport)
    services.append(delivery)
    // Webhooks: the roles that deliver also drain the events outbox (claims are leased, so every
    // delivery node may run a sender). Events are only written when SMTP_WEBHOOK_URL is set.
    if let url = configuration.webhookURL {
        var settings = WebhookSender.Settings(url: url, secret: configuration.webhookSecret)
        settings.retry = WebhookRetryPolicy(
            first: .seconds(configuration.webhookRetrySeconds), maxAttempts: configuration.webhookMaxAttempts)
        services.append(WebhookSender(outbox: storage.events, settings: settings, logger: logger))
    }
}

/// `disk` for the directory this process writes mail or its database to, when it has one.
func localDiskChecks(_ configuration: Configuration) -> [HealthCheck] {
    var path: String?
    if configuration.storageType != .s3 && configuration.storageType != .database {
        path = configuration.storagePath
    } else if configuration.databaseURL == nil {
        path = (configuration.dbPath as NSString).deletingLastPathComponent
    }
    guard var path, configuration.healthMinimumFreeDiskPercent > 0 else { return [] }
    if path.isEmpty { path = "." }
    // The directory may not exist yet (created at the first delivery): its nearest existing parent.
    while !FileManager.default.fileExists(atPath: path), path != "/" { path = (path as NSString).deletingLastPathComponent }
    return [HealthCheck.diskSpace(path, minimumFreePercent: Double(configuration.healthMinimumFreeDiskPercent))]
}

// GET /health in every role (the only service of `admin` for now). After the Redis client and
// before the roles, so it answers until the roles have stopped.
let listener = smtpServer
let health = HealthEndpoint(
    checks: HealthChecks(
        [
            HealthCheck("database") { try await storage.pingDatabase() },
            HealthCheck("spool") { try await storage.pingSpool() },
            // API.md's unhealthy conditions: disk under 10 % free, memory over 90 %, a spike of
            // refused connections.
            HealthCheck.memory(),
        ] + localDiskChecks(configuration)
            + (listener.map { server in
                [HealthCheck.refusedConnections { server.refusedForLimit + counters.snapshot.rejectedConnections }]
            } ?? [])),
    connections: { listener.map { ($0.activeConnections, $0.totalConnections) } ?? (0, 0) })
// The admin REST API (users, queue, stats) in the admin role and in `all`.
var adminServices: AdminServices?
if configuration.role == .all || configuration.role == .admin {
    let limits = configuration.rateLimits
    let storedMail = StoredMailFigures(accounts: accounts, mailboxes: mailboxes)
    adminServices = AdminServices(
        accounts: accounts, mailboxes: mailboxes, queue: queue, spool: spool,
        authenticator: APIAuthenticator(
            accounts: accounts, limiter: redis.limiter, settings: .init(failureRule: limits.rule(for: .apiAuthFailure)),
            failedLogins: configuration.recordedEvents.contains(.authFailed) ? storage.events : nil),
        requestRule: limits.rule(for: .apiRequest), newMail: configuration.role == .all ? doorbell : nil,
        statistics: {
            var counted = counters.snapshot
            counted.rejectedConnections += listener?.refusedForLimit ?? 0
            return try await AdminStatistics.collect(
                queue: queue, storage: storedMail,
                connections: listener.map { ($0.activeConnections, $0.totalConnections) } ?? (0, 0), counters: counted)
        })
}
services.insert(
    AdminAPI.application(
        host: configuration.host, port: configuration.healthPort, health: health, services: adminServices, logger: logger),
    at: redis.client == nil ? 0 : 1)

// GET /metrics in every role, on SMTP_METRICS_HOST (loopback by default). Each role exposes what
// it measures (MailTierMetrics): ingress its listener's connections, delivery and admin the queue,
// every role its memory. Gauges are read just before each scrape.
let connectionMetrics = listener.map { _ in ConnectionMetrics(factory: metricsFactory) }
let queueMetrics = configuration.role == .ingress ? nil : QueueMetrics(queue: queue, factory: metricsFactory)
let metrics = MetricsEndpoint(factory: metricsFactory, refresh: {
    if let listener, let connectionMetrics {
        connectionMetrics.update(active: listener.activeConnections, total: listener.totalConnections)
    }
    do {
        try await queueMetrics?.update()
    } catch {
        logger.warning("smtp_messages_queued: cannot read the queue", metadata: ["error": "\(error)"])
    }
})
services.insert(
    metrics.application(host: configuration.metricsHost, port: configuration.metricsPort, logger: logger),
    at: redis.client == nil ? 1 : 2)

let group = ServiceGroup(
    configuration: .init(
        services: services.map { ServiceGroupConfiguration.ServiceConfiguration(service: $0) },
        gracefulShutdownSignals: [.sigterm, .sigint],
        logger: logger))
var exitCode: Int32 = 0
do {
    try await storage.withRunning(migration: .inBackground(whenReady: createFirstAdmin)) { try await group.run() }
} catch {
    logger.error("stopped with an error", metadata: ["error": "\(error)"])
    exitCode = 1
}
try? await threadPool.shutdownGracefully()
logger.info("stopped")
exit(exitCode)
