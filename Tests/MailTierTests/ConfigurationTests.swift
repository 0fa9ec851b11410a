import Foundation
import Logging
import MailTier
import Testing

private func load(_ environment: [String: String]) throws(ConfigurationError) -> Configuration {
    try Configuration.load(from: environment)
}

/// The one-line error for `environment`, or nil if it loads.
private func errorLine(_ environment: [String: String]) -> String? {
    do {
        _ = try Configuration.load(from: environment)
        return nil
    } catch {
        return error.description
    }
}

/// A readable file for the TLS tests, removed by `remove()`.
private struct TempFiles {
    let directory: String

    init() throws {
        self.directory = NSTemporaryDirectory() + "/mailtier-config-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: self.directory, withIntermediateDirectories: true)
    }

    func file(_ name: String) throws -> String {
        let path = self.directory + "/" + name
        try Data("-----BEGIN PEM-----\n".utf8).write(to: URL(fileURLWithPath: path))
        return path
    }

    func remove() { try? FileManager.default.removeItem(atPath: self.directory) }
}

@Suite("ConfigurationTests")
struct ConfigurationTests {
    @Test func defaultsMatchTheAPITable() throws {
        let config = try load([:])
        // API.md, "Configuration API → Environment Variables".
        #expect(config.port == 2525)
        #expect(config.host == "0.0.0.0")
        #expect(config.maxConnections == 100)
        #expect(config.maxMessageSize == 52_428_800)
        #expect(config.timeoutSeconds == 300)
        #expect(config.hostname == "localhost")
        #expect(config.dbPath == "smtp.db")
        #expect(config.storageType == .maildir)
        #expect(config.storagePath == "/var/mail")
        #expect(config.enableTLS == false)
        #expect(config.tlsCert == nil)
        #expect(config.tlsKey == nil)
        #expect(config.enableAuth == true)
        #expect(config.healthPort == 8080)
        #expect(config.metricsPort == 8081)
        #expect(config.metricsHost == "127.0.0.1")
        #expect(config.logLevel == .info)
        #expect(config.enableSpamAssassin == false)
        #expect(config.spamAssassinHost == "127.0.0.1")
        #expect(config.spamAssassinPort == 783)
        #expect(config.enableClamAV == false)
        #expect(config.clamAVHost == "127.0.0.1")
        #expect(config.clamAVPort == 3310)
        // MailTier's additions.
        #expect(config.localDomains == [])
        #expect(config.spoolPath == "spool")
        #expect(config.adminUsername == "admin")
        #expect(config.adminPassword == nil)
        #expect(config.adminEmail == "admin@localhost")
        #expect(config.maxRecipients == 100)
        #expect(config.deliverByMinSeconds == 86400)
        #expect(config.role == .all)
        #expect(config.shutdownGraceSeconds == 30)
        #expect(config.queuePollSeconds == 5)
        #expect(config.maxAttempts == 5)

        #expect(config == Configuration())
    }

    @Test func emptyValuesMeanUnset() throws {
        var environment: [String: String] = [:]
        for variable in Configuration.variables { environment[variable.name] = "" }
        #expect(try load(environment) == Configuration())
    }

    @Test func everyVariableIsRead() throws {
        let config = try load([
            "SMTP_PORT": "25", "SMTP_HOST": "::1", "SMTP_MAX_CONNECTIONS": "200",
            "SMTP_MAX_MESSAGE_SIZE": "1024", "SMTP_TIMEOUT_SECONDS": "86400", "SMTP_HOSTNAME": "MX1.Example.com",
            "SMTP_DB_PATH": "/data/smtp.db", "SMTP_STORAGE_TYPE": "TimeSeries", "SMTP_STORAGE_PATH": "/srv/mail",
            "SMTP_ENABLE_TLS": "off", "SMTP_TLS_CERT": "/missing/cert.pem", "SMTP_TLS_KEY": "/missing/key.pem",
            "SMTP_ENABLE_AUTH": "No", "SMTP_HEALTH_PORT": "9080", "SMTP_METRICS_PORT": "9081",
            "SMTP_METRICS_HOST": "0.0.0.0",
            "SMTP_LOG_LEVEL": "warn", "SMTP_ENABLE_SPAMASSASSIN": "YES", "SMTP_SPAMASSASSIN_HOST": "spamd.internal.example",
            "SMTP_SPAMASSASSIN_PORT": "1783", "SMTP_ENABLE_CLAMAV": "1", "SMTP_CLAMAV_HOST": "10.0.0.7",
            "SMTP_CLAMAV_PORT": "13310", "SMTP_LOCAL_DOMAINS": "Example.COM, mail.example.org,,example.com,",
            "SMTP_SPOOL_PATH": "/var/spool/mailtier", "SMTP_ADMIN_USERNAME": "root", "SMTP_ADMIN_PASSWORD": "s3cret pass",
            "SMTP_ADMIN_EMAIL": "postmaster@example.com", "SMTP_MAX_RECIPIENTS": "1000",
            "SMTP_DELIVERBY_MIN_SECONDS": "0", "SMTP_ROLE": "delivery", "SMTP_SHUTDOWN_GRACE_SECONDS": "0",
            "SMTP_QUEUE_POLL_SECONDS": "60", "SMTP_MAX_ATTEMPTS": "10",
        ])
        #expect(config.port == 25)
        #expect(config.host == "::1")
        #expect(config.maxConnections == 200)
        #expect(config.maxMessageSize == 1024)
        #expect(config.timeoutSeconds == 86400)
        #expect(config.hostname == "mx1.example.com")
        #expect(config.dbPath == "/data/smtp.db")
        #expect(config.storageType == .timeseries)
        #expect(config.storagePath == "/srv/mail")
        #expect(config.enableTLS == false)
        #expect(config.tlsCert == "/missing/cert.pem")  // not checked while TLS is off
        #expect(config.tlsKey == "/missing/key.pem")
        #expect(config.enableAuth == false)
        #expect(config.healthPort == 9080)
        #expect(config.metricsPort == 9081)
        #expect(config.metricsHost == "0.0.0.0")
        #expect(config.logLevel == .warn)
        #expect(config.enableSpamAssassin)
        #expect(config.spamAssassinHost == "spamd.internal.example")
        #expect(config.spamAssassinPort == 1783)
        #expect(config.enableClamAV)
        #expect(config.clamAVHost == "10.0.0.7")
        #expect(config.clamAVPort == 13310)
        #expect(config.localDomains == ["example.com", "mail.example.org"])
        #expect(config.spoolPath == "/var/spool/mailtier")
        #expect(config.adminUsername == "root")
        #expect(config.adminPassword == "s3cret pass")
        #expect(config.adminEmail == "postmaster@example.com")
        #expect(config.maxRecipients == 1000)
        #expect(config.deliverByMinSeconds == 0)
        #expect(config.role == .delivery)
        #expect(config.shutdownGraceSeconds == 0)
        #expect(config.queuePollSeconds == 60)
        #expect(config.maxAttempts == 10)
    }

