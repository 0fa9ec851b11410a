#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Logging
import SMTPNIO
import SMTPProtocol

/// A bad configuration value. `description` is one line naming the variable, e.g.
/// `SMTP_PORT: expected an integer from 1 to 65535, got "abc"`; the value of a variable whose
/// name contains PASSWORD, SECRET or KEY is never shown (`<hidden>`).
public struct ConfigurationError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The environment variable at fault.
    public var variable: String
    /// What is wrong, without the variable name.
    public var message: String

    public init(variable: String, message: String) {
        self.variable = variable
        self.message = message
    }

    public var description: String { "\(self.variable): \(self.message)" }
}

/// The server's configuration, read from the environment (API.md, "Configuration API").
/// Every value is validated by `load(from:)`; a bad one is a `ConfigurationError`.
public struct Configuration: Sendable, Equatable {
    public enum StorageType: String, Sendable, CaseIterable {
        case maildir, mbox, database, s3, timeseries
    }

    public enum LogLevel: String, Sendable, CaseIterable {
        case debug, info, warn, error

        /// swift-log's level (`warn` is `.warning`).
        public var loggerLevel: Logger.Level {
            switch self {
            case .debug: .debug
            case .info: .info
            case .warn: .warning
            case .error: .error
            }
        }
    }

    /// What this process runs (DESIGN.md, "Roles"). `all` is embedded mode.
    public enum Role: String, Sendable, CaseIterable {
        case ingress, delivery, admin, all
    }

    /// `SMTP_REDIS_FAILURE`: `open` falls back to per-node limits while Redis is unreachable,
    /// `closed` refuses what the limits guard (connections, messages, AUTH) until it is back.
    public enum RedisFailurePolicy: String, Sendable, CaseIterable {
        case open, closed
    }

    // API.md's table.
    public var port: Int = 2525
    public var host: String = "0.0.0.0"
    public var maxConnections: Int = 100
    public var maxMessageSize: Int = 52_428_800
    public var timeoutSeconds: Int = 300
    public var hostname: String = "localhost"
    public var dbPath: String = "smtp.db"
    public var storageType: StorageType = .maildir
    public var storagePath: String = "/var/mail"
    public var enableTLS: Bool = false
    public var tlsCert: String? = nil
    public var tlsKey: String? = nil
    public var enableAuth: Bool = true
    public var healthPort: Int = 8080
    public var metricsPort: Int = 8081
    /// `SMTP_METRICS_HOST` (MailTier's addition): `GET /metrics` needs no authentication, so it
    /// listens on the loopback interface unless told otherwise.
    public var metricsHost: String = "127.0.0.1"
    public var logLevel: LogLevel = .info
    public var enableSpamAssassin: Bool = false
    public var spamAssassinHost: String = "127.0.0.1"
    public var spamAssassinPort: Int = 783
    public var enableClamAV: Bool = false
    public var clamAVHost: String = "127.0.0.1"
    public var clamAVPort: Int = 3310

    // MailTier's additions.
    /// Lowercased, without duplicates.
    public var localDomains: [String] = []
    public var spoolPath: String = "spool"
    /// Embedded mode: accepted messages up to this many KiB are spooled in the SQLite database
    /// instead of a file each (`SMTP_SPOOL_SMALL_MESSAGE_KB`, 0 = every message in a file).
    public var spoolSmallMessageKB: Int = 64
    public var adminUsername: String = "admin"
    public var adminPassword: String? = nil
    /// Defaults to `<adminUsername>@<hostname>`.
    public var adminEmail: String = "admin@localhost"
    public var maxRecipients: Int = 100
    /// Advertised as `DELIVERBY <n>` in EHLO.
    public var deliverByMinSeconds: Int = 86400
    public var role: Role = .all
    /// How long open transactions may finish after SIGTERM.
    public var shutdownGraceSeconds: Int = 30
    public var queuePollSeconds: Int = 5
    public var maxAttempts: Int = 5

    /// The defaults of every variable.
    // Storage backends (issue 3).
    /// `postgres://user:password@host:port/database`: PostgreSQL for users, the queue, events and
    /// the database mailbox store (cluster mode; no SQLite file is used); SQLite at `dbPath` when unset.
    public var databaseURL: String? = nil
    /// `http(s)://host[:port]` of an S3-compatible server (path-style addressing); AWS when unset.
    public var s3Endpoint: String? = nil
    public var s3Bucket: String? = nil
    public var s3Region: String = "us-east-1"
    public var s3AccessKey: String? = nil
    public var s3SecretKey: String? = nil
    /// Base64 of 32 bytes: AES-256-GCM key for the timeseries store.
    public var encryptionKey: String? = nil

    // Cluster mode (issue 4).
    /// `redis://[:password@]host[:port][/db]`: per-IP limits shared by every node, and leases.
    public var redisURL: String? = nil
    /// What the limits do while Redis cannot be reached.
    public var redisFailure: RedisFailurePolicy = .open
    /// Per client address (API.md "Rate Limiting"); 0 turns a limit off.
    public var rateConnectionsPerMinute: Int = 10
    public var rateCommandsPerMinute: Int = 100
    public var rateAuthFailuresPerHour: Int = 5
    public var rateMessagesPerHour: Int = 20
    /// Addresses allowed to send a PROXY v1/v2 header (load balancers).
    public var trustedProxies: [CIDR] = []

