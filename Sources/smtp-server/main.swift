// smtp-server: reads the configuration, builds the adapters, runs the roles in one ServiceGroup.
#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Logging
import MailTier
import MailTierArgon2
import MailTierFiles
import MailTierPostgres
import MailTierS3
import MailTierSQLite
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
if let unknown = arguments.first {
    fail("unknown argument \(unknown) (see smtp-server --help)")
}

let configuration: Configuration
do {
    configuration = try Configuration.load(from: ProcessInfo.processInfo.environment)
} catch {
    fail(error.description)
}
guard configuration.role == .all || configuration.role == .ingress || configuration.role == .delivery else {
    fail("SMTP_ROLE: \"\(configuration.role.rawValue)\" is not available in this version (all, ingress, delivery are)")
}

let logLevel = configuration.loggerLevel
LoggingSystem.bootstrap { label in
    var handler = StreamLogHandler.standardOutput(label: label)
    handler.logLevel = logLevel
    return handler
}
let logger = Logger(label: "mailtier")

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

let database: SQLiteDatabase
do {
    database = try SQLiteDatabase(path: configuration.dbPath, threadPool: threadPool)
} catch {
    fail("SMTP_DB_PATH: cannot open \(configuration.dbPath): \(error)", code: 1)
}

// PostgreSQL, when configured: its client runs for the life of the process.
let postgres: PostgresDatabase?
do {
    postgres = try configuration.databaseURL.map { try PostgresDatabase(url: $0, logger: logger) }
} catch {
    fail("SMTP_DATABASE_URL: \(error)")
}

// S3, when a bucket is configured: the spool lives there, and the s3 mailbox store.
let s3: S3Client?
if let bucket = configuration.s3Bucket, let accessKey = configuration.s3AccessKey, let secretKey = configuration.s3SecretKey {
    s3 = S3Client(
        configuration: S3Configuration(
            endpoint: configuration.s3Endpoint, region: configuration.s3Region, accessKey: accessKey, secretKey: secretKey,
            bucket: bucket),
        logger: logger)
} else {
    s3 = nil
}

let spool: any BlobStore
if let s3 {
    spool = S3BlobStore(client: s3)
} else {
    do {
        spool = try SpoolBlobStore(directory: configuration.spoolPath, threadPool: threadPool)
    } catch {
        fail("SMTP_SPOOL_PATH: cannot use \(configuration.spoolPath): \(error)", code: 1)
    }
}

var hostnameBuffer = [CChar](repeating: 0, count: 256)
gethostname(&hostnameBuffer, 255)
let machineName = String(decoding: hostnameBuffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)

/// The index of stores that keep content elsewhere: the `messages` table.
let mailboxIndex: any MailboxIndex = postgres.map { PostgresMailboxStore(database: $0) } ?? SQLiteMailboxStore(database: database)
let mailboxes: any MailboxStore
switch configuration.storageType {
case .maildir:
    mailboxes = MaildirStore(
        root: configuration.storagePath, hostname: machineName.isEmpty ? configuration.hostname : machineName, threadPool: threadPool)
case .mbox:
    mailboxes = MboxStore(root: configuration.storagePath, threadPool: threadPool)
case .database:
    mailboxes = postgres.map { PostgresMailboxStore(database: $0) } ?? SQLiteMailboxStore(database: database)
case .timeseries:
    var key: SealingKey?
    if let text = configuration.encryptionKey {
        do { key = try SealedFile.key(fromBase64: text) } catch { fail("SMTP_ENCRYPTION_KEY: \(error)") }
    }
    mailboxes = IndexedMailboxStore(
        index: mailboxIndex, content: TimeSeriesContentStore(root: configuration.storagePath, encryptionKey: key, threadPool: threadPool))
case .s3:
    guard let s3 else { fail("SMTP_S3_BUCKET: required when SMTP_STORAGE_TYPE is s3") }
    mailboxes = IndexedMailboxStore(index: mailboxIndex, content: S3MessageContentStore(client: s3))
}
let accounts = AccountService(users: SQLiteUserStore(database: database), hasher: Argon2idHasher(threadPool: threadPool))
let queue = SQLiteMessageQueue(database: database)

do {
    if let password = try await accounts.ensureAdmin(
        username: configuration.adminUsername, email: configuration.adminEmail, password: configuration.adminPassword)
    {
        FileHandle.standardOutput.write(Data("Created admin user '\(configuration.adminUsername)' with password: \(password)\n".utf8))
    }
} catch {
    fail("cannot create the first admin user \(configuration.adminUsername): \(error)", code: 1)
}

// Temporary files of puts interrupted by a crash; their messages were never acknowledged.
if let directorySpool = spool as? SpoolBlobStore {
    _ = try? await directorySpool.removeStaleTemporaryFiles(olderThan: .seconds(3600))
}
let quota = QuotaChecker(mailboxes: mailboxes)

let doorbell = Doorbell()
var services: [any Service] = []
if configuration.role == .all || configuration.role == .ingress {
    let ingress = IngressService(
        configuration: configuration, accounts: accounts, queue: queue, spool: spool,
        newMail: configuration.role == .all ? doorbell : nil, quota: quota, logger: logger)
    services.append(
        SMTPServer(
            configuration: .init(
                host: configuration.host, port: configuration.port, maxConnections: configuration.maxConnections,
                idleTimeout: .seconds(Int64(configuration.timeoutSeconds)),
                shutdownGrace: .seconds(Int64(configuration.shutdownGraceSeconds)),
                session: SMTPServerConfiguration(
                    hostname: configuration.hostname, maxMessageSize: configuration.maxMessageSize,
                    maxRecipients: configuration.maxRecipients, tlsAvailable: tlsContext != nil,
                    authRequired: configuration.enableAuth, deliverByMinimum: configuration.deliverByMinSeconds)),
            delegate: ingress, tlsContext: tlsContext, logger: logger))
}
if configuration.role == .all || configuration.role == .delivery {
    services.append(
        DeliveryService(
            queue: queue, spool: spool, mailboxes: mailboxes,
            settings: .init(exclusive: configuration.role == .all, pollInterval: .seconds(configuration.queuePollSeconds)),
            doorbell: doorbell, quota: (accounts.users, quota), logger: logger))
}

let group = ServiceGroup(
    configuration: .init(
        services: services.map { ServiceGroupConfiguration.ServiceConfiguration(service: $0) },
        gracefulShutdownSignals: [.sigterm, .sigint],
        logger: logger))
/// Runs the services; PostgreSQL's client runs beside them (migrated first) until they stop.
func runServices(postgres: PostgresDatabase?) async throws {
    guard let postgres else { return try await group.run() }
    try await withThrowingTaskGroup(of: Void.self) { tasks in
        tasks.addTask { await postgres.run() }
        do {
            try await postgres.migrate()
        } catch {
            fail("SMTP_DATABASE_URL: cannot migrate the database: \(error)", code: 1)
        }
        try await group.run()
        tasks.cancelAll()
    }
}

var exitCode: Int32 = 0
do {
    try await runServices(postgres: postgres)
} catch {
    logger.error("stopped with an error", metadata: ["error": "\(error)"])
    exitCode = 1
}
try? await s3?.shutdown()
try? await threadPool.shutdownGracefully()
logger.info("stopped")
exit(exitCode)
