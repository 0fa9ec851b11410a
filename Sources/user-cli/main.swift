// user-cli: account management on the server's database (API.md, "CLI Tools"): PostgreSQL when
// SMTP_DATABASE_URL is set, as the server, else SQLite.
//
// Environment: SMTP_DATABASE_URL, SMTP_DB_PATH (default smtp.db), SMTP_STORAGE_PATH (default
// /var/mail, for "Used:" in `info`). Errors: one line "user-cli: <message>" on stderr; exit 1 for
// runtime errors, 2 for usage errors. Passwords are never printed.

#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import MailTier
import MailTierArgon2
import MailTierBootstrap
import MailTierFiles
import MailTierPostgres
import MailTierSQLite
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

let usage = """
    Usage: user-cli <command> [arguments]

    Commands:
      create <username> <email> <password>       Create a user (quota 1000 MB)
      list [--limit N]                           List users (N: 1 to 1000, default 100)
      update-password <username> <new_password>  Change a user's password
      set-quota <username> <quota_mb>            Set a user's quota (0 to 1048576 MB)
      delete <username>                          Delete a user
      verify <username> <password>               Check a user's password
      info <username>                            Show a user's details
      --help                                     Show this help

    Environment:
      SMTP_DATABASE_URL  PostgreSQL URL (postgres://user:password@host:port/db), as the server
      SMTP_DB_PATH       SQLite database file, without SMTP_DATABASE_URL (default: smtp.db)
      SMTP_STORAGE_PATH  Mail storage directory (default: /var/mail)
      SMTP_WEBHOOK_URL   As the server: when set, `create` records a user.created webhook event
      SMTP_WEBHOOK_EVENTS  As the server (default: all events)

    """

/// Ends the run with a message on stderr and an exit code.
struct Failure: Error {
    var message: String
    var exitCode: Int32
    /// Usage errors also print the usage block.
    var showUsage: Bool

    static func runtime(_ message: String) -> Failure { Failure(message: message, exitCode: 1, showUsage: false) }
    static func usage(_ message: String) -> Failure { Failure(message: message, exitCode: 2, showUsage: true) }
}

func writeStderr(_ text: String) {
    var text = text
    text.withUTF8 { bytes in
        var offset = 0
        while offset < bytes.count {
            let written = write(2, bytes.baseAddress! + offset, bytes.count - offset)
            if written <= 0 { break }
            offset += written
        }
    }
}

func environment(_ name: String, default value: String) -> String {
    guard let raw = getenv(name) else { return value }
    let text = String(cString: raw)
    return text.isEmpty ? value : text
}

/// `YYYY-MM-DD` or `YYYY-MM-DD HH:MM:SS`, in UTC.
func utc(_ date: Date, withTime: Bool) -> String {
    var seconds = time_t(date.timeIntervalSince1970.rounded(.down))
    var parts = tm()
    guard gmtime_r(&seconds, &parts) != nil else { return "?" }
    func two(_ value: Int32) -> String { value < 10 ? "0\(value)" : "\(value)" }
    let day = "\(parts.tm_year + 1900)-\(two(parts.tm_mon + 1))-\(two(parts.tm_mday))"
    guard withTime else { return day }
    return "\(day) \(two(parts.tm_hour)):\(two(parts.tm_min)):\(two(parts.tm_sec))"
}

/// One decimal, rounded half away from zero: 234.46 → "234.5".
func oneDecimal(_ value: Double) -> String {
    let tenths = Int64((value * 10).rounded())
    let sign = tenths < 0 ? "-" : ""
    let magnitude = tenths.magnitude
    return "\(sign)\(magnitude / 10).\(magnitude % 10)"
}

func parseInt(_ text: String, what: String) throws(Failure) -> Int {
    guard let value = Int(text) else { throw .runtime("invalid \(what): \(text)") }
    return value
}

func expect(_ arguments: ArraySlice<String>, count: Int, command: String) throws(Failure) {
    guard arguments.count == count else {
        throw .usage("\(command): expected \(count) argument\(count == 1 ? "" : "s"), got \(arguments.count)")
    }
}

/// Nothing from the libraries reaches the terminal: errors are reported as one line.
let quietLogger: Logger = {
    var logger = Logger(label: "user-cli")
    logger.logLevel = .critical
    return logger
}()

/// The server's database: PostgreSQL when SMTP_DATABASE_URL is set, else the SQLite file at
/// SMTP_DB_PATH (created if missing).
func openDatabase(threadPool: NIOThreadPool) throws(Failure) -> Storage.Database {
    let url = environment("SMTP_DATABASE_URL", default: "")
    if !url.isEmpty {
        do {
            return .postgres(try PostgresDatabase(url: url, logger: quietLogger))
        } catch {
            throw .runtime("SMTP_DATABASE_URL: \(error)")
        }
    }
    let dbPath = environment("SMTP_DB_PATH", default: "smtp.db")
    do {
        return .sqlite(try SQLiteDatabase(path: dbPath, threadPool: threadPool))
    } catch let error as SQLiteError {
        throw .runtime("cannot open database \(dbPath): \(error.message)")
    } catch {
        throw .runtime("cannot open database \(dbPath): \(error)")
    }
}

/// The mailbox storage the server uses, from the same environment (`SMTP_STORAGE_TYPE`, …).
func storage(database: Storage.Database, threadPool: NIOThreadPool) throws(Failure) -> Storage {
    do {
        let configuration = try Configuration.load(from: ProcessInfo.processInfo.environment)
        return try Storage(
            configuration: configuration, database: database, threadPool: threadPool, logger: quietLogger, creatingSpool: false)
    } catch {
        throw .runtime("\(error)")
    }
}