    // Remote delivery (issue 5).
    /// DNS servers for MX lookups, in order; the system resolver (/etc/resolv.conf) when empty.
    public var dnsServers: [DNSServer] = []
    /// A smarthost that takes every remote message (`host` or `host:port`, port `outboundPort` when
    /// not given); MX lookup when nil.
    public var relayHost: RelayHost? = nil
    /// The port outbound SMTP connects to at a remote MX (25; tests point it at a local peer).
    public var outboundPort: Int = 25
    /// Refuse to deliver over a connection without STARTTLS (a temporary failure, retried).
    public var outboundRequireTLS: Bool = false
    /// Connections at once to one destination (an MX host or the relay).
    public var outboundConcurrency: Int = 10
    /// Delay before retry n (seconds); the last one repeats.
    public var retrySchedule: [Int] = [60, 300, 1800, 7200, 28800]
    /// A recipient still undelivered this long after acceptance fails for good (a bounce).
    public var maxQueueAgeSeconds: Int = 432_000
    /// How long a worker's claim on a job lasts before another worker may take it (renewed
    /// while a delivery runs).
    public var leaseSeconds: Int = 300

    // Webhooks (issue 6).
    /// Where events are posted; none are written or posted when unset.
    public var webhookURL: String? = nil
    /// The event types written and posted (default: all seven).
    public var webhookEvents: Set<WebhookEvent> = WebhookEvent.all
    /// HMAC-SHA256 key of the `X-MailTier-Signature` header; no signature header when unset.
    public var webhookSecret: String? = nil
    /// Delay before the first retry of a failed post; it doubles each time, up to an hour.
    public var webhookRetrySeconds: Int = 10
    /// Posts of one event before it fails for good.
    public var webhookMaxAttempts: Int = 10
    /// `/health` is unhealthy when the storage's file system has less free space than this (API.md: 10 %).
    public var healthMinimumFreeDiskPercent: Int = 10

    public init() {}

    /// The event types the producers write into the outbox: `webhookEvents` when a webhook URL
    /// is set, none otherwise.
    public var recordedEvents: Set<WebhookEvent> { webhookURL == nil ? [] : webhookEvents }

    /// The per-address limits as the rate limiter takes them.
    public var rateLimits: RateLimits {
        RateLimits(
            connectionsPerMinute: rateConnectionsPerMinute, commandsPerMinute: rateCommandsPerMinute,
            authFailuresPerHour: rateAuthFailuresPerHour, messagesPerHour: rateMessagesPerHour)
    }

    /// swift-log's level for `logLevel`.
    public var loggerLevel: Logger.Level { self.logLevel.loggerLevel }

    /// Case-insensitive match of `domain` against `localDomains` (a trailing dot is ignored).
    public func isLocalDomain(_ domain: String) -> Bool {
        var name = domain.lowercased()
        if name.hasSuffix(".") { name.removeLast() }
        return self.localDomains.contains(name)
    }
}

// MARK: - Variables

extension Configuration {
    /// One documented environment variable, for `--help` and for tests.
    public struct Variable: Sendable, Equatable {
        public var name: String
        /// As shown in the help text (`-` when unset by default).
        public var defaultValue: String
        public var summary: String
    }

