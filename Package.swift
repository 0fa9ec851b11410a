// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "MailTier",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "smtp-server", targets: ["smtp-server"]),
        .executable(name: "user-cli", targets: ["user-cli"]),
        .executable(name: "mailtier-load", targets: ["mailtier-load"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", from: "4.5.2"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/vapor/postgres-nio.git", from: "1.33.2"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
    ],
    targets: [
        // C libraries, through the system's -dev packages.
        .systemLibrary(name: "CSQLite", providers: [.apt(["libsqlite3-dev"])]),
        .systemLibrary(name: "CArgon2", pkgConfig: "libargon2", providers: [.apt(["libargon2-dev"])]),
        // No pkgConfig: hiredis's .pc file carries -D_FILE_OFFSET_BITS=64, which SwiftPM refuses.
        .systemLibrary(name: "CHiredis", providers: [.apt(["libhiredis-dev"])]),
        .systemLibrary(name: "CAres", pkgConfig: "libcares", providers: [.apt(["libc-ares-dev"])]),

        // 1. Pure SMTP: grammar, replies, state machines. NIOCore only (ByteBuffer).
        .target(name: "SMTPProtocol", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
        ]),
        // 2. Channel handlers: framing, the server handler, STARTTLS, timeouts.
        .target(name: "SMTPNIO", dependencies: [
            "SMTPProtocol",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "NIOTLS", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        // 3. The domain: model, ports, configuration, role services.
        .target(name: "MailTier", dependencies: [
            "SMTPProtocol", "SMTPNIO",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "Metrics", package: "swift-metrics"),
        ]),
        // 4. Adapters.
        .target(name: "MailTierSQLite", dependencies: [
            "MailTier", "CSQLite",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .target(name: "MailTierFiles", dependencies: [
            "MailTier",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .target(name: "MailTierS3", dependencies: [
            "MailTier",
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .target(name: "MailTierPostgres", dependencies: [
            "MailTier",
            .product(name: "PostgresNIO", package: "postgres-nio"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        .target(name: "MailTierRedis", dependencies: [
            "MailTier", "CHiredis",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        .target(name: "MailTierArgon2", dependencies: [
            "MailTier", "CArgon2",
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .target(name: "MailTierDNS", dependencies: [
            "MailTier", "CAres",
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .target(name: "MailTierOutbound", dependencies: [
            "MailTier", "SMTPNIO", "SMTPProtocol",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOSSL", package: "swift-nio-ssl"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        // Webhooks: posts the `events` outbox over HTTP(S), signed (HMAC-SHA256).
        .target(name: "MailTierWebhooks", dependencies: [
            "MailTier",
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        // Wiring shared by the executables: which adapters a configuration selects.
        .target(name: "MailTierBootstrap", dependencies: [
            "MailTier", "MailTierSQLite", "MailTierFiles", "MailTierS3", "MailTierPostgres", "MailTierRedis",
            .product(name: "Logging", package: "swift-log"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "PostgresNIO", package: "postgres-nio"),
        ]),
        // 5. The HTTP side: GET /health (every role), later the admin REST API.
        .target(name: "AdminAPI", dependencies: [
            "MailTier",
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "Crypto", package: "swift-crypto"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Metrics", package: "swift-metrics"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
        ]),
        // 6. Executables: thin.
        .executableTarget(name: "smtp-server", dependencies: [
            "MailTier", "MailTierBootstrap", "AdminAPI", "MailTierSQLite", "MailTierFiles", "MailTierArgon2", "MailTierS3", "MailTierPostgres",
            "MailTierRedis", "SMTPNIO", "MailTierDNS", "MailTierOutbound", "MailTierWebhooks",
            .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            .product(name: "Metrics", package: "swift-metrics"),
        ]),
        .executableTarget(name: "user-cli", dependencies: [
            "MailTier", "MailTierBootstrap", "MailTierSQLite", "MailTierFiles", "MailTierArgon2", "MailTierPostgres",
            .product(name: "Logging", package: "swift-log"),
        ]),
        // The benchmarks' load generator (bench/run.py): SMTP transactions timed one by one.
        // NIO only, no project module, so it measures any server the same way.
        .executableTarget(name: "mailtier-load", dependencies: [
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),

        .testTarget(name: "SMTPProtocolTests", dependencies: ["SMTPProtocol"]),
        .testTarget(name: "SMTPNIOTests", dependencies: [
            "SMTPNIO",
            .product(name: "NIOEmbedded", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "InMemoryLogging", package: "swift-log"),
        ]),
        .testTarget(name: "MailTierTests", dependencies: [
            "MailTier", "MailTierSQLite", "MailTierFiles", "MailTierArgon2", "MailTierS3", "MailTierPostgres",
            .product(name: "PostgresNIO", package: "postgres-nio"),
            .product(name: "MetricsTestKit", package: "swift-metrics"),
        ]),
        .testTarget(name: "MailTierS3Tests", dependencies: ["MailTierS3", "MailTier"]),
        .testTarget(name: "MailTierPostgresTests", dependencies: ["MailTierPostgres", "MailTier"]),
        .testTarget(name: "MailTierRedisTests", dependencies: [
            "MailTierRedis", "MailTier",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOEmbedded", package: "swift-nio"),
            .product(name: "MetricsTestKit", package: "swift-metrics"),
            .product(name: "Logging", package: "swift-log"),
            .product(name: "InMemoryLogging", package: "swift-log"),
        ]),
        .testTarget(name: "AdminAPITests", dependencies: [
            "AdminAPI", "MailTier", "MailTierSQLite", "MailTierFiles", "MailTierArgon2",
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "Prometheus", package: "swift-prometheus"),
            .product(name: "Hummingbird", package: "hummingbird"),
            .product(name: "HummingbirdTesting", package: "hummingbird"),
        ]),
        .testTarget(name: "MailTierWebhooksTests", dependencies: [
            "MailTierWebhooks", "MailTier",
            .product(name: "AsyncHTTPClient", package: "async-http-client"),
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "MailTierDNSTests", dependencies: [
            "MailTierDNS", "MailTier",
            .product(name: "NIOPosix", package: "swift-nio"),
        ]),
        .testTarget(name: "MailTierOutboundTests", dependencies: [
            "MailTierOutbound", "MailTierDNS", "MailTier", "SMTPNIO", "SMTPProtocol",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "IntegrationTests", dependencies: [], exclude: ["Support"]),
    ],
    swiftLanguageModes: [.v6]
)
