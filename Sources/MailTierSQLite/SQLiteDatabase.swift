// MailTierSQLite: the SQLite adapters of MailTier's ports (users, queue, ...), over the
// system SQLite through `CSQLite`. It owns the database file, its pragmas and its migrations
// (Schema.swift); it must not import NIO channel code, SMTP code or another database driver.

import CSQLite
import NIOConcurrencyHelpers
import NIOPosix

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// One SQLite value, as stored (SQLite's five storage classes).
public enum SQLiteValue: Sendable, Equatable {
    case null
    case integer(Int64)
    case real(Double)
    case text(String)
    case blob([UInt8])
}

extension SQLiteValue {
    /// `.integer(1)` / `.integer(0)`, as the portable schema stores booleans.
    public static func bool(_ value: Bool) -> SQLiteValue { .integer(value ? 1 : 0) }
    /// `.text`, or `.null` for nil.
    public static func optionalText(_ value: String?) -> SQLiteValue { value.map { .text($0) } ?? .null }
    /// `.integer`, or `.null` for nil.
    public static func optionalInteger(_ value: Int64?) -> SQLiteValue { value.map { .integer($0) } ?? .null }
}

/// One result row; columns are looked up by the name SQLite gives them (use `AS` to choose it).
public struct SQLiteRow: Sendable {
    /// Column name → index; shared by every row of one result.
    let columns: [String: Int]
    let values: [SQLiteValue]

    init(columns: [String: Int], values: [SQLiteValue]) {
        self.columns = columns
        self.values = values
    }

    /// The value of `column`, or `.null` when the row has no such column.
    public subscript(_ column: String) -> SQLiteValue {
        guard let index = columns[column] else { return .null }
        return values[index]
    }

    /// An integer column (a real that is a whole number is accepted); nil for NULL and other types.
    public func int(_ c: String) -> Int64? {
        switch self[c] {
        case .integer(let value): return value
        case .real(let value): return Int64(exactly: value)
        case .null, .text, .blob: return nil
        }
    }

    /// A text column; nil for NULL and other types.
    public func string(_ c: String) -> String? {
        if case .text(let value) = self[c] { return value }
        return nil
    }

    /// A real or integer column; nil for NULL and other types.
    public func double(_ c: String) -> Double? {
        switch self[c] {
        case .real(let value): return value
        case .integer(let value): return Double(value)
        case .null, .text, .blob: return nil
        }
    }

    /// A blob column (a text column gives its UTF-8 bytes); nil for NULL and numbers.
    public func blob(_ c: String) -> [UInt8]? {
        switch self[c] {
        case .blob(let value): return value
        case .text(let value): return Array(value.utf8)
        case .null, .integer, .real: return nil
        }
    }
}

/// An SQLite failure: the extended result code and SQLite's message.
public struct SQLiteError: Error, CustomStringConvertible, Sendable {
    public var code: Int32
    public var message: String

    public init(code: Int32, message: String) {
        self.code = code
        self.message = message
    }

    /// SQLITE_CONSTRAINT and its extended codes (UNIQUE, FOREIGN KEY, NOT NULL, CHECK, ...).
    public var isConstraintViolation: Bool { code & 0xFF == SQLITE_CONSTRAINT }
    /// SQLITE_CONSTRAINT_UNIQUE or SQLITE_CONSTRAINT_PRIMARYKEY.
    public var isUniqueViolation: Bool { code == 2067 || code == 1555 }
    /// SQLITE_BUSY or SQLITE_LOCKED (another connection held the lock past the busy timeout).
    public var isBusy: Bool { code & 0xFF == SQLITE_BUSY || code & 0xFF == SQLITE_LOCKED }

    public var description: String { "SQLite error \(code): \(message)" }
}

/// One open SQLite connection. Not Sendable: only used inside `SQLiteDatabase`'s
/// `read`/`write` closures, which run under the database's lock.
public final class SQLiteConnection {
    private let handle: OpaquePointer
    /// Prepared statements, keyed by their SQL text.
    private var statements: [String: OpaquePointer] = [:]
    private static let maxCachedStatements = 256