    /// Every variable `load(from:)` reads, in the order of the help text.
    public static let variables: [Variable] = [
        Variable(name: "SMTP_PORT", defaultValue: "2525", summary: "SMTP server port (1-65535)"),
        Variable(name: "SMTP_HOST", defaultValue: "0.0.0.0", summary: "Bind address (IP address or host name)"),
        Variable(name: "SMTP_MAX_CONNECTIONS", defaultValue: "100", summary: "Max concurrent connections (1-100000)"),
        Variable(
            name: "SMTP_MAX_MESSAGE_SIZE", defaultValue: "52428800",
            summary: "Max message size in bytes, advertised as SIZE (1024-2147483648)"),
        Variable(name: "SMTP_TIMEOUT_SECONDS", defaultValue: "300", summary: "Connection idle timeout (1-86400)"),
        Variable(name: "SMTP_HOSTNAME", defaultValue: "localhost", summary: "Server hostname (greeting, EHLO, Received headers)"),
        Variable(name: "SMTP_DB_PATH", defaultValue: "smtp.db", summary: "SQLite database path"),
        Variable(
            name: "SMTP_STORAGE_TYPE", defaultValue: "maildir",
            summary: "Mailbox storage backend (maildir/mbox/database/s3/timeseries)"),
        Variable(name: "SMTP_STORAGE_PATH", defaultValue: "/var/mail", summary: "Mailbox storage directory"),
        Variable(name: "SMTP_ENABLE_TLS", defaultValue: "false", summary: "Enable STARTTLS (needs SMTP_TLS_CERT and SMTP_TLS_KEY)"),
        Variable(name: "SMTP_TLS_CERT", defaultValue: "-", summary: "TLS certificate chain (PEM) path"),
        Variable(name: "SMTP_TLS_KEY", defaultValue: "-", summary: "TLS private key (PEM) path"),
        Variable(name: "SMTP_ENABLE_AUTH", defaultValue: "true", summary: "Require AUTH before MAIL (relaying always needs AUTH)"),
        Variable(name: "SMTP_HEALTH_PORT", defaultValue: "8080", summary: "Health/API port"),
        Variable(name: "SMTP_METRICS_PORT", defaultValue: "8081", summary: "Prometheus metrics port"),
        Variable(
            name: "SMTP_METRICS_HOST", defaultValue: "127.0.0.1",
            summary: "Bind address of GET /metrics (no authentication: loopback unless set)"),
        Variable(name: "SMTP_LOG_LEVEL", defaultValue: "info", summary: "Log level (debug/info/warn/error)"),
        Variable(name: "SMTP_ENABLE_SPAMASSASSIN", defaultValue: "false", summary: "Enable SpamAssassin (spamd)"),
        Variable(name: "SMTP_SPAMASSASSIN_HOST", defaultValue: "127.0.0.1", summary: "SpamAssassin host"),
        Variable(name: "SMTP_SPAMASSASSIN_PORT", defaultValue: "783", summary: "SpamAssassin port"),
        Variable(name: "SMTP_ENABLE_CLAMAV", defaultValue: "false", summary: "Enable ClamAV (clamd)"),
        Variable(name: "SMTP_CLAMAV_HOST", defaultValue: "127.0.0.1", summary: "ClamAV host"),
        Variable(name: "SMTP_CLAMAV_PORT", defaultValue: "3310", summary: "ClamAV port"),
        Variable(
            name: "SMTP_LOCAL_DOMAINS", defaultValue: "-",
            summary: "Comma-separated domains delivered locally (others need AUTH to relay)"),
        Variable(name: "SMTP_SPOOL_PATH", defaultValue: "spool", summary: "Spool directory for accepted messages"),
        Variable(
            name: "SMTP_SPOOL_SMALL_MESSAGE_KB", defaultValue: "64",
            summary: "Embedded mode: messages up to this size are spooled in SQLite, not a file each (0-1024; 0 = off)"),
        Variable(name: "SMTP_ADMIN_USERNAME", defaultValue: "admin", summary: "Username of the first administrator"),
        Variable(name: "SMTP_ADMIN_PASSWORD", defaultValue: "-", summary: "Password of the first administrator"),
        Variable(
            name: "SMTP_ADMIN_EMAIL", defaultValue: "<username>@<hostname>",
            summary: "Email address of the first administrator"),
        Variable(name: "SMTP_MAX_RECIPIENTS", defaultValue: "100", summary: "Max RCPT TO per transaction (1-100000)"),
        Variable(
            name: "SMTP_DELIVERBY_MIN_SECONDS", defaultValue: "86400",
            summary: "Minimum BY time, advertised as DELIVERBY (0-999999999)"),
        Variable(name: "SMTP_ROLE", defaultValue: "all", summary: "What this process runs (ingress/delivery/admin/all)"),
        Variable(
            name: "SMTP_SHUTDOWN_GRACE_SECONDS", defaultValue: "30",
            summary: "Time open transactions get to finish on SIGTERM (0-3600)"),
        Variable(name: "SMTP_QUEUE_POLL_SECONDS", defaultValue: "5", summary: "Delivery queue poll interval (1-3600)"),
        Variable(name: "SMTP_MAX_ATTEMPTS", defaultValue: "5", summary: "Delivery attempts before a bounce (1-100)"),
        Variable(
            name: "SMTP_DATABASE_URL", defaultValue: "-",
            summary: "postgres://user:password@host:port/db; users, queue, events and the database store in PostgreSQL (no SQLite file)"),
        Variable(name: "SMTP_S3_ENDPOINT", defaultValue: "-", summary: "S3-compatible server URL (path-style); AWS when unset"),
        Variable(name: "SMTP_S3_BUCKET", defaultValue: "-", summary: "S3 bucket (needed by SMTP_STORAGE_TYPE=s3)"),
        Variable(name: "SMTP_S3_REGION", defaultValue: "us-east-1", summary: "S3 region"),
        Variable(name: "SMTP_S3_ACCESS_KEY", defaultValue: "-", summary: "S3 access key id"),
        Variable(name: "SMTP_S3_SECRET_KEY", defaultValue: "-", summary: "S3 secret access key"),
        Variable(
            name: "SMTP_ENCRYPTION_KEY", defaultValue: "-",
            summary: "Base64 of 32 bytes: AES-256-GCM key sealing every timeseries file"),
        Variable(
            name: "SMTP_REDIS_URL", defaultValue: "-",
            summary: "redis://[:password@]host[:port][/db]; rate limits shared by all nodes (in-process when unset)"),
        Variable(
            name: "SMTP_REDIS_FAILURE", defaultValue: "open",
            summary: "While Redis is down: open (per-node limits) or closed (refuse what the limits guard)"),
        Variable(
            name: "SMTP_RATE_CONNECTIONS_PER_MINUTE", defaultValue: "10",
            summary: "Connections per client address per minute (0 = off)"),
        Variable(
            name: "SMTP_RATE_COMMANDS_PER_MINUTE", defaultValue: "100",
            summary: "SMTP commands per client address per minute (0 = off)"),
        Variable(
            name: "SMTP_RATE_AUTH_FAILURES_PER_HOUR", defaultValue: "5",
            summary: "Failed AUTH attempts per client address per hour (0 = off)"),
        Variable(
            name: "SMTP_RATE_MESSAGES_PER_HOUR", defaultValue: "20",
            summary: "Messages accepted per client address per hour (0 = off)"),
        Variable(
            name: "SMTP_TRUSTED_PROXIES", defaultValue: "-",
            summary: "Comma-separated CIDRs allowed to send a PROXY v1/v2 header (others: closed)"),
        Variable(
            name: "SMTP_DNS_SERVERS", defaultValue: "-",
            summary: "Comma-separated DNS servers for MX lookups (ip, ip:port, [ipv6]:port); system resolver when unset"),
        Variable(
            name: "SMTP_RELAY_HOST", defaultValue: "-",
            summary: "Smarthost for all remote mail (host or host:port); MX lookup when unset"),
        Variable(name: "SMTP_OUTBOUND_PORT", defaultValue: "25", summary: "Port of remote MX hosts (1-65535)"),
        Variable(
            name: "SMTP_OUTBOUND_REQUIRE_TLS", defaultValue: "false",
            summary: "Deliver remote mail only over STARTTLS (otherwise opportunistic)"),
        Variable(
            name: "SMTP_OUTBOUND_CONCURRENCY", defaultValue: "10",
            summary: "Connections at once per destination host (1-1000)"),
        Variable(
            name: "SMTP_RETRY_SCHEDULE", defaultValue: "60,300,1800,7200,28800",
            summary: "Seconds before each retry, comma-separated; the last repeats"),
        Variable(
            name: "SMTP_MAX_QUEUE_AGE_SECONDS", defaultValue: "432000",
            summary: "Undelivered this long after acceptance: bounce (60-2592000)"),
        Variable(
            name: "SMTP_LEASE_SECONDS", defaultValue: "300",
            summary: "A worker's claim on a job before others may take it (10-86400)"),
        Variable(
            name: "SMTP_WEBHOOK_URL", defaultValue: "-",
            summary: "http(s) URL events are POSTed to; no events are recorded when unset"),
        Variable(
            name: "SMTP_WEBHOOK_EVENTS", defaultValue: "all",
            summary: "Comma-separated events to send: " + WebhookEvent.allCases.map(\.rawValue).joined(separator: ",")),
        Variable(
            name: "SMTP_WEBHOOK_SECRET", defaultValue: "-",
            summary: "HMAC-SHA256 key: X-MailTier-Signature: sha256=<hex of HMAC(secret, \"<timestamp>.<body>\")>"),
        Variable(
            name: "SMTP_WEBHOOK_RETRY_SECONDS", defaultValue: "10",
            summary: "First retry of a failed post after this long, doubling up to 1 h (1-3600)"),
        Variable(
            name: "SMTP_WEBHOOK_MAX_ATTEMPTS", defaultValue: "10",
            summary: "Posts of one event before it fails for good (1-100)"),
        Variable(
            name: "SMTP_HEALTH_MIN_FREE_DISK_PERCENT", defaultValue: "10",
            summary: "/health is unhealthy under this much free space where mail is stored (0-99; 0 = off)"),
    ]