    @Test func booleanSpellings() throws {
        for (text, value) in [
            ("true", true), ("TRUE", true), ("1", true), ("yes", true), ("On", true),
            ("false", false), ("False", false), ("0", false), ("no", false), ("OFF", false),
        ] {
            #expect(try load(["SMTP_ENABLE_AUTH": text]).enableAuth == value, "\(text)")
        }
    }

    @Test func logLevelMapsToSwiftLog() throws {
        #expect(Configuration.LogLevel.debug.loggerLevel == .debug)
        #expect(Configuration.LogLevel.info.loggerLevel == .info)
        #expect(Configuration.LogLevel.warn.loggerLevel == Logger.Level.warning)
        #expect(Configuration.LogLevel.error.loggerLevel == .error)
        #expect(try load(["SMTP_LOG_LEVEL": "ERROR"]).loggerLevel == .error)
    }

    @Test func adminEmailDefaultsToUsernameAtHostname() throws {
        let config = try load(["SMTP_ADMIN_USERNAME": "boss", "SMTP_HOSTNAME": "mx.example.net"])
        #expect(config.adminEmail == "boss@mx.example.net")
        #expect(
            errorLine(["SMTP_ADMIN_USERNAME": "a@b"])
                == #"SMTP_ADMIN_EMAIL: the default "a@b@localhost" is not a valid address; set SMTP_ADMIN_EMAIL"#)
        #expect(try load(["SMTP_ADMIN_USERNAME": "a@b", "SMTP_ADMIN_EMAIL": "a@b.example"]).adminEmail == "a@b.example")
    }