    init(path: String) throws {
        var db: OpaquePointer?
        let rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, nil)
        guard rc == SQLITE_OK, let db else {
            let message = db.map { String(cString: sqlite3_errmsg($0)) } ?? String(cString: sqlite3_errstr(rc))
            if let db { sqlite3_close_v2(db) }
            throw SQLiteError(code: rc, message: message)
        }
        self.handle = db
        sqlite3_extended_result_codes(db, 1)
    }

    deinit {
        for statement in statements.values {
            sqlite3_finalize(statement)
        }
        sqlite3_close_v2(handle)
    }

    /// Runs one statement; rows it returns (e.g. from a PRAGMA) are discarded.
    public func execute(_ sql: String, _ bindings: [SQLiteValue] = []) throws {
        let statement = try prepare(sql)
        defer { sqlite3_reset(statement) }
        try bind(bindings, to: statement)
        while true {
            let rc = sqlite3_step(statement)
            if rc == SQLITE_DONE { return }
            if rc != SQLITE_ROW { throw error(rc) }
        }
    }

    /// Runs one statement and returns its rows.
    public func query(_ sql: String, _ bindings: [SQLiteValue] = []) throws -> [SQLiteRow] {
        let statement = try prepare(sql)
        defer { sqlite3_reset(statement) }
        try bind(bindings, to: statement)

        let count = Int(sqlite3_column_count(statement))
        var columns: [String: Int] = [:]
        for index in 0..<count {
            let name = String(cString: sqlite3_column_name(statement, Int32(index)))
            if columns[name] == nil { columns[name] = index }
        }

        var rows: [SQLiteRow] = []
        while true {
            let rc = sqlite3_step(statement)
            if rc == SQLITE_DONE { break }
            guard rc == SQLITE_ROW else { throw error(rc) }
            var values: [SQLiteValue] = []
            values.reserveCapacity(count)
            for index in 0..<Int32(count) {
                values.append(column(index, of: statement))
            }
            rows.append(SQLiteRow(columns: columns, values: values))
        }
        return rows
    }

    /// Rows modified by the last INSERT, UPDATE or DELETE.
    public var changes: Int { Int(sqlite3_changes(handle)) }

    /// The rowid of the last successful INSERT on this connection.
    public var lastInsertRowID: Int64 { sqlite3_last_insert_rowid(handle) }

    // MARK: - Internals

    /// Runs several `;`-separated statements without bindings (migrations).
    func executeScript(_ sql: String) throws {
        var message: UnsafeMutablePointer<CChar>?
        let rc = sqlite3_exec(handle, sql, nil, nil, &message)
        if rc != SQLITE_OK {
            let text = message.map { String(cString: $0) } ?? String(cString: sqlite3_errstr(rc))
            sqlite3_free(message)
            throw SQLiteError(code: sqlite3_extended_errcode(handle), message: text)
        }
    }

    func setBusyTimeout(milliseconds: Int32) {
        sqlite3_busy_timeout(handle, milliseconds)
    }

    /// True between BEGIN and COMMIT/ROLLBACK.
    var isInTransaction: Bool { sqlite3_get_autocommit(handle) == 0 }

    private func prepare(_ sql: String) throws -> OpaquePointer {
        if let cached = statements[sql] {
            sqlite3_clear_bindings(cached)
            return cached
        }
        var statement: OpaquePointer?
        var tail: UnsafePointer<CChar>?
        let rc = sql.withCString { text in
            let rc = sqlite3_prepare_v3(handle, text, -1, UInt32(SQLITE_PREPARE_PERSISTENT), &statement, &tail)
            // Only one statement: anything but whitespace or a comment after it is an error.
            if rc == SQLITE_OK, let tail, Self.hasMoreSQL(tail) {
                return SQLITE_MISUSE
            }
            return rc
        }
        guard rc == SQLITE_OK, let statement else {
            if let statement { sqlite3_finalize(statement) }
            if rc == SQLITE_MISUSE {
                throw SQLiteError(code: rc, message: "execute/query take exactly one statement: \(sql)")
            }
            throw error(rc)
        }
        if statements.count >= Self.maxCachedStatements {
            for old in statements.values { sqlite3_finalize(old) }
            statements.removeAll(keepingCapacity: true)
        }
        statements[sql] = statement
        return statement
    }

    /// True when `tail` (what follows the first statement) holds more than whitespace,
    /// semicolons and comments.
    private static func hasMoreSQL(_ tail: UnsafePointer<CChar>) -> Bool {
        var p = tail
        func at(_ offset: Int) -> UInt8 { UInt8(bitPattern: (p + offset).pointee) }
        while at(0) != 0 {
            switch at(0) {
            case UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\n"), UInt8(ascii: "\r"), UInt8(ascii: ";"):
                p += 1
            case UInt8(ascii: "-") where at(1) == UInt8(ascii: "-"):
                while at(0) != 0 && at(0) != UInt8(ascii: "\n") { p += 1 }
            case UInt8(ascii: "/") where at(1) == UInt8(ascii: "*"):
                p += 2
                while at(0) != 0 && !(at(0) == UInt8(ascii: "*") && at(1) == UInt8(ascii: "/")) { p += 1 }
                if at(0) != 0 { p += 2 }
            default:
                return true
            }
        }
        return false
    }

    private func bind(_ bindings: [SQLiteValue], to statement: OpaquePointer) throws {
        let expected = Int(sqlite3_bind_parameter_count(statement))
        guard expected == bindings.count else {
            throw SQLiteError(
                code: SQLITE_RANGE, message: "statement has \(expected) parameters, \(bindings.count) values given")
        }
        for (offset, value) in bindings.enumerated() {
            let index = Int32(offset + 1)
            let rc: Int32
            switch value {
            case .null:
                rc = sqlite3_bind_null(statement, index)
            case .integer(let int):
                rc = sqlite3_bind_int64(statement, index, int)
            case .real(let double):
                rc = sqlite3_bind_double(statement, index, double)
            case .text(let string):
                var string = string
                rc = string.withUTF8 { bytes in
                    // An empty buffer may have no address; SQLite would bind NULL for a nil pointer.
                    guard let base = bytes.baseAddress, bytes.count > 0 else {
                        return sqlite3_bind_text(statement, index, "", 0, csqlite_transient())
                    }
                    return base.withMemoryRebound(to: CChar.self, capacity: bytes.count) {
                        sqlite3_bind_text(statement, index, $0, Int32(bytes.count), csqlite_transient())
                    }
                }
            case .blob(let bytes):
                rc = bytes.withUnsafeBytes { raw in
                    guard let base = raw.baseAddress, raw.count > 0 else {
                        return sqlite3_bind_zeroblob(statement, index, 0)
                    }
                    return sqlite3_bind_blob(statement, index, base, Int32(raw.count), csqlite_transient())
                }
            }
            guard rc == SQLITE_OK else { throw error(rc) }
        }
    }

    private func column(_ index: Int32, of statement: OpaquePointer) -> SQLiteValue {
        switch sqlite3_column_type(statement, index) {
        case SQLITE_INTEGER:
            return .integer(sqlite3_column_int64(statement, index))
        case SQLITE_FLOAT:
            return .real(sqlite3_column_double(statement, index))
        case SQLITE_TEXT:
            guard let text = sqlite3_column_text(statement, index) else { return .text("") }
            let count = Int(sqlite3_column_bytes(statement, index))
            return .text(String(decoding: UnsafeBufferPointer(start: text, count: count), as: UTF8.self))
        case SQLITE_BLOB:
            let count = Int(sqlite3_column_bytes(statement, index))
            guard count > 0, let base = sqlite3_column_blob(statement, index) else { return .blob([]) }
            return .blob(Array(UnsafeRawBufferPointer(start: base, count: count)))
        default:
            return .null
        }
    }

    private func error(_ rc: Int32) -> SQLiteError {
        SQLiteError(code: sqlite3_extended_errcode(handle), message: String(cString: sqlite3_errmsg(handle)))
    }
}