    /// Usage text for `smtp-server --help`: every variable, its default and what it does.
    public static var helpText: String {
        let header = Variable(name: "VARIABLE", defaultValue: "DEFAULT", summary: "DESCRIPTION")
        let rows = [header] + Self.variables
        let nameWidth = rows.map(\.name.count).max() ?? 0
        let defaultWidth = rows.map(\.defaultValue.count).max() ?? 0
        func pad(_ text: String, _ width: Int) -> String {
            text + String(repeating: " ", count: max(0, width - text.count))
        }
        var lines = [
            "Usage: smtp-server [migrate | webhooks [retry-failed] | --help]",
            "",
            "MailTier SMTP server. Configured through environment variables; an empty value means unset.",
            "`smtp-server migrate` applies the pending database migrations (PostgreSQL when SMTP_DATABASE_URL",
            "is set, else SQLite at SMTP_DB_PATH), prints one line saying what it did, and exits (1 on failure).",
            "`smtp-server webhooks` prints the webhook outbox's counts and its failed events; `webhooks",
            "retry-failed` makes the failed events due again first.",
            "Booleans accept true/false, 1/0, yes/no, on/off. A bad value stops the server (exit code 2).",
            "",
        ]
        for row in rows {
            lines.append("  \(pad(row.name, nameWidth))  \(pad(row.defaultValue, defaultWidth))  \(row.summary)")
        }
        return lines.joined(separator: "\n") + "\n"
    }
}

// MARK: - Loading

extension Configuration {
    /// `recordedEvents` from `SMTP_WEBHOOK_URL` and `SMTP_WEBHOOK_EVENTS` alone, validated as
    /// `load(from:)` does: for tools that write to the server's database without its whole
    /// configuration (user-cli writes `user.created`).
    public static func recordedEvents(from environment: [String: String]) throws(ConfigurationError) -> Set<WebhookEvent> {
        let env = EnvironmentReader(environment)
        var config = Configuration()
        config.webhookURL = try env.webhookURL("SMTP_WEBHOOK_URL")
        config.webhookEvents = try env.webhookEvents("SMTP_WEBHOOK_EVENTS") ?? config.webhookEvents
        return config.recordedEvents
    }

