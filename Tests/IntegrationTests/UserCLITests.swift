import Foundation
import Testing

// Black-box tests of the built `user-cli` executable (API.md, "CLI Tools"): exact stdout,
// stderr and exit codes, against a temporary SMTP_DB_PATH and SMTP_STORAGE_PATH. The
// `sqlite3` command-line tool sets the columns the CLI cannot (created_at, last_login,
// enabled) so that the document's sample output can be reproduced exactly.

private struct CLIResult: Sendable {
    var status: Int32
    var stdout: String
    var stderr: String

    var stderrLines: [String] { stderr.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) }
}

private struct CLIError: Error, CustomStringConvertible {
    var description: String
}

/// A temporary directory holding `smtp.db` and the `mail` storage directory.
private final class Sandbox: Sendable {
    let directory: String
    var database: String { directory + "/smtp.db" }
    var storage: String { directory + "/mail" }

    init() throws {
        let template = FileManager.default.temporaryDirectory.appendingPathComponent("mailtier-user-cli-XXXXXX").path
        var bytes = Array(template.utf8CString)
        guard let made = mkdtemp(&bytes) else { throw CLIError(description: "mkdtemp failed") }
        directory = String(cString: made)
    }

    deinit {
        try? FileManager.default.removeItem(atPath: directory)
    }

    /// Runs user-cli with SMTP_DB_PATH and SMTP_STORAGE_PATH pointing into the sandbox
    /// (unless `environment` overrides them; a nil value removes the variable).
    func cli(_ arguments: String..., environment: [String: String?] = [:], in workingDirectory: String? = nil)
        async throws -> CLIResult
    {
        var env = ProcessInfo.processInfo.environment
        env["SMTP_DB_PATH"] = database
        env["SMTP_STORAGE_PATH"] = storage
        for (key, value) in environment { env[key] = value }
        return try await run(
            userCLI(), arguments, environment: env, workingDirectory: workingDirectory ?? directory)
    }

    /// Runs an SQL statement on the sandbox's database with the sqlite3 tool.
    func sql(_ statement: String) async throws {
        let result = try await run(
            "/usr/bin/env", ["sqlite3", database, statement], environment: ProcessInfo.processInfo.environment,
            workingDirectory: directory)
        guard result.status == 0 else { throw CLIError(description: "sqlite3 failed: \(result.stderr)") }
    }
}

private func userCLI() throws -> String {
    let path = binaryPath("user-cli")
    guard FileManager.default.isExecutableFile(atPath: path) else {
        throw CLIError(description: "user-cli not found at \(path); build it first (swift build)")
    }
    return path
}

/// Runs a process to completion without blocking a concurrency thread; output goes through
/// files (no pipe can fill up).
private func run(_ executable: String, _ arguments: [String], environment: [String: String], workingDirectory: String)
    async throws -> CLIResult
{
    let outURL = FileManager.default.temporaryDirectory.appendingPathComponent("user-cli-\(UUID().uuidString).out")
    let errURL = FileManager.default.temporaryDirectory.appendingPathComponent("user-cli-\(UUID().uuidString).err")
    guard FileManager.default.createFile(atPath: outURL.path, contents: nil),
        FileManager.default.createFile(atPath: errURL.path, contents: nil)
    else { throw CLIError(description: "cannot create output files in \(FileManager.default.temporaryDirectory.path)") }
    defer {
        try? FileManager.default.removeItem(at: outURL)
        try? FileManager.default.removeItem(at: errURL)
    }
    let outHandle = try FileHandle(forWritingTo: outURL)
    let errHandle = try FileHandle(forWritingTo: errURL)

    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    process.environment = environment
    process.currentDirectoryURL = URL(fileURLWithPath: workingDirectory)
    process.standardInput = FileHandle.nullDevice
    process.standardOutput = outHandle
    process.standardError = errHandle

    let status: Int32 = try await withCheckedThrowingContinuation { continuation in
        process.terminationHandler = { process in
            continuation.resume(returning: process.terminationStatus)
        }
        do {
            try process.run()
        } catch {
            process.terminationHandler = nil
            continuation.resume(throwing: error)
        }
    }
    try outHandle.close()
    try errHandle.close()
    let stdout = String(decoding: try Data(contentsOf: outURL), as: UTF8.self)
    let stderr = String(decoding: try Data(contentsOf: errURL), as: UTF8.self)
    return CLIResult(status: status, stdout: stdout, stderr: stderr)
}