/// A connection must never cross threads on its own: only under the database's lock.
@available(*, unavailable)
extension SQLiteConnection: Sendable {}

/// The connection, kept behind `SQLiteDatabase`'s lock.
///
/// `@unchecked Sendable` is safe because the only instance lives inside a
/// `NIOLockedValueBox` (`SQLiteDatabase.connection`), and the connection is only reached
/// through `withLockedValue`, so no two threads ever touch it at once; the closures that
/// receive it are non-escaping and run inside that lock, so the reference cannot leak out.
private struct GuardedConnection: @unchecked Sendable {
    let connection: SQLiteConnection
}

/// A SQLite database file with one connection, serialised by a lock. Async calls run on a
/// `NIOThreadPool` (never on the Swift concurrency pool, whose threads must not block).
///
/// Do not call `read`/`write`/`readSync`/`writeSync` from inside one of their closures: the
/// lock is not re-entrant.
public final class SQLiteDatabase: Sendable {
    public let path: String
    /// The schema versions this open applied (empty when the file was already current).
    public let migrationsApplied: [Int]
    private let threadPool: NIOThreadPool
    private let connection: NIOLockedValueBox<GuardedConnection>
    /// Writes waiting for the connection (see `writeSync`).
    private let pendingWrites = NIOLockedValueBox<[PendingWrite]>([])
    private let committedBatches = NIOLockedValueBox(0)