    /// Reads and validates every variable; the first bad one throws.
    /// An empty value counts as unset (its default applies).
    public static func load(from environment: [String: String]) throws(ConfigurationError) -> Configuration {
        let env = EnvironmentReader(environment)
        var config = Configuration()

        config.port = try env.int("SMTP_PORT", in: 1...65535) ?? config.port
        config.host = try env.host("SMTP_HOST") ?? config.host
        config.maxConnections = try env.int("SMTP_MAX_CONNECTIONS", in: 1...100_000) ?? config.maxConnections
        config.maxMessageSize = try env.int("SMTP_MAX_MESSAGE_SIZE", in: 1024...2_147_483_648) ?? config.maxMessageSize
        config.timeoutSeconds = try env.int("SMTP_TIMEOUT_SECONDS", in: 1...86400) ?? config.timeoutSeconds
        config.hostname = try env.domain("SMTP_HOSTNAME") ?? config.hostname
        config.dbPath = try env.path("SMTP_DB_PATH") ?? config.dbPath
        config.storageType = try env.choice("SMTP_STORAGE_TYPE", StorageType.self) ?? config.storageType
        config.storagePath = try env.path("SMTP_STORAGE_PATH") ?? config.storagePath
        config.enableTLS = try env.bool("SMTP_ENABLE_TLS") ?? config.enableTLS
        config.tlsCert = try env.path("SMTP_TLS_CERT")
        config.tlsKey = try env.path("SMTP_TLS_KEY")
        if config.enableTLS {
            config.tlsCert = try env.readableFile("SMTP_TLS_CERT", requiredBy: "SMTP_ENABLE_TLS")
            config.tlsKey = try env.readableFile("SMTP_TLS_KEY", requiredBy: "SMTP_ENABLE_TLS")
        }
        config.enableAuth = try env.bool("SMTP_ENABLE_AUTH") ?? config.enableAuth
        config.healthPort = try env.int("SMTP_HEALTH_PORT", in: 1...65535) ?? config.healthPort
        config.metricsPort = try env.int("SMTP_METRICS_PORT", in: 1...65535) ?? config.metricsPort
        config.metricsHost = try env.host("SMTP_METRICS_HOST") ?? config.metricsHost
        config.logLevel = try env.choice("SMTP_LOG_LEVEL", LogLevel.self) ?? config.logLevel
        config.enableSpamAssassin = try env.bool("SMTP_ENABLE_SPAMASSASSIN") ?? config.enableSpamAssassin
        config.spamAssassinHost = try env.host("SMTP_SPAMASSASSIN_HOST") ?? config.spamAssassinHost
        config.spamAssassinPort = try env.int("SMTP_SPAMASSASSIN_PORT", in: 1...65535) ?? config.spamAssassinPort
        config.enableClamAV = try env.bool("SMTP_ENABLE_CLAMAV") ?? config.enableClamAV
        config.clamAVHost = try env.host("SMTP_CLAMAV_HOST") ?? config.clamAVHost
        config.clamAVPort = try env.int("SMTP_CLAMAV_PORT", in: 1...65535) ?? config.clamAVPort

        config.localDomains = try env.domainList("SMTP_LOCAL_DOMAINS") ?? config.localDomains
        config.spoolPath = try env.path("SMTP_SPOOL_PATH") ?? config.spoolPath
        config.spoolSmallMessageKB = try env.int("SMTP_SPOOL_SMALL_MESSAGE_KB", in: 0...1024) ?? config.spoolSmallMessageKB
        config.adminUsername = try env.username("SMTP_ADMIN_USERNAME") ?? config.adminUsername
        config.adminPassword = try env.password("SMTP_ADMIN_PASSWORD")
        if let email = try env.email("SMTP_ADMIN_EMAIL") {
            config.adminEmail = email
        } else {
            let email = "\(config.adminUsername)@\(config.hostname)"
            guard EnvironmentReader.isValidEmail(email) else {
                throw ConfigurationError(
                    variable: "SMTP_ADMIN_EMAIL",
                    message: "the default \(EnvironmentReader.quote(email)) is not a valid address; set SMTP_ADMIN_EMAIL")
            }
            config.adminEmail = email
        }
        config.maxRecipients = try env.int("SMTP_MAX_RECIPIENTS", in: 1...100_000) ?? config.maxRecipients
        config.deliverByMinSeconds =
            try env.int("SMTP_DELIVERBY_MIN_SECONDS", in: 0...999_999_999) ?? config.deliverByMinSeconds
        config.role = try env.choice("SMTP_ROLE", Role.self) ?? config.role
        config.shutdownGraceSeconds =
            try env.int("SMTP_SHUTDOWN_GRACE_SECONDS", in: 0...3600) ?? config.shutdownGraceSeconds
        config.queuePollSeconds = try env.int("SMTP_QUEUE_POLL_SECONDS", in: 1...3600) ?? config.queuePollSeconds
        config.maxAttempts = try env.int("SMTP_MAX_ATTEMPTS", in: 1...100) ?? config.maxAttempts

        config.databaseURL = try env.databaseURL("SMTP_DATABASE_URL")
        config.s3Endpoint = try env.httpURL("SMTP_S3_ENDPOINT")
        config.s3Bucket = try env.bucket("SMTP_S3_BUCKET")
        config.s3Region = try env.token("SMTP_S3_REGION") ?? config.s3Region
        config.s3AccessKey = try env.token("SMTP_S3_ACCESS_KEY")
        config.s3SecretKey = try env.token("SMTP_S3_SECRET_KEY")
        config.encryptionKey = try env.base64Key("SMTP_ENCRYPTION_KEY", bytes: 32)
        config.redisURL = try env.redisURL("SMTP_REDIS_URL")
        config.redisFailure = try env.choice("SMTP_REDIS_FAILURE", RedisFailurePolicy.self) ?? config.redisFailure
        config.rateConnectionsPerMinute =
            try env.int("SMTP_RATE_CONNECTIONS_PER_MINUTE", in: 0...1_000_000) ?? config.rateConnectionsPerMinute
        config.rateCommandsPerMinute =
            try env.int("SMTP_RATE_COMMANDS_PER_MINUTE", in: 0...1_000_000) ?? config.rateCommandsPerMinute
        config.rateAuthFailuresPerHour =
            try env.int("SMTP_RATE_AUTH_FAILURES_PER_HOUR", in: 0...1_000_000) ?? config.rateAuthFailuresPerHour
        config.rateMessagesPerHour =
            try env.int("SMTP_RATE_MESSAGES_PER_HOUR", in: 0...1_000_000) ?? config.rateMessagesPerHour
        config.trustedProxies = try env.cidrList("SMTP_TRUSTED_PROXIES") ?? config.trustedProxies
        config.dnsServers = try env.dnsServerList("SMTP_DNS_SERVERS") ?? config.dnsServers
        config.relayHost = try env.relayHost("SMTP_RELAY_HOST")
        config.outboundPort = try env.int("SMTP_OUTBOUND_PORT", in: 1...65535) ?? config.outboundPort
        config.outboundRequireTLS = try env.bool("SMTP_OUTBOUND_REQUIRE_TLS") ?? config.outboundRequireTLS
        config.outboundConcurrency = try env.int("SMTP_OUTBOUND_CONCURRENCY", in: 1...1000) ?? config.outboundConcurrency
        config.retrySchedule = try env.secondsList("SMTP_RETRY_SCHEDULE") ?? config.retrySchedule
        config.maxQueueAgeSeconds =
            try env.int("SMTP_MAX_QUEUE_AGE_SECONDS", in: 60...2_592_000) ?? config.maxQueueAgeSeconds
        config.leaseSeconds = try env.int("SMTP_LEASE_SECONDS", in: 10...86400) ?? config.leaseSeconds
        config.webhookURL = try env.webhookURL("SMTP_WEBHOOK_URL")
        config.webhookEvents = try env.webhookEvents("SMTP_WEBHOOK_EVENTS") ?? config.webhookEvents
        config.webhookSecret = try env.password("SMTP_WEBHOOK_SECRET")
        config.webhookRetrySeconds = try env.int("SMTP_WEBHOOK_RETRY_SECONDS", in: 1...3600) ?? config.webhookRetrySeconds
        config.webhookMaxAttempts = try env.int("SMTP_WEBHOOK_MAX_ATTEMPTS", in: 1...100) ?? config.webhookMaxAttempts
        config.healthMinimumFreeDiskPercent =
            try env.int("SMTP_HEALTH_MIN_FREE_DISK_PERCENT", in: 0...99) ?? config.healthMinimumFreeDiskPercent
        if config.storageType == .s3 && config.s3Bucket == nil {
            throw ConfigurationError(variable: "SMTP_S3_BUCKET", message: "required when SMTP_STORAGE_TYPE is s3")
        }
        if config.s3Bucket != nil {
            if config.s3AccessKey == nil {
                throw ConfigurationError(variable: "SMTP_S3_ACCESS_KEY", message: "required when SMTP_S3_BUCKET is set")
            }
            if config.s3SecretKey == nil {
                throw ConfigurationError(variable: "SMTP_S3_SECRET_KEY", message: "required when SMTP_S3_BUCKET is set")
            }
        }

        // The three listeners must not collide.
        if config.healthPort == config.port {
            throw env.conflict("SMTP_HEALTH_PORT", with: "SMTP_PORT", value: config.healthPort)
        }
        if config.metricsPort == config.port {
            throw env.conflict("SMTP_METRICS_PORT", with: "SMTP_PORT", value: config.metricsPort)
        }
        if config.metricsPort == config.healthPort {
            throw env.conflict("SMTP_METRICS_PORT", with: "SMTP_HEALTH_PORT", value: config.metricsPort)
        }
        return config
    }
}