private func utc(_ date: Date, _ format: String) -> String {
    let formatter = DateFormatter()
    formatter.locale = Locale(identifier: "en_US_POSIX")
    formatter.timeZone = TimeZone(identifier: "UTC")
    formatter.dateFormat = format
    return formatter.string(from: date)
}

/// The stdout of a successful `create`.
private func created(_ username: String, _ email: String, id: Int) -> String {
    "User created successfully:\n  Username: \(username)\n  Email: \(email)\n  ID: \(id)\n"
}

/// Asserts a runtime or usage failure: the first stderr line, the exit code, empty stdout.
private func expectFailure(
    _ result: CLIResult, _ message: String, status: Int32 = 1, sourceLocation: SourceLocation = #_sourceLocation
) {
    #expect(result.status == status, sourceLocation: sourceLocation)
    #expect(result.stdout == "", sourceLocation: sourceLocation)
    #expect(result.stderrLines.first == "user-cli: \(message)", sourceLocation: sourceLocation)
    if status == 1 {
        #expect(result.stderr == "user-cli: \(message)\n", "runtime errors are one line", sourceLocation: sourceLocation)
    } else {
        #expect(result.stderr.contains("Usage: user-cli"), "usage errors show the usage", sourceLocation: sourceLocation)
    }
}

@Suite struct UserCLITests {
    @Test func helpAndUsageErrors() async throws {
        let sandbox = try Sandbox()
        for flag in ["--help", "-h", "help"] {
            let help = try await sandbox.cli(flag)
            #expect(help.status == 0)
            #expect(help.stderr == "")
            #expect(help.stdout.hasPrefix("Usage: user-cli <command> [arguments]\n"))
            for command in ["create", "list", "update-password", "set-quota", "delete", "verify", "info"] {
                #expect(help.stdout.contains("  \(command) "), "help lists \(command)")
            }
        }
        // --help touches no database.
        #expect(!FileManager.default.fileExists(atPath: sandbox.database))

        expectFailure(try await sandbox.cli(), "missing command", status: 2)
        expectFailure(try await sandbox.cli("frobnicate"), "unknown command: frobnicate", status: 2)
        expectFailure(try await sandbox.cli("create", "john", "john@example.com"), "create: expected 3 arguments, got 2", status: 2)
        expectFailure(
            try await sandbox.cli("create", "john", "john@example.com", "MyP@ssw0rd", "extra"),
            "create: expected 3 arguments, got 4", status: 2)
        expectFailure(try await sandbox.cli("update-password", "john"), "update-password: expected 2 arguments, got 1", status: 2)
        expectFailure(try await sandbox.cli("set-quota", "john"), "set-quota: expected 2 arguments, got 1", status: 2)
        expectFailure(try await sandbox.cli("verify"), "verify: expected 2 arguments, got 0", status: 2)
        expectFailure(try await sandbox.cli("delete"), "delete: expected 1 argument, got 0", status: 2)
        expectFailure(try await sandbox.cli("delete", "a", "b"), "delete: expected 1 argument, got 2", status: 2)
        expectFailure(try await sandbox.cli("info"), "info: expected 1 argument, got 0", status: 2)
        expectFailure(try await sandbox.cli("list", "--bogus"), "list: expected [--limit N]", status: 2)
        expectFailure(try await sandbox.cli("list", "--limit"), "list: expected [--limit N]", status: 2)
        // Usage errors are found before the database is opened.
        #expect(!FileManager.default.fileExists(atPath: sandbox.database))
    }

    @Test func createAndList() async throws {
        let sandbox = try Sandbox()
        let empty = try await sandbox.cli("list")
        #expect(empty.status == 0)
        #expect(empty.stdout == "Users:\nTotal: 0\n")
        #expect(empty.stderr == "")

        let before = Date()
        let john = try await sandbox.cli("create", "john", "john@example.com", "MyP@ssw0rd")
        #expect(john.status == 0)
        #expect(john.stderr == "")
        #expect(john.stdout == created("john", "john@example.com", id: 1))
        let jane = try await sandbox.cli("create", "jane", "jane@example.com", "SecureP@ssw0rd")
        #expect(jane.stdout == created("jane", "jane@example.com", id: 2))
        let after = Date()

        // The database file is private to its owner.
        let mode = try FileManager.default.attributesOfItem(atPath: sandbox.database)[.posixPermissions] as? Int
        #expect(mode == 0o600)

        let list = try await sandbox.cli("list")
        #expect(list.status == 0)
        #expect(list.stderr == "")
        let days = Set([utc(before, "yyyy-MM-dd"), utc(after, "yyyy-MM-dd")])
        let possible = days.map { day in
            "Users:\n  1. john (john@example.com) - Created: \(day)\n  2. jane (jane@example.com) - Created: \(day)\nTotal: 2\n"
        }
        #expect(possible.contains(list.stdout), "\(list.stdout)")

        // The document's sample, with the creation dates it shows.
        try await sandbox.sql("UPDATE users SET created_at = 1760956200 WHERE username = 'john'")  // 2025-10-20 10:30:00
        try await sandbox.sql("UPDATE users SET created_at = 1761037200 WHERE username = 'jane'")  // 2025-10-21 09:00:00
        let sample = try await sandbox.cli("list", "--limit", "50")
        #expect(
            sample.stdout
                == "Users:\n  1. john (john@example.com) - Created: 2025-10-20\n  2. jane (jane@example.com) - Created: 2025-10-21\nTotal: 2\n"
        )