    // Every variable, its bad values, and the exact line each must give.
    static let badValues: [(variable: String, value: String, line: String)] = [
        ("SMTP_PORT", "abc", #"SMTP_PORT: expected an integer from 1 to 65535, got "abc""#),
        ("SMTP_PORT", "0", #"SMTP_PORT: expected an integer from 1 to 65535, got "0""#),
        ("SMTP_PORT", "65536", #"SMTP_PORT: expected an integer from 1 to 65535, got "65536""#),
        ("SMTP_PORT", "-1", #"SMTP_PORT: expected an integer from 1 to 65535, got "-1""#),
        ("SMTP_PORT", "25.0", #"SMTP_PORT: expected an integer from 1 to 65535, got "25.0""#),
        ("SMTP_PORT", "99999999999999999999999", #"SMTP_PORT: expected an integer from 1 to 65535, got "99999999999999999999999""#),
        ("SMTP_HOST", "not a host", #"SMTP_HOST: expected an IP address or a host name, got "not a host""#),
        ("SMTP_HOST", "999.1.1.1", #"SMTP_HOST: expected an IP address or a host name, got "999.1.1.1""#),
        ("SMTP_MAX_CONNECTIONS", "0", #"SMTP_MAX_CONNECTIONS: expected an integer from 1 to 100000, got "0""#),
        ("SMTP_MAX_CONNECTIONS", "100001", #"SMTP_MAX_CONNECTIONS: expected an integer from 1 to 100000, got "100001""#),
        ("SMTP_MAX_MESSAGE_SIZE", "1023", #"SMTP_MAX_MESSAGE_SIZE: expected an integer from 1024 to 2147483648, got "1023""#),
        ("SMTP_MAX_MESSAGE_SIZE", "2147483649", #"SMTP_MAX_MESSAGE_SIZE: expected an integer from 1024 to 2147483648, got "2147483649""#),
        ("SMTP_MAX_MESSAGE_SIZE", "50MB", #"SMTP_MAX_MESSAGE_SIZE: expected an integer from 1024 to 2147483648, got "50MB""#),
        ("SMTP_TIMEOUT_SECONDS", "0", #"SMTP_TIMEOUT_SECONDS: expected an integer from 1 to 86400, got "0""#),
        ("SMTP_TIMEOUT_SECONDS", "86401", #"SMTP_TIMEOUT_SECONDS: expected an integer from 1 to 86400, got "86401""#),
        ("SMTP_HOSTNAME", "mail", #"SMTP_HOSTNAME: expected a domain name or localhost, got "mail""#),
        ("SMTP_HOSTNAME", "-bad.example.com", #"SMTP_HOSTNAME: expected a domain name or localhost, got "-bad.example.com""#),
        ("SMTP_HOSTNAME", "a..example.com", #"SMTP_HOSTNAME: expected a domain name or localhost, got "a..example.com""#),
        ("SMTP_HOSTNAME", "under_score.example", #"SMTP_HOSTNAME: expected a domain name or localhost, got "under_score.example""#),
        ("SMTP_HOSTNAME", "127.0.0.1", #"SMTP_HOSTNAME: expected a domain name or localhost, got "127.0.0.1""#),
        ("SMTP_HOSTNAME", "evil.example\r\nQUIT", #"SMTP_HOSTNAME: expected a domain name or localhost, got "evil.example\r\nQUIT""#),
        ("SMTP_DB_PATH", "a\nb", #"SMTP_DB_PATH: expected a path without control characters, got "a\nb""#),
        ("SMTP_STORAGE_TYPE", "s4", #"SMTP_STORAGE_TYPE: expected one of maildir, mbox, database, s3, timeseries, got "s4""#),
        ("SMTP_STORAGE_PATH", "x\u{7}", #"SMTP_STORAGE_PATH: expected a path without control characters, got "x\u{7}""#),
        ("SMTP_ENABLE_TLS", "maybe", #"SMTP_ENABLE_TLS: expected a boolean (true/false, 1/0, yes/no, on/off), got "maybe""#),
        ("SMTP_TLS_CERT", "a\tb", #"SMTP_TLS_CERT: expected a path without control characters, got "a\tb""#),
        ("SMTP_TLS_KEY", "a\tb", "SMTP_TLS_KEY: expected a path without control characters, got <hidden>"),
        ("SMTP_ENABLE_AUTH", "2", #"SMTP_ENABLE_AUTH: expected a boolean (true/false, 1/0, yes/no, on/off), got "2""#),
        ("SMTP_HEALTH_PORT", "http", #"SMTP_HEALTH_PORT: expected an integer from 1 to 65535, got "http""#),
        ("SMTP_HEALTH_PORT", "2525", #"SMTP_HEALTH_PORT: must differ from SMTP_PORT, got "2525""#),
        ("SMTP_METRICS_PORT", "70000", #"SMTP_METRICS_PORT: expected an integer from 1 to 65535, got "70000""#),
        ("SMTP_METRICS_PORT", "8080", #"SMTP_METRICS_PORT: must differ from SMTP_HEALTH_PORT, got "8080""#),
        ("SMTP_METRICS_PORT", "2525", #"SMTP_METRICS_PORT: must differ from SMTP_PORT, got "2525""#),
        ("SMTP_LOG_LEVEL", "warning", #"SMTP_LOG_LEVEL: expected one of debug, info, warn, error, got "warning""#),
        ("SMTP_ENABLE_SPAMASSASSIN", "enabled", #"SMTP_ENABLE_SPAMASSASSIN: expected a boolean (true/false, 1/0, yes/no, on/off), got "enabled""#),
        ("SMTP_METRICS_HOST", "metrics host", #"SMTP_METRICS_HOST: expected an IP address or a host name, got "metrics host""#),
        ("SMTP_METRICS_HOST", "300.0.0.1", #"SMTP_METRICS_HOST: expected an IP address or a host name, got "300.0.0.1""#),
        ("SMTP_SPAMASSASSIN_HOST", "spam d", #"SMTP_SPAMASSASSIN_HOST: expected an IP address or a host name, got "spam d""#),
        ("SMTP_SPAMASSASSIN_PORT", "0", #"SMTP_SPAMASSASSIN_PORT: expected an integer from 1 to 65535, got "0""#),
        ("SMTP_ENABLE_CLAMAV", "y", #"SMTP_ENABLE_CLAMAV: expected a boolean (true/false, 1/0, yes/no, on/off), got "y""#),
        ("SMTP_CLAMAV_HOST", "clam/av", #"SMTP_CLAMAV_HOST: expected an IP address or a host name, got "clam/av""#),
        ("SMTP_CLAMAV_PORT", "3310x", #"SMTP_CLAMAV_PORT: expected an integer from 1 to 65535, got "3310x""#),
        ("SMTP_LOCAL_DOMAINS", "example.com, bad_domain", #"SMTP_LOCAL_DOMAINS: expected comma-separated domain names, got "bad_domain""#),
        ("SMTP_LOCAL_DOMAINS", "example.com;example.org", #"SMTP_LOCAL_DOMAINS: expected comma-separated domain names, got "example.com;example.org""#),
        ("SMTP_SPOOL_PATH", "\u{1b}[31m", #"SMTP_SPOOL_PATH: expected a path without control characters, got "\u{1b}[31m""#),
        ("SMTP_ADMIN_USERNAME", "ad min", #"SMTP_ADMIN_USERNAME: expected 1 to 64 characters without spaces, control characters or ':', got "ad min""#),
        ("SMTP_ADMIN_USERNAME", "a:b", #"SMTP_ADMIN_USERNAME: expected 1 to 64 characters without spaces, control characters or ':', got "a:b""#),
        ("SMTP_ADMIN_PASSWORD", "pass\nword", "SMTP_ADMIN_PASSWORD: must not contain control characters, got <hidden>"),
        ("SMTP_ADMIN_EMAIL", "admin", #"SMTP_ADMIN_EMAIL: expected an email address like user@example.com, got "admin""#),
        ("SMTP_ADMIN_EMAIL", "admin@nodot", #"SMTP_ADMIN_EMAIL: expected an email address like user@example.com, got "admin@nodot""#),
        ("SMTP_MAX_RECIPIENTS", "0", #"SMTP_MAX_RECIPIENTS: expected an integer from 1 to 100000, got "0""#),
        ("SMTP_DELIVERBY_MIN_SECONDS", "-5", #"SMTP_DELIVERBY_MIN_SECONDS: expected an integer from 0 to 999999999, got "-5""#),
        ("SMTP_DELIVERBY_MIN_SECONDS", "1000000000", #"SMTP_DELIVERBY_MIN_SECONDS: expected an integer from 0 to 999999999, got "1000000000""#),
        ("SMTP_ROLE", "worker", #"SMTP_ROLE: expected one of ingress, delivery, admin, all, got "worker""#),
        ("SMTP_SHUTDOWN_GRACE_SECONDS", "3601", #"SMTP_SHUTDOWN_GRACE_SECONDS: expected an integer from 0 to 3600, got "3601""#),
        ("SMTP_QUEUE_POLL_SECONDS", "0", #"SMTP_QUEUE_POLL_SECONDS: expected an integer from 1 to 3600, got "0""#),
        ("SMTP_MAX_ATTEMPTS", "101", #"SMTP_MAX_ATTEMPTS: expected an integer from 1 to 100, got "101""#),
        ("SMTP_DATABASE_URL", "mysql://root:pw@db/mail", "SMTP_DATABASE_URL: expected postgres://user:password@host:port/database, got <hidden>"),
        ("SMTP_S3_ENDPOINT", "ftp://s3.example", #"SMTP_S3_ENDPOINT: expected an http:// or https:// URL, got "ftp://s3.example""#),
        ("SMTP_S3_ENDPOINT", "http://s3.example/path", #"SMTP_S3_ENDPOINT: expected an http:// or https:// URL of a server, without a path, got "http://s3.example/path""#),
        ("SMTP_S3_BUCKET", "Bad_Bucket", #"SMTP_S3_BUCKET: expected an S3 bucket name (3-63 of a-z 0-9 . -), got "Bad_Bucket""#),
        ("SMTP_S3_REGION", "us east", #"SMTP_S3_REGION: expected printable ASCII without spaces, got "us east""#),
        ("SMTP_S3_ACCESS_KEY", "a b", "SMTP_S3_ACCESS_KEY: expected printable ASCII without spaces, got <hidden>"),
        ("SMTP_S3_SECRET_KEY", "a b", "SMTP_S3_SECRET_KEY: expected printable ASCII without spaces, got <hidden>"),
        ("SMTP_ENCRYPTION_KEY", "c2hvcnQ=", "SMTP_ENCRYPTION_KEY: expected base64 of exactly 32 bytes (e.g. openssl rand -base64 32), got <hidden>"),
        ("SMTP_REDIS_URL", "http://:pw@redis:6379", "SMTP_REDIS_URL: expected redis://[:password@]host[:port][/db], got <hidden>"),
        ("SMTP_REDIS_URL", "redis://redis:6379/x", "SMTP_REDIS_URL: expected redis://[:password@]host[:port][/db], got <hidden>"),
        ("SMTP_REDIS_FAILURE", "fail", #"SMTP_REDIS_FAILURE: expected one of open, closed, got "fail""#),
        ("SMTP_RATE_CONNECTIONS_PER_MINUTE", "-1", #"SMTP_RATE_CONNECTIONS_PER_MINUTE: expected an integer from 0 to 1000000, got "-1""#),
        ("SMTP_RATE_COMMANDS_PER_MINUTE", "lots", #"SMTP_RATE_COMMANDS_PER_MINUTE: expected an integer from 0 to 1000000, got "lots""#),
        ("SMTP_RATE_AUTH_FAILURES_PER_HOUR", "1000001", #"SMTP_RATE_AUTH_FAILURES_PER_HOUR: expected an integer from 0 to 1000000, got "1000001""#),
        ("SMTP_RATE_MESSAGES_PER_HOUR", "2.5", #"SMTP_RATE_MESSAGES_PER_HOUR: expected an integer from 0 to 1000000, got "2.5""#),
        ("SMTP_TRUSTED_PROXIES", "10.0.0.0/8, haproxy", #"SMTP_TRUSTED_PROXIES: expected comma-separated CIDRs such as 10.0.0.0/8, 127.0.0.1/32, got "10.0.0.0/8, haproxy""#),
        ("SMTP_TRUSTED_PROXIES", "10.0.0.0/33", #"SMTP_TRUSTED_PROXIES: expected comma-separated CIDRs such as 10.0.0.0/8, 127.0.0.1/32, got "10.0.0.0/33""#),
        ("SMTP_DNS_SERVERS", "127.0.0.1, dns.example", #"SMTP_DNS_SERVERS: expected comma-separated DNS server addresses such as 192.0.2.53, 127.0.0.1:5353, [::1]:53, got "127.0.0.1, dns.example""#),
        ("SMTP_DNS_SERVERS", "127.0.0.1:0", #"SMTP_DNS_SERVERS: expected comma-separated DNS server addresses such as 192.0.2.53, 127.0.0.1:5353, [::1]:53, got "127.0.0.1:0""#),
        ("SMTP_DNS_SERVERS", "[::1]", #"SMTP_DNS_SERVERS: expected comma-separated DNS server addresses such as 192.0.2.53, 127.0.0.1:5353, [::1]:53, got "[::1]""#),
        ("SMTP_RELAY_HOST", "smtp.example.com:0", #"SMTP_RELAY_HOST: expected host or host:port, such as smtp.example.com:587 or [2001:db8::1]:25, got "smtp.example.com:0""#),
        ("SMTP_RELAY_HOST", "bad_host!", #"SMTP_RELAY_HOST: expected host or host:port, such as smtp.example.com:587 or [2001:db8::1]:25, got "bad_host!""#),
        ("SMTP_OUTBOUND_PORT", "0", #"SMTP_OUTBOUND_PORT: expected an integer from 1 to 65535, got "0""#),
        ("SMTP_OUTBOUND_REQUIRE_TLS", "sometimes", #"SMTP_OUTBOUND_REQUIRE_TLS: expected a boolean (true/false, 1/0, yes/no, on/off), got "sometimes""#),
        ("SMTP_OUTBOUND_CONCURRENCY", "0", #"SMTP_OUTBOUND_CONCURRENCY: expected an integer from 1 to 1000, got "0""#),
        ("SMTP_RETRY_SCHEDULE", "60,,300", #"SMTP_RETRY_SCHEDULE: expected comma-separated seconds from 1 to 604800, such as 60,300,1800, got "60,,300""#),
        ("SMTP_RETRY_SCHEDULE", "60,1h", #"SMTP_RETRY_SCHEDULE: expected comma-separated seconds from 1 to 604800, such as 60,300,1800, got "60,1h""#),
        ("SMTP_MAX_QUEUE_AGE_SECONDS", "59", #"SMTP_MAX_QUEUE_AGE_SECONDS: expected an integer from 60 to 2592000, got "59""#),
        ("SMTP_LEASE_SECONDS", "5", #"SMTP_LEASE_SECONDS: expected an integer from 10 to 86400, got "5""#),
        ("SMTP_WEBHOOK_URL", "ftp://hooks.example/x", #"SMTP_WEBHOOK_URL: expected an http:// or https:// URL such as https://example.com/webhook, got "ftp://hooks.example/x""#),
        ("SMTP_WEBHOOK_URL", "https:///path", #"SMTP_WEBHOOK_URL: expected an http:// or https:// URL such as https://example.com/webhook, got "https:///path""#),
        ("SMTP_WEBHOOK_URL", "https://user:pw@hooks.example/", #"SMTP_WEBHOOK_URL: expected an http:// or https:// URL such as https://example.com/webhook, got "https://user:pw@hooks.example/""#),
        ("SMTP_WEBHOOK_URL", "https://hooks.example/a b", #"SMTP_WEBHOOK_URL: expected an http:// or https:// URL such as https://example.com/webhook, got "https://hooks.example/a b""#),
        ("SMTP_WEBHOOK_EVENTS", "message.received, message.recieved", #"SMTP_WEBHOOK_EVENTS: unknown event (expected comma-separated events from message.received, message.sent, message.failed, spam.detected, virus.detected, user.created, auth.failed), got "message.recieved""#),
        ("SMTP_WEBHOOK_EVENTS", " , ", #"SMTP_WEBHOOK_EVENTS: expected at least one event from message.received, message.sent, message.failed, spam.detected, virus.detected, user.created, auth.failed, got " , ""#),
        ("SMTP_WEBHOOK_SECRET", "a\nb", "SMTP_WEBHOOK_SECRET: must not contain control characters, got <hidden>"),
        ("SMTP_WEBHOOK_RETRY_SECONDS", "0", #"SMTP_WEBHOOK_RETRY_SECONDS: expected an integer from 1 to 3600, got "0""#),
        ("SMTP_WEBHOOK_MAX_ATTEMPTS", "101", #"SMTP_WEBHOOK_MAX_ATTEMPTS: expected an integer from 1 to 100, got "101""#),
        ("SMTP_HEALTH_MIN_FREE_DISK_PERCENT", "100", #"SMTP_HEALTH_MIN_FREE_DISK_PERCENT: expected an integer from 0 to 99, got "100""#),
        ("SMTP_SPOOL_SMALL_MESSAGE_KB", "2048", #"SMTP_SPOOL_SMALL_MESSAGE_KB: expected an integer from 0 to 1024, got "2048""#),
    ]

    @Test("webhook variables: URL, events (default all), secret, retries; nothing recorded without a URL")
    func webhookVariables() throws {
        let defaults = try load([:])
        #expect(defaults.webhookURL == nil && defaults.webhookEvents == WebhookEvent.all && defaults.webhookSecret == nil)
        #expect(defaults.recordedEvents.isEmpty, "no URL: no events are written")
        #expect(defaults.webhookRetrySeconds == 10 && defaults.webhookMaxAttempts == 10)
        let config = try load([
            "SMTP_WEBHOOK_URL": " https://hooks.example.com:8443/mailtier?token=abc ",
            "SMTP_WEBHOOK_EVENTS": "message.received, Spam.Detected,,message.received",
            "SMTP_WEBHOOK_SECRET": "s3cret with spaces", "SMTP_WEBHOOK_RETRY_SECONDS": "1", "SMTP_WEBHOOK_MAX_ATTEMPTS": "3",
        ])
        #expect(config.webhookURL == "https://hooks.example.com:8443/mailtier?token=abc")
        #expect(config.webhookEvents == [.messageReceived, .spamDetected] && config.recordedEvents == [.messageReceived, .spamDetected])
        #expect(config.webhookSecret == "s3cret with spaces" && config.webhookRetrySeconds == 1 && config.webhookMaxAttempts == 3)
        #expect(try load(["SMTP_WEBHOOK_URL": "http://127.0.0.1:9000"]).recordedEvents == WebhookEvent.all)
        #expect(try Configuration.recordedEvents(from: ["SMTP_WEBHOOK_URL": "http://127.0.0.1:9000", "SMTP_WEBHOOK_EVENTS": "user.created"]) == [.userCreated])
        #expect(try Configuration.recordedEvents(from: ["SMTP_WEBHOOK_EVENTS": "user.created"]).isEmpty)
        #expect(WebhookEvent.allCases.map(\.rawValue) == [
            "message.received", "message.sent", "message.failed", "spam.detected", "virus.detected", "user.created", "auth.failed",
        ])
    }

    @Test("cluster variables: Redis URL, failure policy, limits, trusted proxies")
    func clusterVariables() throws {
        let config = try Configuration.load(from: [
            "SMTP_REDIS_URL": "redis://:s3cret@redis.internal:6380/2", "SMTP_REDIS_FAILURE": "Closed",
            "SMTP_RATE_CONNECTIONS_PER_MINUTE": "0", "SMTP_RATE_COMMANDS_PER_MINUTE": "500",
            "SMTP_RATE_AUTH_FAILURES_PER_HOUR": "3", "SMTP_RATE_MESSAGES_PER_HOUR": "1000",
            "SMTP_TRUSTED_PROXIES": " 10.0.0.0/8 ,127.0.0.1,, fd00::/8",
        ])
        #expect(config.redisURL == "redis://:s3cret@redis.internal:6380/2")
        #expect(config.redisFailure == .closed)
        #expect(config.rateLimits == RateLimits(connectionsPerMinute: 0, commandsPerMinute: 500, authFailuresPerHour: 3, messagesPerHour: 1000))
        #expect(config.trustedProxies.map(\.description) == ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"])
        let endpoint = try RedisEndpoint(url: "redis://:s3cret@redis.internal:6380/2")
        #expect(endpoint.host == "redis.internal" && endpoint.port == 6380 && endpoint.username == nil)
        #expect(endpoint.password == "s3cret" && endpoint.database == 2)
        let plain = try RedisEndpoint(url: "redis://127.0.0.1")
        #expect(plain.port == 6379 && plain.database == 0 && plain.password == nil)
        #expect(try RedisEndpoint(url: "redis://[::1]:7000").host == "::1")
        let defaults = try Configuration.load(from: [:])
        #expect(defaults.redisURL == nil && defaults.redisFailure == .open && defaults.trustedProxies.isEmpty)
    }

    @Test("SMTP_DNS_SERVERS: ip, ip:port, ipv6, [ipv6]:port; system resolver when unset")
    func dnsServers() throws {
        #expect(try load([:]).dnsServers == [])
        let config = try load(["SMTP_DNS_SERVERS": " 192.0.2.53 ,127.0.0.1:5353,,2001:db8::53, [::1]:5300"])
        #expect(config.dnsServers == [
            DNSServer(address: "192.0.2.53"), DNSServer(address: "127.0.0.1", port: 5353),
            DNSServer(address: "2001:db8::53"), DNSServer(address: "::1", port: 5300),
        ])
        #expect(config.dnsServers.map(\.description) == ["192.0.2.53:53", "127.0.0.1:5353", "[2001:db8::53]:53", "[::1]:5300"])
        for bad in ["300.1.1.1", "127.0.0.1:", "127.0.0.1:65536", "127.0.0.1:53x", "[::1]:", "[127.0.0.1]:53", "::1:53:", "a.b.c.d"] {
            #expect(DNSServer(bad) == nil, "\(bad)")
        }
    }

    @Test("delivery variables: relay host, outbound port and TLS, concurrency, retry schedule, queue age, lease")
    func deliveryVariables() throws {
        let defaults = try load([:])
        #expect(defaults.relayHost == nil && defaults.outboundPort == 25 && !defaults.outboundRequireTLS)
        #expect(defaults.outboundConcurrency == 10 && defaults.retrySchedule == [60, 300, 1800, 7200, 28800])
        #expect(defaults.maxQueueAgeSeconds == 432_000 && defaults.leaseSeconds == 300)
        let config = try load([
            "SMTP_RELAY_HOST": "Smart.Example.com:587", "SMTP_OUTBOUND_PORT": "2526", "SMTP_OUTBOUND_REQUIRE_TLS": "true",
            "SMTP_OUTBOUND_CONCURRENCY": "3", "SMTP_RETRY_SCHEDULE": " 1, 2 ,30", "SMTP_MAX_QUEUE_AGE_SECONDS": "3600",
            "SMTP_LEASE_SECONDS": "30",
        ])
        #expect(config.relayHost == RelayHost(host: "smart.example.com", port: 587))
        #expect(config.outboundPort == 2526 && config.outboundRequireTLS && config.outboundConcurrency == 3)
        #expect(config.retrySchedule == [1, 2, 30] && config.maxQueueAgeSeconds == 3600 && config.leaseSeconds == 30)
        #expect(RelayHost("[2001:db8::1]:25") == RelayHost(host: "2001:db8::1", port: 25))
        #expect(RelayHost("127.0.0.1")?.description == "127.0.0.1")
        #expect(RelayHost("[::1]:2525")?.description == "[::1]:2525")
        for bad in ["", "host:", "host:65536", "[::1", "[127.0.0.1]:25", "a b", "host:25x"] {
            #expect(RelayHost(bad) == nil, "\(bad)")
        }
    }

    @Test("S3 and storage combinations")
    func storageCombinations() throws {
        #expect(throws: ConfigurationError(variable: "SMTP_S3_BUCKET", message: "required when SMTP_STORAGE_TYPE is s3")) {
            _ = try Configuration.load(from: ["SMTP_STORAGE_TYPE": "s3"])
        }
        #expect(throws: ConfigurationError(variable: "SMTP_S3_ACCESS_KEY", message: "required when SMTP_S3_BUCKET is set")) {
            _ = try Configuration.load(from: ["SMTP_S3_BUCKET": "mail"])
        }
        let key = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="
        let config = try Configuration.load(from: [
            "SMTP_STORAGE_TYPE": "s3", "SMTP_S3_BUCKET": "mail", "SMTP_S3_ACCESS_KEY": "AK", "SMTP_S3_SECRET_KEY": "SK",
            "SMTP_S3_ENDPOINT": "http://127.0.0.1:9000/", "SMTP_ENCRYPTION_KEY": key,
            "SMTP_DATABASE_URL": "postgres://u:p@127.0.0.1:5432/mail",
        ])
        #expect(config.storageType == .s3)
        #expect(config.s3Endpoint == "http://127.0.0.1:9000")
        #expect(config.s3Region == "us-east-1")
        #expect(config.encryptionKey == key)
        #expect(config.databaseURL == "postgres://u:p@127.0.0.1:5432/mail")
    }

    @Test(arguments: Self.badValues.indices)
    func badValueGivesExactOneLineError(index: Int) {
        let (variable, value, line) = Self.badValues[index]
        do {
            _ = try Configuration.load(from: [variable: value])
            Issue.record("\(variable)=\(value) was accepted")
        } catch {
            #expect(error.variable == variable)
            #expect(error.description == line)
            #expect(!error.description.contains("\n") && !error.description.contains("\r"))
        }
    }

    @Test func everyVariableHasABadValueCase() {
        let covered = Set(Self.badValues.map(\.variable))
        for variable in Configuration.variables {
            #expect(covered.contains(variable.name), "no bad-value case for \(variable.name)")
        }
    }

    @Test func longValuesAreShortenedInErrors() {
        let line = errorLine(["SMTP_PORT": String(repeating: "9", count: 500)])
        #expect(line == "SMTP_PORT: expected an integer from 1 to 65535, got \"\(String(repeating: "9", count: 200))...\"")
    }

    @Test func secretValuesAreNeverShown() throws {
        let files = try TempFiles()
        defer { files.remove() }
        let cert = try files.file("cert.pem")
        let secretPath = files.directory + "/TOPSECRET-key.pem"
        let line = errorLine(["SMTP_ENABLE_TLS": "true", "SMTP_TLS_CERT": cert, "SMTP_TLS_KEY": secretPath])
        #expect(line == "SMTP_TLS_KEY: expected a readable file, got <hidden>")
        #expect(line?.contains("TOPSECRET") == false)

        let password = errorLine(["SMTP_ADMIN_PASSWORD": "hunter2\u{0}"])
        #expect(password == "SMTP_ADMIN_PASSWORD: must not contain control characters, got <hidden>")
        #expect(password?.contains("hunter2") == false)
    }

    @Test func tlsRequiresReadableCertificateAndKey() throws {
        let files = try TempFiles()
        defer { files.remove() }
        let cert = try files.file("cert.pem")
        let key = try files.file("key.pem")

        #expect(errorLine(["SMTP_ENABLE_TLS": "true"]) == "SMTP_TLS_CERT: required when SMTP_ENABLE_TLS is true")
        #expect(
            errorLine(["SMTP_ENABLE_TLS": "true", "SMTP_TLS_CERT": cert])
                == "SMTP_TLS_KEY: required when SMTP_ENABLE_TLS is true")
        #expect(
            errorLine(["SMTP_ENABLE_TLS": "true", "SMTP_TLS_KEY": key])
                == "SMTP_TLS_CERT: required when SMTP_ENABLE_TLS is true")
        #expect(
            errorLine(["SMTP_ENABLE_TLS": "true", "SMTP_TLS_CERT": files.directory + "/nope.pem", "SMTP_TLS_KEY": key])
                == "SMTP_TLS_CERT: expected a readable file, got \"\(files.directory)/nope.pem\"")
        // A directory is not a certificate file.
        #expect(
            errorLine(["SMTP_ENABLE_TLS": "true", "SMTP_TLS_CERT": files.directory, "SMTP_TLS_KEY": key])
                == "SMTP_TLS_CERT: expected a readable file, got \"\(files.directory)\"")

        let config = try load(["SMTP_ENABLE_TLS": "yes", "SMTP_TLS_CERT": cert, "SMTP_TLS_KEY": key])
        #expect(config.enableTLS)
        #expect(config.tlsCert == cert)
        #expect(config.tlsKey == key)
    }

    @Test func localDomains() throws {
        #expect(try load(["SMTP_LOCAL_DOMAINS": "example.com"]).localDomains == ["example.com"])
        #expect(try load(["SMTP_LOCAL_DOMAINS": " A.Example.COM ,b.example.org"]).localDomains == ["a.example.com", "b.example.org"])
        #expect(try load(["SMTP_LOCAL_DOMAINS": "localhost,example.com,EXAMPLE.com"]).localDomains == ["localhost", "example.com"])
        #expect(try load(["SMTP_LOCAL_DOMAINS": ","]).localDomains == [])

        let config = try load(["SMTP_LOCAL_DOMAINS": "example.com,mail.example.org"])
        #expect(config.isLocalDomain("example.com"))
        #expect(config.isLocalDomain("EXAMPLE.Com"))
        #expect(config.isLocalDomain("Mail.Example.Org."))
        #expect(!config.isLocalDomain("sub.example.com"))
        #expect(!config.isLocalDomain("example.net"))
        #expect(!config.isLocalDomain(""))
        #expect(!Configuration().isLocalDomain("localhost"))
    }

    @Test func valuesAreTrimmedForNumbersBooleansAndChoices() throws {
        let config = try load(["SMTP_PORT": " 25 ", "SMTP_ENABLE_AUTH": "\tfalse", "SMTP_ROLE": "Ingress "])
        #expect(config.port == 25)
        #expect(config.enableAuth == false)
        #expect(config.role == .ingress)
    }

    @Test func helpTextListsEveryVariableInColumns() {
        let text = Configuration.helpText
        let lines = text.split(separator: "\n").map(String.init)
        var descriptionColumn: Int?
        for variable in Configuration.variables {
            let line = lines.first { $0.hasPrefix("  \(variable.name) ") }
            guard let line else {
                Issue.record("\(variable.name) missing from help")
                continue
            }
            #expect(line.contains(" \(variable.defaultValue) "), "\(line)")
            let column = line.range(of: variable.summary)!.lowerBound.utf16Offset(in: line)
            if let descriptionColumn { #expect(column == descriptionColumn, "\(line)") }
            descriptionColumn = column
        }
        for name in [
            "SMTP_PORT", "SMTP_HOST", "SMTP_MAX_CONNECTIONS", "SMTP_MAX_MESSAGE_SIZE", "SMTP_TIMEOUT_SECONDS",
            "SMTP_HOSTNAME", "SMTP_DB_PATH", "SMTP_STORAGE_TYPE", "SMTP_STORAGE_PATH", "SMTP_ENABLE_TLS",
            "SMTP_TLS_CERT", "SMTP_TLS_KEY", "SMTP_ENABLE_AUTH", "SMTP_HEALTH_PORT", "SMTP_METRICS_PORT",
            "SMTP_METRICS_HOST", "SMTP_LOG_LEVEL", "SMTP_ENABLE_SPAMASSASSIN", "SMTP_SPAMASSASSIN_HOST", "SMTP_SPAMASSASSIN_PORT",
            "SMTP_ENABLE_CLAMAV", "SMTP_CLAMAV_HOST", "SMTP_CLAMAV_PORT", "SMTP_LOCAL_DOMAINS", "SMTP_SPOOL_PATH",
            "SMTP_ADMIN_USERNAME", "SMTP_ADMIN_PASSWORD", "SMTP_ADMIN_EMAIL", "SMTP_MAX_RECIPIENTS",
            "SMTP_DELIVERBY_MIN_SECONDS", "SMTP_ROLE", "SMTP_SHUTDOWN_GRACE_SECONDS", "SMTP_QUEUE_POLL_SECONDS",
            "SMTP_MAX_ATTEMPTS", "SMTP_DATABASE_URL", "SMTP_S3_ENDPOINT", "SMTP_S3_BUCKET", "SMTP_S3_REGION",
            "SMTP_S3_ACCESS_KEY", "SMTP_S3_SECRET_KEY", "SMTP_ENCRYPTION_KEY",
            "SMTP_REDIS_URL", "SMTP_REDIS_FAILURE", "SMTP_RATE_CONNECTIONS_PER_MINUTE", "SMTP_RATE_COMMANDS_PER_MINUTE",
            "SMTP_RATE_AUTH_FAILURES_PER_HOUR", "SMTP_RATE_MESSAGES_PER_HOUR", "SMTP_TRUSTED_PROXIES",
            "SMTP_DNS_SERVERS", "SMTP_RELAY_HOST", "SMTP_OUTBOUND_PORT", "SMTP_OUTBOUND_REQUIRE_TLS",
            "SMTP_OUTBOUND_CONCURRENCY", "SMTP_RETRY_SCHEDULE", "SMTP_MAX_QUEUE_AGE_SECONDS", "SMTP_LEASE_SECONDS",
            "SMTP_WEBHOOK_URL", "SMTP_WEBHOOK_EVENTS", "SMTP_WEBHOOK_SECRET", "SMTP_WEBHOOK_RETRY_SECONDS",
            "SMTP_WEBHOOK_MAX_ATTEMPTS", "SMTP_HEALTH_MIN_FREE_DISK_PERCENT", "SMTP_SPOOL_SMALL_MESSAGE_KB",
        ] {
            #expect(Configuration.variables.contains { $0.name == name }, "\(name)")
        }
        #expect(Configuration.variables.count == 63)
    }
}