/// Typed, validating reads of environment variables. Every error message is built here, so
/// that hiding secret values is done in one place (`shown(_:of:)`).
struct EnvironmentReader {
    let environment: [String: String]

    init(_ environment: [String: String]) { self.environment = environment }

    /// The value, or nil when unset or empty.
    func raw(_ name: String) -> String? {
        guard let value = self.environment[name], !value.isEmpty else { return nil }
        return value
    }

    /// Without leading and trailing spaces and tabs.
    static func trim<S: StringProtocol>(_ text: S) -> String {
        let isBlank: (Character) -> Bool = { $0 == " " || $0 == "\t" }
        guard let first = text.firstIndex(where: { !isBlank($0) }), let last = text.lastIndex(where: { !isBlank($0) })
        else { return "" }
        return String(text[first...last])
    }

    static func isSecret(_ name: String) -> Bool {
        let upper = name.uppercased()
        // A database URL carries its password.
        return upper.contains("PASSWORD") || upper.contains("SECRET") || upper.contains("KEY") || upper.contains("DATABASE_URL")
            || upper.contains("REDIS_URL")
    }

    /// A value as it may appear in an error: quoted, escaped onto one line, at most 200
    /// characters, or `<hidden>` for a secret variable.
    static func shown(_ value: String, of name: String) -> String {
        Self.isSecret(name) ? "<hidden>" : Self.quote(value)
    }

    static func quote(_ value: String) -> String {
        var result = "\""
        var count = 0
        for scalar in value.unicodeScalars {
            if count == 200 {
                result += "..."
                break
            }
            count += 1
            switch scalar {
            case "\"": result += "\\\""
            case "\\": result += "\\\\"
            case "\n": result += "\\n"
            case "\r": result += "\\r"
            case "\t": result += "\\t"
            default:
                if scalar.value < 0x20 || scalar.value == 0x7F || (0x80..<0xA0).contains(scalar.value)
                    || scalar.properties.generalCategory == .lineSeparator
                    || scalar.properties.generalCategory == .paragraphSeparator
                {
                    result += "\\u{\(String(scalar.value, radix: 16))}"
                } else {
                    result.unicodeScalars.append(scalar)
                }
            }
        }
        return result + "\""
    }

    func error(_ name: String, _ expectation: String, got value: String) -> ConfigurationError {
        ConfigurationError(variable: name, message: "\(expectation), got \(Self.shown(value, of: name))")
    }

    func conflict(_ name: String, with other: String, value: Int) -> ConfigurationError {
        ConfigurationError(variable: name, message: "must differ from \(other), got \(Self.shown(String(value), of: name))")
    }

    func int(_ name: String, in range: ClosedRange<Int>) throws(ConfigurationError) -> Int? {
        guard let value = self.raw(name) else { return nil }
        let text = Self.trim(value)
        guard text.utf8.allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
            let number = Int(text), range.contains(number)
        else {
            throw self.error(
                name, "expected an integer from \(range.lowerBound) to \(range.upperBound)", got: value)
        }
        return number
    }

    func bool(_ name: String) throws(ConfigurationError) -> Bool? {
        guard let value = self.raw(name) else { return nil }
        switch Self.trim(value).lowercased() {
        case "true", "1", "yes", "on": return true
        case "false", "0", "no", "off": return false
        default: throw self.error(name, "expected a boolean (true/false, 1/0, yes/no, on/off)", got: value)
        }
    }

    func choice<T: RawRepresentable & CaseIterable>(_ name: String, _: T.Type) throws(ConfigurationError) -> T?
    where T.RawValue == String {
        guard let value = self.raw(name) else { return nil }
        if let result = T(rawValue: Self.trim(value).lowercased()) { return result }
        let names = T.allCases.map(\.rawValue).joined(separator: ", ")
        throw self.error(name, "expected one of \(names)", got: value)
    }