        let limited = try await sandbox.cli("list", "--limit", "1")
        #expect(limited.stdout == "Users:\n  1. john (john@example.com) - Created: 2025-10-20\nTotal: 2\n")
        let equals = try await sandbox.cli("list", "--limit=1")
        #expect(equals.stdout == limited.stdout)
        #expect(try await sandbox.cli("list", "--limit", "1000").status == 0)

        expectFailure(try await sandbox.cli("list", "--limit", "abc"), "invalid limit: abc")
        expectFailure(try await sandbox.cli("list", "--limit", "0"), "invalid limit: 0 (must be 1 to 1000)")
        expectFailure(try await sandbox.cli("list", "--limit", "1001"), "invalid limit: 1001 (must be 1 to 1000)")
        expectFailure(try await sandbox.cli("list", "--limit", "-3"), "invalid limit: -3 (must be 1 to 1000)")
    }

    @Test func createRefusals() async throws {
        let sandbox = try Sandbox()
        #expect(try await sandbox.cli("create", "john", "john@example.com", "MyP@ssw0rd").status == 0)
        expectFailure(try await sandbox.cli("create", "john", "other@example.com", "MyP@ssw0rd"), "username already exists")
        expectFailure(
            try await sandbox.cli("create", "johnny", "JOHN@example.com", "MyP@ssw0rd"), "email address already in use")
        expectFailure(try await sandbox.cli("create", "x", "not-an-email", "MyP@ssw0rd"), "invalid email address: not-an-email")
        expectFailure(
            try await sandbox.cli("create", "x", "x@example", "MyP@ssw0rd"), "invalid email address: x@example")
        expectFailure(
            try await sandbox.cli("create", "x", "<x@example.com>", "MyP@ssw0rd"), "invalid email address: <x@example.com>")
        expectFailure(
            try await sandbox.cli("create", "John", "j@example.com", "MyP@ssw0rd"),
            "invalid username: John (use 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit)")
        expectFailure(
            try await sandbox.cli("create", "x", "x@example.com", "short"), "weak password: must be 8 to 1024 characters")
        let weak = try await sandbox.cli("create", "x", "x@example.com", "password1")
        expectFailure(weak, "weak password: must contain at least 3 of: lower case, upper case, digit, other character")
        #expect(!weak.stderr.contains("password1"), "the password is never printed")

        let list = try await sandbox.cli("list")
        #expect(list.stdout.hasSuffix("Total: 1\n"))
    }

    @Test func updatePasswordAndVerify() async throws {
        let sandbox = try Sandbox()
        _ = try await sandbox.cli("create", "john", "john@example.com", "MyP@ssw0rd")

        let ok = try await sandbox.cli("verify", "john", "MyP@ssw0rd")
        #expect(ok.status == 0)
        #expect(ok.stdout == "Authentication successful for user: john\n")
        #expect(ok.stderr == "")

        expectFailure(try await sandbox.cli("verify", "john", "WrongP@ss1"), "authentication failed for user: john")
        expectFailure(try await sandbox.cli("verify", "ghost", "MyP@ssw0rd"), "authentication failed for user: ghost")

        let updated = try await sandbox.cli("update-password", "john", "NewP@ssw0rd123")
        #expect(updated.status == 0)
        #expect(updated.stdout == "Password updated successfully for user: john\n")
        #expect(updated.stderr == "")
        #expect(!updated.stdout.contains("NewP@ssw0rd123"))
        expectFailure(try await sandbox.cli("verify", "john", "MyP@ssw0rd"), "authentication failed for user: john")
        #expect(try await sandbox.cli("verify", "john", "NewP@ssw0rd123").status == 0)

        expectFailure(try await sandbox.cli("update-password", "ghost", "NewP@ssw0rd123"), "unknown user: ghost")
        expectFailure(
            try await sandbox.cli("update-password", "john", "weak"), "weak password: must be 8 to 1024 characters")
        #expect(try await sandbox.cli("verify", "john", "NewP@ssw0rd123").status == 0)

        // A disabled account does not authenticate.
        try await sandbox.sql("UPDATE users SET enabled = 0 WHERE username = 'john'")
        expectFailure(try await sandbox.cli("verify", "john", "NewP@ssw0rd123"), "authentication failed for user: john")

        // verify is an administrator's check, not a login.
        let info = try await sandbox.cli("info", "john")
        #expect(info.stdout.contains("  Last Login: Never\n"))
    }

    @Test func setQuotaAndDelete() async throws {
        let sandbox = try Sandbox()
        _ = try await sandbox.cli("create", "john", "john@example.com", "MyP@ssw0rd")

        let quota = try await sandbox.cli("set-quota", "john", "2000")
        #expect(quota.status == 0)
        #expect(quota.stdout == "Quota set to 2000 MB for user: john\n")
        #expect(quota.stderr == "")
        #expect(try await sandbox.cli("info", "john").stdout.contains("  Quota: 2000 MB\n"))
        #expect(try await sandbox.cli("set-quota", "john", "0").stdout == "Quota set to 0 MB for user: john\n")
        #expect(try await sandbox.cli("set-quota", "john", "1048576").status == 0)

        expectFailure(try await sandbox.cli("set-quota", "john", "abc"), "invalid quota: abc")
        expectFailure(try await sandbox.cli("set-quota", "john", "12.5"), "invalid quota: 12.5")
        expectFailure(try await sandbox.cli("set-quota", "john", "-1"), "invalid quota: -1 MB (must be 0 to 1048576)")
        expectFailure(
            try await sandbox.cli("set-quota", "john", "1048577"), "invalid quota: 1048577 MB (must be 0 to 1048576)")
        expectFailure(try await sandbox.cli("set-quota", "ghost", "10"), "unknown user: ghost")

        let deleted = try await sandbox.cli("delete", "john")
        #expect(deleted.status == 0)
        #expect(deleted.stdout == "User deleted successfully: john\n")
        #expect(deleted.stderr == "")
        expectFailure(try await sandbox.cli("delete", "john"), "unknown user: john")
        expectFailure(try await sandbox.cli("info", "john"), "unknown user: john")
        #expect(try await sandbox.cli("list").stdout == "Users:\nTotal: 0\n")
    }

    @Test("delete removes the account's mail too, in the configured store")
    func deleteRemovesMail() async throws {
        let sandbox = try Sandbox()
        _ = try await sandbox.cli("create", "john", "john@example.com", "MyP@ssw0rd")
        _ = try await sandbox.cli("create", "jane", "jane@example.com", "MyP@ssw0rd")
        for user in ["john", "jane"] {
            let new = sandbox.storage + "/\(user)@example.com/new"
            try FileManager.default.createDirectory(atPath: new, withIntermediateDirectories: true)
            try Data("Subject: hi\r\n\r\nbody\r\n".utf8).write(to: URL(fileURLWithPath: new + "/1.M1P1.host"))
        }
        #expect(try await sandbox.cli("delete", "john").stdout == "User deleted successfully: john\n")
        #expect(!FileManager.default.fileExists(atPath: sandbox.storage + "/john@example.com"))
        #expect(FileManager.default.fileExists(atPath: sandbox.storage + "/jane@example.com/new/1.M1P1.host"))

        // mbox: the same, through SMTP_STORAGE_TYPE.
        _ = try await sandbox.cli("create", "mary", "mary@example.com", "MyP@ssw0rd")
        try Data("From a@b Mon Oct 23 12:00:00 2025\nSubject: x\n\nbody\n\n".utf8)
            .write(to: URL(fileURLWithPath: sandbox.storage + "/mary@example.com"))
        let mbox = try await sandbox.cli("delete", "mary", environment: ["SMTP_STORAGE_TYPE": "mbox"])
        #expect(mbox.status == 0, "\(mbox.stderr)")
        #expect(!FileManager.default.fileExists(atPath: sandbox.storage + "/mary@example.com"))
    }

    @Test func info() async throws {
        let sandbox = try Sandbox()
        let before = Date()
        _ = try await sandbox.cli("create", "john", "john@example.com", "MyP@ssw0rd")
        let after = Date()

        let fresh = try await sandbox.cli("info", "john")
        #expect(fresh.status == 0)
        #expect(fresh.stderr == "")
        let possible = Set([before, after].map { utc($0, "yyyy-MM-dd HH:mm:ss") }).union(
            [utc(before.addingTimeInterval(1), "yyyy-MM-dd HH:mm:ss")]
        ).map { created in
            """
            User Information:
              Username: john
              Email: john@example.com
              ID: 1
              Created: \(created)
              Last Login: Never
              Quota: 1000 MB
              Used: 0.0 MB (0.0%)
              Status: Enabled

            """
        }
        #expect(possible.contains(fresh.stdout), "\(fresh.stdout)")

        // The document's sample: 234.5 MB used in new/ and cur/ (sparse files), other
        // directories not counted.
        try await sandbox.sql("UPDATE users SET created_at = 1760956200, last_login = 1761207300")
        let mailbox = sandbox.storage + "/john@example.com"
        for folder in ["new", "cur", "tmp"] {
            try FileManager.default.createDirectory(atPath: mailbox + "/" + folder, withIntermediateDirectories: true)
        }
        func makeFile(_ path: String, size: UInt64) throws {
            _ = FileManager.default.createFile(atPath: path, contents: nil)
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
            try handle.truncate(atOffset: size)
            try handle.close()
        }
        try makeFile(mailbox + "/new/1.msg", size: 200 * 1_048_576)
        try makeFile(mailbox + "/cur/2.msg", size: 34 * 1_048_576)
        try makeFile(mailbox + "/cur/3.msg:2,S", size: 524_288)
        try makeFile(mailbox + "/tmp/4.msg", size: 999 * 1_048_576)  // not counted
        try FileManager.default.createSymbolicLink(
            atPath: mailbox + "/new/link", withDestinationPath: mailbox + "/tmp/4.msg")  // not followed

        let sample = try await sandbox.cli("info", "john")
        #expect(
            sample.stdout == """
                User Information:
                  Username: john
                  Email: john@example.com
                  ID: 1
                  Created: 2025-10-20 10:30:00
                  Last Login: 2025-10-23 08:15:00
                  Quota: 1000 MB
                  Used: 234.5 MB (23.5%)
                  Status: Enabled

                """)

        _ = try await sandbox.cli("set-quota", "john", "0")
        try await sandbox.sql("UPDATE users SET enabled = 0")
        let disabled = try await sandbox.cli("info", "john")
        #expect(disabled.stdout.contains("  Quota: 0 MB\n  Used: 234.5 MB (0.0%)\n  Status: Disabled\n"))

        expectFailure(try await sandbox.cli("info", "ghost"), "unknown user: ghost")
    }

    @Test func databaseErrorsAndDefaults() async throws {
        let sandbox = try Sandbox()
        let missing = sandbox.directory + "/no/such/dir/smtp.db"
        let result = try await sandbox.cli("list", environment: ["SMTP_DB_PATH": missing])
        #expect(result.status == 1)
        #expect(result.stdout == "")
        #expect(result.stderr.hasPrefix("user-cli: cannot open database \(missing): "))
        #expect(result.stderrLines.count == 2 && result.stderrLines[1] == "", "one line: \(result.stderr)")

        // A file that is not a database.
        let garbage = sandbox.directory + "/garbage.db"
        try Data(repeating: 0x41, count: 4096).write(to: URL(fileURLWithPath: garbage))
        let notADatabase = try await sandbox.cli("list", environment: ["SMTP_DB_PATH": garbage])
        #expect(notADatabase.status == 1)
        #expect(notADatabase.stderr.hasPrefix("user-cli: cannot open database \(garbage): "))

        // Without SMTP_DB_PATH the database is ./smtp.db.
        let work = sandbox.directory + "/cwd"
        try FileManager.default.createDirectory(atPath: work, withIntermediateDirectories: true)
        let defaulted = try await sandbox.cli(
            "create", "john", "john@example.com", "MyP@ssw0rd", environment: ["SMTP_DB_PATH": nil], in: work)
        #expect(defaulted.status == 0)
        #expect(FileManager.default.fileExists(atPath: work + "/smtp.db"))
        // user-cli never spools: it leaves no spool directory behind (SMTP_SPOOL_PATH's default
        // is ./spool).
        #expect(!FileManager.default.fileExists(atPath: work + "/spool"))
    }
}