/// Runs one command; returns its stdout.
func run(_ arguments: [String], threadPool: NIOThreadPool) async throws(Failure) -> String {
    guard let command = arguments.first else { throw .usage("missing command") }
    let rest = arguments.dropFirst()
    if command == "--help" || command == "-h" || command == "help" { return usage }

    let known = ["create", "list", "update-password", "set-quota", "delete", "verify", "info"]
    guard known.contains(command) else { throw .usage("unknown command: \(AccountError.sanitized(command))") }

    // Check the arguments before touching the database.
    var limit = 100
    switch command {
    case "create": try expect(rest, count: 3, command: command)
    case "update-password", "set-quota", "verify": try expect(rest, count: 2, command: command)
    case "delete", "info": try expect(rest, count: 1, command: command)
    case "list":
        let options = Array(rest)
        if options.isEmpty {
            break
        } else if options.count == 2, options[0] == "--limit" {
            limit = try parseInt(options[1], what: "limit")
        } else if options.count == 1, options[0].hasPrefix("--limit=") {
            limit = try parseInt(String(options[0].dropFirst("--limit=".count)), what: "limit")
        } else {
            throw .usage("list: expected [--limit N]")
        }
        guard (1...1000).contains(limit) else { throw .runtime("invalid limit: \(limit) (must be 1 to 1000)") }
    default: break
    }
    var quota = 0
    if command == "set-quota" {
        quota = try parseInt(rest[rest.startIndex + 1], what: "quota")
    }

    // `create` writes `user.created` into the webhook outbox when the server would send it.
    let recording: Set<WebhookEvent>
    do {
        recording = try Configuration.recordedEvents(from: ProcessInfo.processInfo.environment)
    } catch {
        throw .runtime(error.description)
    }
    let database = try openDatabase(threadPool: threadPool)
    let accounts = AccountService(users: database.users(recording: recording), hasher: Argon2idHasher(threadPool: threadPool))
    do {
        return try await database.withRunning(migration: .first, logger: quietLogger) { [limit, quota] in
            try await execute(command, Array(rest), limit: limit, quota: quota, accounts: accounts, database: database, threadPool: threadPool)
        }
    } catch let failure as Failure {
        throw failure
    } catch let error as AccountError {
        throw .runtime(error.description)
    } catch let error as SQLiteError {
        throw .runtime("database error: \(error.message)")
    } catch let error as PostgresDatabaseError {
        throw .runtime("database error: \(error)")
    } catch {
        throw .runtime("\(error)")
    }
}

/// A checked command, with the database running.
func execute(
    _ command: String, _ a: [String], limit: Int, quota: Int, accounts: AccountService, database: Storage.Database,
    threadPool: NIOThreadPool
) async throws -> String {
    switch command {
    case "create":
        let user = try await accounts.create(username: a[0], email: a[1], password: a[2])
        return """
            User created successfully:
              Username: \(user.username)
              Email: \(user.email)
              ID: \(user.id)

            """
    case "list":
        let (users, total) = try await accounts.list(offset: 0, limit: limit)
        var out = "Users:\n"
        for user in users {
            out += "  \(user.id). \(user.username) (\(user.email)) - Created: \(utc(user.createdAt, withTime: false))\n"
        }
        out += "Total: \(total)\n"
        return out
    case "update-password":
        try await accounts.setPassword(username: a[0], password: a[1])
        return "Password updated successfully for user: \(a[0])\n"
    case "set-quota":
        try await accounts.setQuota(username: a[0], quotaMB: quota)
        return "Quota set to \(quota) MB for user: \(a[0])\n"
    case "delete":
        // The account and all its mail (API.md: "Delete a user and all their data").
        let user = try await accounts.info(username: a[0])
        let storage = try storage(database: database, threadPool: threadPool)
        try await accounts.delete(username: a[0])
        do {
            try await storage.closingClients { try await storage.mailboxes.deleteMailbox(user.email) }
        } catch {
            throw Failure.runtime("user \(a[0]) deleted, but the mailbox \(user.email) could not be removed: \(error)")
        }
        return "User deleted successfully: \(a[0])\n"
    case "verify":
        // An administrator's check, not a login: last_login is left alone.
        guard try await accounts.authenticate(login: a[0], password: a[1], recordLogin: false) != nil else {
            throw Failure.runtime("authentication failed for user: \(AccountError.sanitized(a[0]))")
        }
        return "Authentication successful for user: \(a[0])\n"
    case "info":
        let user = try await accounts.info(username: a[0])
        let storage = try storage(database: database, threadPool: threadPool)
        let usedBytes = try await storage.closingClients { try await storage.mailboxes.usageBytes(of: user.email) }
        let usedMB = Double(usedBytes) / 1_048_576
        let percent = user.quotaMB > 0 ? usedMB / Double(user.quotaMB) * 100 : 0
        return """
            User Information:
              Username: \(user.username)
              Email: \(user.email)
              ID: \(user.id)
              Created: \(utc(user.createdAt, withTime: true))
              Last Login: \(user.lastLogin.map { utc($0, withTime: true) } ?? "Never")
              Quota: \(user.quotaMB) MB
              Used: \(oneDecimal(usedMB)) MB (\(oneDecimal(percent))%)
              Status: \(user.enabled ? "Enabled" : "Disabled")

            """
    default:
        throw Failure.usage("unknown command: \(command)")
    }
}

let threadPool = NIOThreadPool(numberOfThreads: 2)
threadPool.start()
var exitCode: Int32 = 0
do {
    let output = try await run(Array(CommandLine.arguments.dropFirst()), threadPool: threadPool)
    print(output, terminator: "")
} catch {
    writeStderr("user-cli: \(error.message)\n")
    if error.showUsage { writeStderr("\n" + usage) }
    exitCode = error.exitCode
}
try? await threadPool.shutdownGracefully()
exit(exitCode)