    /// A file system path: any non-empty value without control characters.
    func path(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        guard !value.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) else {
            throw self.error(name, "expected a path without control characters", got: value)
        }
        return value
    }

    /// Required when `flag` is true: the path of a readable regular file.
    func readableFile(_ name: String, requiredBy flag: String) throws(ConfigurationError) -> String {
        guard let path = try self.path(name) else {
            throw ConfigurationError(variable: name, message: "required when \(flag) is true")
        }
        var info = stat()
        guard stat(path, &info) == 0, (info.st_mode & S_IFMT) == S_IFREG, access(path, R_OK) == 0 else {
            throw self.error(name, "expected a readable file", got: path)
        }
        return path
    }

    /// A domain name (at least two labels) or `localhost`; returned lowercased.
    func domain(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        guard Self.isValidDomain(value) else {
            throw self.error(name, "expected a domain name or localhost", got: value)
        }
        return value.lowercased()
    }

    /// `host` or `host:port`, `[ipv6]` or `[ipv6]:port`.
    func relayHost(_ name: String) throws(ConfigurationError) -> RelayHost? {
        guard let value = self.raw(name) else { return nil }
        guard let relay = RelayHost(value) else {
            throw self.error(name, "expected host or host:port, such as smtp.example.com:587 or [2001:db8::1]:25", got: value)
        }
        return relay
    }

    /// Comma-separated whole seconds, each 1 to 604800, at least one.
    func secondsList(_ name: String) throws(ConfigurationError) -> [Int]? {
        guard let value = self.raw(name) else { return nil }
        let items = value.split(separator: ",", omittingEmptySubsequences: false).map { Self.trim($0) }
        let numbers = items.compactMap { item in Int(item).flatMap { (1...604_800).contains($0) ? $0 : nil } }
        guard !items.isEmpty, numbers.count == items.count else {
            throw self.error(name, "expected comma-separated seconds from 1 to 604800, such as 60,300,1800", got: value)
        }
        return numbers
    }

    /// A bind or peer address: an IPv4/IPv6 literal, a domain name, or `localhost`.
    func host(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        guard Self.isIPAddress(value) || Self.isValidDomain(value) else {
            throw self.error(name, "expected an IP address or a host name", got: value)
        }
        return value
    }

    /// `postgres://` or `postgresql://` with a host.
    func databaseURL(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        let lower = value.lowercased()
        guard lower.hasPrefix("postgres://") || lower.hasPrefix("postgresql://"),
            let rest = value.split(separator: "/", maxSplits: 3, omittingEmptySubsequences: false).dropFirst(2).first,
            !rest.isEmpty, !value.unicodeScalars.contains(where: { $0.value <= 0x20 || $0.value == 0x7F })
        else {
            throw self.error(name, "expected postgres://user:password@host:port/database", got: value)
        }
        return value
    }

    /// `redis://[:password@]host[:port][/db]` (`rediss://` is not supported: no TLS client here).
    func redisURL(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        guard (try? RedisEndpoint(url: value)) != nil else {
            throw self.error(name, "expected redis://[:password@]host[:port][/db]", got: value)
        }
        return value
    }

    /// Comma-separated CIDRs (`10.0.0.0/8`, `::1/128`; a bare address means one host).
    func cidrList(_ name: String) throws(ConfigurationError) -> [CIDR]? {
        try list(name, expecting: "expected comma-separated CIDRs such as 10.0.0.0/8, 127.0.0.1/32") { CIDR($0) }
    }

    /// Comma-separated DNS servers: `ip`, `ip:port` (IPv4), `ipv6` or `[ipv6]:port`.
    func dnsServerList(_ name: String) throws(ConfigurationError) -> [DNSServer]? {
        try list(name, expecting: "expected comma-separated DNS server addresses such as 192.0.2.53, 127.0.0.1:5353, [::1]:53") {
            DNSServer($0)
        }
    }

    /// A comma-separated list, each item parsed by `parse`; blanks around commas and empty
    /// items are ignored; one item `parse` refuses fails the whole value with `expectation`.
    private func list<Item>(
        _ name: String, expecting expectation: String, _ parse: (String) -> Item?
    ) throws(ConfigurationError) -> [Item]? {
        guard let value = self.raw(name) else { return nil }
        var result: [Item] = []
        for item in value.split(separator: ",") {
            let text = Self.trim(item)
            guard !text.isEmpty else { continue }
            guard let parsed = parse(text) else { throw self.error(name, expectation, got: value) }
            result.append(parsed)
        }
        return result
    }

    /// `http://` or `https://` with a host, and no path beyond `/`.
    func httpURL(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        let lower = value.lowercased()
        let scheme = lower.hasPrefix("https://") ? "https://" : (lower.hasPrefix("http://") ? "http://" : nil)
        guard let scheme else { throw self.error(name, "expected an http:// or https:// URL", got: value) }
        var authority = String(value.dropFirst(scheme.count))
        if authority.hasSuffix("/") { authority.removeLast() }
        guard !authority.isEmpty, !authority.contains("/"), !authority.contains("@"),
            !authority.unicodeScalars.contains(where: { $0.value <= 0x20 || $0.value == 0x7F })
        else { throw self.error(name, "expected an http:// or https:// URL of a server, without a path", got: value) }
        return scheme + authority
    }

    /// An `http://` or `https://` URL with a host (a path and query allowed), without
    /// user information, spaces or control characters.
    func webhookURL(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        let text = Self.trim(value)
        let lower = text.lowercased()
        guard lower.hasPrefix("http://") || lower.hasPrefix("https://"),
            !text.unicodeScalars.contains(where: { $0.value <= 0x20 || $0.value == 0x7F }),
            let components = URLComponents(string: text), let host = components.host, !host.isEmpty,
            components.user == nil, components.password == nil, components.fragment == nil,
            (components.port.map { (1...65535).contains($0) } ?? true)
        else {
            throw self.error(name, "expected an http:// or https:// URL such as https://example.com/webhook", got: value)
        }
        return text
    }

    /// Comma-separated event names of `WebhookEvent` (blanks around commas and empty items
    /// ignored), at least one; an unknown name is the error, quoted.
    func webhookEvents(_ name: String) throws(ConfigurationError) -> Set<WebhookEvent>? {
        guard let value = self.raw(name) else { return nil }
        let names = WebhookEvent.allCases.map(\.rawValue).joined(separator: ", ")
        var events: Set<WebhookEvent> = []
        for item in value.split(separator: ",") {
            let text = Self.trim(item)
            guard !text.isEmpty else { continue }
            guard let event = WebhookEvent(rawValue: text.lowercased()) else {
                throw self.error(name, "unknown event (expected comma-separated events from \(names))", got: text)
            }
            events.insert(event)
        }
        guard !events.isEmpty else { throw self.error(name, "expected at least one event from \(names)", got: value) }
        return events
    }

    /// An S3 bucket name: 3-63 of a-z 0-9 . -, starting and ending with a letter or digit.
    func bucket(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        let bytes = Array(value.utf8)
        let allowed = bytes.allSatisfy { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2E || $0 == 0x2D }
        let edge: (UInt8) -> Bool = { ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x30 && $0 <= 0x39) }
        guard (3...63).contains(bytes.count), allowed, edge(bytes.first!), edge(bytes.last!) else {
            throw self.error(name, "expected an S3 bucket name (3-63 of a-z 0-9 . -)", got: value)
        }
        return value
    }

    /// A single word of printable ASCII (keys, regions).
    func token(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        guard value.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            throw self.error(name, "expected printable ASCII without spaces", got: value)
        }
        return value
    }

    /// Base64 of exactly `bytes` bytes.
    func base64Key(_ name: String, bytes: Int) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        guard let decoded = Base64.decode(Array(Self.trim(value).utf8)), decoded.count == bytes else {
            throw self.error(name, "expected base64 of exactly \(bytes) bytes (e.g. openssl rand -base64 \(bytes))", got: value)
        }
        return Self.trim(value)
    }

    /// Comma-separated domains; blanks around commas and empty items are ignored. Lowercased,
    /// without duplicates, in the given order.
    func domainList(_ name: String) throws(ConfigurationError) -> [String]? {
        guard let value = self.raw(name) else { return nil }
        var domains: [String] = []
        for item in value.split(separator: ",", omittingEmptySubsequences: false) {
            let domain = Self.trim(item).lowercased()
            if domain.isEmpty { continue }
            guard Self.isValidDomain(domain) else {
                throw self.error(name, "expected comma-separated domain names", got: domain)
            }
            if !domains.contains(domain) { domains.append(domain) }
        }
        return domains
    }

    /// 1 to 64 characters; no whitespace, control characters or `:` (HTTP Basic separator).
    func username(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        guard value.count <= 64,
            !value.unicodeScalars.contains(where: {
                $0.value <= 0x20 || $0.value == 0x7F || $0 == ":" || $0.properties.isWhitespace
            })
        else {
            throw self.error(name, "expected 1 to 64 characters without spaces, control characters or ':'", got: value)
        }
        return value
    }

    /// Any value without control characters (a NUL could never be sent in AUTH PLAIN).
    func password(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        guard !value.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7F }) else {
            throw self.error(name, "must not contain control characters", got: value)
        }
        return value
    }

    func email(_ name: String) throws(ConfigurationError) -> String? {
        guard let value = self.raw(name) else { return nil }
        guard Self.isValidEmail(value) else {
            throw self.error(name, "expected an email address like user@example.com", got: value)
        }
        return value
    }

    static func isValidEmail(_ value: String) -> Bool {
        guard let at = value.lastIndex(of: "@") else { return false }
        let local = value[..<at]
        let domain = String(value[value.index(after: at)...])
        guard !local.isEmpty, local.utf8.count <= 64,
            !local.unicodeScalars.contains(where: {
                $0.value <= 0x20 || $0.value == 0x7F || $0 == "@" || $0 == "<" || $0 == ">"
                    || $0.properties.isWhitespace
            })
        else { return false }
        return Self.isValidDomain(domain)
    }

    /// RFC 1035 letters-digits-hyphens labels of 1 to 63 octets, at most 253 octets in all, at
    /// least two labels (or exactly `localhost`). No trailing dot.
    static func isValidDomain(_ value: String) -> Bool {
        if value.lowercased() == "localhost" { return true }
        guard value.utf8.count <= 253 else { return false }
        let labels = value.split(separator: ".", omittingEmptySubsequences: false)
        guard labels.count >= 2 else { return false }
        for label in labels {
            let bytes = Array(label.utf8)
            guard (1...63).contains(bytes.count), bytes.first != UInt8(ascii: "-"), bytes.last != UInt8(ascii: "-")
            else { return false }
            for byte in bytes {
                let ok =
                    (byte >= UInt8(ascii: "a") && byte <= UInt8(ascii: "z"))
                    || (byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z"))
                    || (byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9")) || byte == UInt8(ascii: "-")
                if !ok { return false }
            }
        }
        // An all-numeric last label would be an IPv4 literal, not a domain.
        return !labels.last!.utf8.allSatisfy { $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }
    }

    static func isIPAddress(_ value: String) -> Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, value, &v4) == 1 || inet_pton(AF_INET6, value, &v6) == 1
    }
}

/// `SMTP_RELAY_HOST`: a smarthost and, when given, its port.
public struct RelayHost: Sendable, Hashable, CustomStringConvertible {
    /// A host name (lower case) or an IP address (IPv6 without brackets).
    public var host: String
    public var port: Int?

    public init(host: String, port: Int? = nil) {
        self.host = host
        self.port = port
    }

    /// Parses `host`, `host:port`, `[ipv6]` or `[ipv6]:port`; nil when invalid.
    public init?(_ text: String) {
        guard let parts = HostPort(text) else { return nil }
        if parts.bracketed {
            guard HostPort.isIPv6(parts.host) else { return nil }
        } else {
            guard EnvironmentReader.isIPAddress(parts.host) || EnvironmentReader.isValidDomain(parts.host) else { return nil }
        }
        self.init(host: parts.bracketed ? parts.host : parts.host.lowercased(), port: parts.port)
    }

    public var description: String {
        let host = self.host.contains(":") ? "[\(self.host)]" : self.host
        return self.port.map { "\(host):\($0)" } ?? host
    }
}