    /// Write transactions committed so far by `write`/`writeSync`: fewer than the writes when
    /// concurrent writes shared a commit.
    public var writeTransactionsCommitted: Int { committedBatches.withLockedValue { $0 } }

    /// Opens (creating) the file, sets journal_mode=WAL, synchronous=FULL, foreign_keys=ON,
    /// busy_timeout=5000, then runs the migrations. A file this creates has mode 0600.
    public init(path: String, threadPool: NIOThreadPool) throws {
        self.path = path
        self.threadPool = threadPool
        try Self.createPrivateFileIfMissing(path)
        let connection = try SQLiteConnection(path: path)
        connection.setBusyTimeout(milliseconds: 5000)
        try connection.execute("PRAGMA journal_mode=WAL")
        try connection.execute("PRAGMA synchronous=FULL")
        try connection.execute("PRAGMA foreign_keys=ON")
        self.migrationsApplied = try SQLiteSchema.migrate(connection)
        self.connection = NIOLockedValueBox(GuardedConnection(connection: connection))
    }

    /// Runs `body` on the thread pool inside a read transaction (a consistent snapshot).
    public func read<T: Sendable>(_ body: @Sendable (SQLiteConnection) throws -> T) async throws -> T {
        try await onThreadPool(body) { [self] body in try self.readSync(body) }
    }

    /// BEGIN IMMEDIATE … COMMIT; ROLLBACK when body throws.
    public func write<T: Sendable>(_ body: @Sendable (SQLiteConnection) throws -> T) async throws -> T {
        try await onThreadPool(body) { [self] body in try self.writeSync(body) }
    }

    /// Synchronous `read`, for the CLI and for start-up code: blocks the calling thread.
    public func readSync<T>(_ body: (SQLiteConnection) throws -> T) throws -> T {
        try connection.withLockedValue { guarded in
            try Self.transaction(guarded.connection, begin: "BEGIN DEFERRED", body)
        }
    }

    /// Synchronous `write`, for the CLI and for start-up code: blocks the calling thread.
    ///
    /// Group commit: writes that arrive while another one holds the connection wait in
    /// `pendingWrites`; whichever of them gets the connection next runs all of them in one
    /// `BEGIN IMMEDIATE … COMMIT`, each in a savepoint of its own (a body that throws is rolled
    /// back alone and gets its error), so that concurrent writers share one commit (one WAL
    /// fsync) instead of queueing for one each. Nobody returns before the COMMIT that holds
    /// their changes has succeeded; if it fails, every body of the batch gets the error.
    public func writeSync<T>(_ body: (SQLiteConnection) throws -> T) throws -> T {
        let result = WriteResult<T>()
        try withoutActuallyEscaping({ (connection: SQLiteConnection) throws -> Void in
            result.value = try body(connection)
        }) { work in
            let write = PendingWrite(work)
            pendingWrites.withLockedValue { $0.append(write) }
            try connection.withLockedValue { guarded in
                if !write.isDone {
                    let batch = pendingWrites.withLockedValue { pending in
                        defer { pending.removeAll(keepingCapacity: true) }
                        return pending
                    }
                    let commits = Self.commit(batch, guarded.connection)
                    committedBatches.withLockedValue { $0 += commits }
                }
                // Done (by this thread or by the one that held the connection before), and
                // the batch no longer refers to `work`.
                if let error = write.error { throw error }
            }
        }
        return result.value!
    }

    // MARK: - Internals

    /// One caller's write body, waiting for a batch. Its fields are written and read only
    /// under the connection lock (`isDone`, `error`) or before it is shared (`work`).
    private final class PendingWrite: @unchecked Sendable {
        var work: ((SQLiteConnection) throws -> Void)?
        var isDone = false
        var error: (any Error)?
        init(_ work: @escaping (SQLiteConnection) throws -> Void) { self.work = work }
    }

    private final class WriteResult<T> {
        var value: T?
    }

