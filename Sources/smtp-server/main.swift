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
if let directorySpool = spool as? SpoolBlobStore {
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
    logger: logger)
var smtpServer: SMTPServer?
if configuration.role == .all || configuration.role == .ingress {
    let ingress = IngressService(
        configuration: configuration, accounts: accounts, queue: queue, spool: spool,
        newMail: configuration.role == .all ? doorbell : nil, quota: quota, limiter: redis.limiter,
        turnaround: ATRNTurnaround(delivery: delivery, hostname: configuration.hostname, logger: logger),
        events: storage.events, logger: logger)
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

// GET /health in every role (the only service of `admin` for now). After the Redis client and
// before the roles, so it answers until the roles have stopped.
let listener = smtpServer
let health = HealthEndpoint(
    checks: HealthChecks([
        HealthCheck("database") { try await storage.pingDatabase() },
        HealthCheck("spool") { try await storage.pingSpool() },
    ]),
    connections: { listener.map { ($0.activeConnections, $0.totalConnections) } ?? (0, 0) })
services.insert(
    AdminAPI.application(host: configuration.host, port: configuration.healthPort, health: health, logger: logger),
    at: redis.client == nil ? 0 : 1)

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