    /// Runs `batch` in one transaction, a savepoint each; sets every write's outcome and drops
    /// its body. A write that throws is rolled back to its savepoint alone. A failure that ends
    /// the transaction itself (SQLite rolls back on I/O errors, a full disk, ...), or a savepoint
    /// that cannot be rolled back, fails the writes that ran before it in the same transaction;
    /// the rest run in a new one. A write is reported done only after the COMMIT that holds it.
    /// Returns how many transactions it committed.
    private static func commit(_ batch: [PendingWrite], _ connection: SQLiteConnection) -> Int {
        var open: [PendingWrite] = []  // ran in the current transaction, not committed yet
        var commits = 0
        func finish(_ writes: some Sequence<PendingWrite>, _ error: (any Error)?) {
            for write in writes {
                write.error = write.error ?? error
                write.work = nil
                write.isDone = true
            }
        }
        /// Ends the current transaction without committing: every write in it fails. False when
        /// the ROLLBACK failed and the transaction is still open.
        func abandon(_ error: any Error) -> Bool {
            if connection.isInTransaction { try? connection.execute("ROLLBACK") }
            finish(open, error)
            open = []
            return !connection.isInTransaction
        }
        // A transaction still open (a ROLLBACK that failed) must not carry anything into this batch.
        if connection.isInTransaction, !abandon(SQLiteError(code: SQLITE_ERROR, message: "transaction could not be rolled back")) {
            finish(batch, SQLiteError(code: SQLITE_ERROR, message: "a failed transaction could not be rolled back"))
            return 0
        }
        for (index, write) in batch.enumerated() {
            if !connection.isInTransaction {
                do {
                    try connection.execute("BEGIN IMMEDIATE")
                } catch {
                    // (BUSY: another process holds the database; the rest would wait as long.)
                    finish(batch[index...], error)
                    return commits
                }
            }
            do {
                try connection.execute("SAVEPOINT batched_write")
            } catch {
                finish([write], error)
                continue
            }
            do {
                try write.work?(connection)
                try connection.execute("RELEASE batched_write")
                open.append(write)
            } catch {
                finish([write], error)
                var undone = false
                if connection.isInTransaction {
                    do {
                        try connection.execute("ROLLBACK TO batched_write")
                        try connection.execute("RELEASE batched_write")
                        undone = true
                    } catch {}
                }
                // Its changes could not be undone alone, or the transaction is gone with the
                // changes of the writes before it: they fail too.
                if !undone, !abandon(error) {
                    finish(batch[(index + 1)...], error)
                    return commits
                }
            }
        }
        if connection.isInTransaction {
            do {
                try connection.execute("COMMIT")
                commits += 1
                finish(open, nil)
            } catch {
                _ = abandon(error)
            }
        }
        return commits
    }

    private static func transaction<T>(
        _ connection: SQLiteConnection, begin: String, _ body: (SQLiteConnection) throws -> T
    ) throws -> T {
        try connection.execute(begin)
        let result: T
        do {
            result = try body(connection)
            try connection.execute("COMMIT")
        } catch {
            if connection.isInTransaction {
                try? connection.execute("ROLLBACK")
            }
            throw error
        }
        return result
    }

    /// Runs `run(body)` on the thread pool and waits for it.
    ///
    /// `body` is non-escaping; `withoutActuallyEscaping` checks at the end that nothing kept
    /// it. The pool's work item may outlive our resumption by a few instructions, so the
    /// closure travels in a slot that is emptied (under its lock) before the continuation
    /// is resumed, and emptied again here for the case where the work item never ran.
    private func onThreadPool<T: Sendable>(
        _ body: @Sendable (SQLiteConnection) throws -> T,
        _ run: @escaping @Sendable (@Sendable (SQLiteConnection) throws -> T) throws -> T
    ) async throws -> T {
        try await withoutActuallyEscaping(body) { escapable in
            let slot = NIOLockedValueBox<(@Sendable (SQLiteConnection) throws -> T)?>(escapable)
            defer { slot.withLockedValue { $0 = nil } }
            return try await threadPool.runIfActive {
                guard let work = slot.withLockedValue({ value in
                    defer { value = nil }
                    return value
                }) else {
                    throw CancellationError()
                }
                return try run(work)
            }
        }
    }

    /// Creates the database file with mode 0600 (so the WAL and SHM files SQLite makes next to
    /// it get the same mode); leaves an existing file as it is.
    private static func createPrivateFileIfMissing(_ path: String) throws {
        guard path != ":memory:", !path.isEmpty, !path.hasPrefix("file:") else { return }
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        if fd >= 0 {
            close(fd)
            return
        }
        let code = errno
        if code == EEXIST { return }
        throw SQLiteError(code: SQLITE_CANTOPEN, message: "unable to open database file: \(String(cString: strerror(code)))")
    }
}
