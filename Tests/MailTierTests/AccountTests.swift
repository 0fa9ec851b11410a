import Foundation
import NIOCore
import NIOPosix
import Synchronization
import Testing

@testable import MailTier
@testable import MailTierArgon2
@testable import MailTierSQLite

// Accounts against real parts: a SQLite file in a temporary directory and libargon2.

/// Cheap Argon2id parameters for tests that do not check the production format.
private let cheap = Argon2idHasher.Parameters(timeCost: 1, memoryKiB: 1024, parallelism: 1)

private func cheapHasher() -> Argon2idHasher {
    Argon2idHasher(threadPool: NIOThreadPool.singleton, maxConcurrent: 2, parameters: cheap)
}

private func withDatabase<T>(_ body: (SQLiteDatabase, String) async throws -> T) async throws -> T {
    try await withTemporaryDirectory("mailtier-accounts") { directory in
        let path = directory + "/smtp.db"
        let database = try SQLiteDatabase(path: path, threadPool: NIOThreadPool.singleton)
        return try await body(database, path)
    }
}

/// Accounts on a fresh database of `backend` (see `withTestDatabase`).
private func withAccounts(_ backend: DatabaseBackend, _ body: (AccountService, any UserStore) async throws -> Void) async throws {
    try await withTestDatabase(backend) { database in
        let store = database.users
        try await body(AccountService(users: store, hasher: cheapHasher()), store)
    }
}

/// Standard base64 without padding, as in PHC strings.
private func decodePHCBase64(_ text: Substring) -> [UInt8]? {
    var padded = String(text)
    while padded.count % 4 != 0 { padded += "=" }
    return Data(base64Encoded: padded).map(Array.init)
}

/// Every account test, under one name: `swift test --filter AccountTests`.
@Suite struct AccountTests {}

// MARK: - SQLiteDatabase

extension AccountTests {
    @Suite struct SQLiteDatabaseTests {
        @Test func opensWithPragmasSchemaAndPrivateMode() async throws {
            try await withDatabase { database, path in
                let mode = try FileManager.default.attributesOfItem(atPath: path)[.posixPermissions] as? Int
                #expect(mode == 0o600)
                let (journal, foreignKeys, version, synchronous, tables) = try await database.read { c in
                    (
                        try c.query("PRAGMA journal_mode").first?.string("journal_mode"),
                        try c.query("PRAGMA foreign_keys").first?.int("foreign_keys"),
                        try c.query("PRAGMA user_version").first?.int("user_version"),
                        try c.query("PRAGMA synchronous").first?.int("synchronous"),
                        try c.query("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
                            .compactMap { $0.string("name") }
                    )
                }
                #expect(journal == "wal")
                #expect(foreignKeys == 1)
                #expect(synchronous == 2)  // FULL
                #expect(version == Int64(SQLiteSchema.currentVersion))
                #expect(tables.filter { !$0.hasPrefix("messages") } == ["events", "queue_messages", "queue_recipients", "spool_blobs", "users"])
                #expect(tables.contains("messages") && tables.contains("messages_fts"))
            }
        }

        @Test func reopeningDoesNotMigrateAgainAndKeepsData() async throws {
            try await withTemporaryDirectory("mailtier-accounts") { directory in
                let path = directory + "/smtp.db"
                do {
                    let database = try SQLiteDatabase(path: path, threadPool: NIOThreadPool.singleton)
                    _ = try await SQLiteUserStore(database: database).create(
                        username: "john", email: "john@example.com", passwordHash: "h", quotaMB: 1000, isAdmin: false)
                }
                let again = try SQLiteDatabase(path: path, threadPool: NIOThreadPool.singleton)
                #expect(try await SQLiteUserStore(database: again).count() == 1)
                #expect(try again.readSync { try SQLiteSchema.userVersion($0) } == Int64(SQLiteSchema.currentVersion))
            }
        }

        @Test func refusesANewerSchema() async throws {
            try await withTemporaryDirectory("mailtier-accounts") { directory in
                let path = directory + "/smtp.db"
                do {
                    let database = try SQLiteDatabase(path: path, threadPool: NIOThreadPool.singleton)
                    try database.writeSync { try $0.execute("PRAGMA user_version = 99") }
                }
                #expect(throws: SQLiteError.self) {
                    _ = try SQLiteDatabase(path: path, threadPool: NIOThreadPool.singleton)
                }
            }
        }

        @Test func cannotOpenInAMissingDirectory() {
            #expect(throws: SQLiteError.self) {
                _ = try SQLiteDatabase(path: "/nonexistent-mailtier-dir/x.db", threadPool: NIOThreadPool.singleton)
            }
        }

        @Test func valuesRoundTrip() async throws {
            try await withDatabase { database, _ in
                let values: [SQLiteValue] = [
                    .null, .integer(Int64.min), .integer(Int64.max), .real(1.5), .text(""), .text("héllo\u{0}wörld"),
                    .blob([]), .blob([0, 1, 2, 255]),
                ]
                let (changes, lastID, rows) = try await database.write { c in
                    try c.execute("CREATE TABLE t (v)")
                    for value in values { try c.execute("INSERT INTO t (v) VALUES (?)", [value]) }
                    return (c.changes, c.lastInsertRowID, try c.query("SELECT v, typeof(v) AS type FROM t ORDER BY rowid"))
                }
                #expect(changes == 1)
                #expect(lastID == Int64(values.count))
                #expect(rows.map { $0["v"] } == values)
                #expect(rows.map { $0.string("type") } == ["null", "integer", "integer", "real", "text", "text", "blob", "blob"])
                #expect(rows[1].int("v") == Int64.min)
                #expect(rows[3].double("v") == 1.5)
                #expect(rows[5].string("v") == "héllo\u{0}wörld")
                #expect(rows[7].blob("v") == [0, 1, 2, 255])
                #expect(rows[0].int("v") == nil)
                #expect(rows[0]["no such column"] == .null)
            }
        }

        @Test func executeTakesOneStatementAndCountsBindings() async throws {
            try await withDatabase { database, _ in
                try database.writeSync { c in
                    #expect(throws: SQLiteError.self) { try c.execute("SELECT 1; SELECT 2") }
                    #expect(throws: SQLiteError.self) { try c.query("SELECT ?", []) }
                    // Trailing whitespace, semicolons and comments are fine.
                    try c.execute("SELECT 1; -- done\n /* really */ ")
                    #expect(try c.query("SELECT ? AS x", [.integer(7)]).first?.int("x") == 7)
                    // The cached statement is reset and rebound.
                    #expect(try c.query("SELECT ? AS x", [.integer(8)]).first?.int("x") == 8)
                }
            }
        }

        @Test func writeRollsBackWhenTheBodyThrows() async throws {
            struct Boom: Error {}
            try await withDatabase { database, _ in
                await #expect(throws: Boom.self) {
                    try await database.write { c in
                        try c.execute(
                            "INSERT INTO users (username, email, password_hash, created_at) VALUES ('a', 'a@b.c', 'h', 0)")
                        throw Boom()
                    }
                }
                #expect(try await database.read { try SQLiteUserStore.count($0) } == 0)
                // The connection is usable afterwards (no transaction left open).
                try database.writeSync { c in
                    try c.execute(
                        "INSERT INTO users (username, email, password_hash, created_at) VALUES ('a', 'a@b.c', 'h', 0)")
                }
                #expect(try database.readSync { try SQLiteUserStore.count($0) } == 1)
            }
        }

        @Test func constraintErrorsAreRecognised() async throws {
            try await withDatabase { database, _ in
                let error = await #expect(throws: SQLiteError.self) {
                    try await database.write { c in
                        try c.execute(
                            "INSERT INTO queue_recipients (message_id, recipient, domain, is_local, next_retry) VALUES ('nope', 'a@b.c', 'b.c', 0, 0)"
                        )
                    }
                }
                #expect(error?.isConstraintViolation == true)  // foreign key: foreign_keys is on
                #expect(error?.isUniqueViolation == false)
            }
        }

        @Test func manyConcurrentReadsAndWrites() async throws {
            try await withDatabase { database, _ in
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for index in 0..<50 {
                        group.addTask {
                            _ = try await SQLiteUserStore(database: database).create(
                                username: "u\(index)", email: "u\(index)@example.com", passwordHash: "h", quotaMB: 1,
                                isAdmin: false)
                        }
                        group.addTask { _ = try await SQLiteUserStore(database: database).count() }
                    }
                    try await group.waitForAll()
                }
                #expect(try await SQLiteUserStore(database: database).count() == 50)
            }
        }

        @Test func cancelledCallsNeitherHangNorLeakTheClosure() async throws {
            try await withDatabase { (database: SQLiteDatabase, _: String) async throws in
                // withoutActuallyEscaping traps if a closure outlives its call: cancel many
                // calls at random points and make sure every one returns or throws.
                let tasks = (0..<200).map { index in
                    Task {
                        try await database.read { c in try c.query("SELECT ? AS x", [.integer(Int64(index))]).count }
                    }
                }
                for (index, task) in tasks.enumerated() where index % 2 == 0 { task.cancel() }
                var completed = 0
                for task in tasks {
                    if (try? await task.value) == 1 { completed += 1 }
                }
                #expect(completed >= 100)
                #expect(try await database.read { try $0.query("SELECT 1 AS x").first?.int("x") } == 1)
            }
        }

        @Test func twoConnectionsToOneFileWaitForEachOther() async throws {
            // Like the CLI and the server on the same file: BEGIN IMMEDIATE and busy_timeout.
            try await withDatabase { first, path in
                let second = try SQLiteDatabase(path: path, threadPool: NIOThreadPool.singleton)
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for index in 0..<40 {
                        let database = index % 2 == 0 ? first : second
                        group.addTask {
                            _ = try await SQLiteUserStore(database: database).create(
                                username: "u\(index)", email: "u\(index)@example.com", passwordHash: "h", quotaMB: 1,
                                isAdmin: false)
                        }
                    }
                    try await group.waitForAll()
                }
                #expect(try await SQLiteUserStore(database: first).count() == 40)
                #expect(try await SQLiteUserStore(database: second).count() == 40)
            }
        }
    }
}

// MARK: - UserStore (SQLite and PostgreSQL)

extension AccountTests {
    @Suite struct UserStoreTests {
        @Test(arguments: DatabaseBackend.allCases)
        func createAndFind(_ backend: DatabaseBackend) async throws {
            try await withTestDatabase(backend) { (database: TestDatabase) async throws in
                let store = database.users
                let before = Date().timeIntervalSince1970.rounded(.down)
                let john = try await store.create(
                    username: "john", email: "John@Example.com", passwordHash: "$argon2id$x", quotaMB: 1000, isAdmin: false)
                #expect(john.id == 1)
                #expect(john.username == "john")
                #expect(john.email == "John@Example.com")
                #expect(john.passwordHash == "$argon2id$x")
                #expect(john.quotaMB == 1000)
                #expect(!john.isAdmin)
                #expect(john.enabled)
                #expect(john.lastLogin == nil)
                #expect(john.createdAt.timeIntervalSince1970 >= before)
                #expect(john.createdAt.timeIntervalSince1970 <= Date().timeIntervalSince1970)

                #expect(try await store.user(named: "john") == john)
                #expect(try await store.user(email: "john@example.com") == john)  // case-insensitive
                #expect(try await store.user(email: "JOHN@EXAMPLE.COM") == john)
                #expect(try await store.user(named: "John") == nil)  // usernames are exact
                #expect(try await store.user(named: "jane") == nil)
                #expect(try await store.user(email: "jane@example.com") == nil)

                let admin = try await store.create(
                    username: "root", email: "root@example.com", passwordHash: "h", quotaMB: 0, isAdmin: true)
                #expect(admin.id == 2)
                #expect(try await store.user(named: "root")?.isAdmin == true)
                #expect(try await store.count() == 2)
            }
        }

        @Test(arguments: DatabaseBackend.allCases)
        func duplicatesBothWays(_ backend: DatabaseBackend) async throws {
            try await withTestDatabase(backend) { (database: TestDatabase) async throws in
                let store = database.users
                _ = try await store.create(
                    username: "john", email: "john@example.com", passwordHash: "h", quotaMB: 1000, isAdmin: false)
                await #expect(throws: UserStoreError.duplicateUsername) {
                    _ = try await store.create(
                        username: "john", email: "other@example.com", passwordHash: "h", quotaMB: 1000, isAdmin: false)
                }
                await #expect(throws: UserStoreError.duplicateEmail) {
                    _ = try await store.create(
                        username: "johnny", email: "JOHN@example.COM", passwordHash: "h", quotaMB: 1000, isAdmin: false)
                }
                #expect(try await store.count() == 1)

                // update onto another user's email
                var jane = try await store.create(
                    username: "jane", email: "jane@example.com", passwordHash: "h", quotaMB: 1000, isAdmin: false)
                jane.email = "john@example.com"
                await #expect(throws: UserStoreError.duplicateEmail) { try await store.update(jane) }
                jane.email = "jane@example.com"
                jane.username = "john"
                await #expect(throws: UserStoreError.duplicateUsername) { try await store.update(jane) }
            }
        }

        @Test(arguments: DatabaseBackend.allCases)
        func listPagesInIDOrderWithTotal(_ backend: DatabaseBackend) async throws {
            try await withTestDatabase(backend) { (database: TestDatabase) async throws in
                let store = database.users
                for index in 1...7 {
                    _ = try await store.create(
                        username: "user\(index)", email: "user\(index)@example.com", passwordHash: "h", quotaMB: index,
                        isAdmin: false)
                }
                let first = try await store.list(offset: 0, limit: 3)
                #expect(first.users.map(\.username) == ["user1", "user2", "user3"])
                #expect(first.total == 7)
                let second = try await store.list(offset: 3, limit: 3)
                #expect(second.users.map(\.id) == [4, 5, 6])
                #expect(second.total == 7)
                let last = try await store.list(offset: 6, limit: 3)
                #expect(last.users.map(\.username) == ["user7"])
                let beyond = try await store.list(offset: 10, limit: 3)
                #expect(beyond.users.isEmpty)
                #expect(beyond.total == 7)
                #expect(try await store.list(offset: 0, limit: 0).users.isEmpty)
                #expect(try await store.list(offset: 0, limit: 100).users.count == 7)
            }
        }

        @Test(arguments: DatabaseBackend.allCases)
        func updateWritesEveryFieldButIDAndCreation(_ backend: DatabaseBackend) async throws {
            try await withTestDatabase(backend) { (database: TestDatabase) async throws in
                let store = database.users
                let john = try await store.create(
                    username: "john", email: "john@example.com", passwordHash: "h1", quotaMB: 1000, isAdmin: false)
                var changed = john
                changed.username = "johnny"
                changed.email = "johnny@example.org"
                changed.passwordHash = "h2"
                changed.quotaMB = 2000
                changed.isAdmin = true
                changed.enabled = false
                changed.lastLogin = Date(timeIntervalSince1970: 1_761_207_300)
                changed.createdAt = Date(timeIntervalSince1970: 5)  // ignored
                try await store.update(changed)
                var expected = changed
                expected.createdAt = john.createdAt
                #expect(try await store.user(named: "johnny") == expected)
                #expect(try await store.user(named: "john") == nil)

                var ghost = john
                ghost.id = 99
                await #expect(throws: UserStoreError.notFound) { try await store.update(ghost) }
            }
        }

        @Test(arguments: DatabaseBackend.allCases)
        func deleteAndRecordLogin(_ backend: DatabaseBackend) async throws {
            try await withTestDatabase(backend) { (database: TestDatabase) async throws in
                let store = database.users
                _ = try await store.create(
                    username: "john", email: "john@example.com", passwordHash: "h", quotaMB: 1000, isAdmin: false)
                let when = Date(timeIntervalSince1970: 1_761_207_300)
                try await store.recordLogin(username: "john", at: when)
                #expect(try await store.user(named: "john")?.lastLogin == when)
                await #expect(throws: UserStoreError.notFound) {
                    try await store.recordLogin(username: "nobody", at: when)
                }
                #expect(try await store.delete(username: "john"))
                #expect(try await !store.delete(username: "john"))
                #expect(try await store.user(named: "john") == nil)
                #expect(try await store.count() == 0)
            }
        }
    }
}

// MARK: - Argon2id

extension AccountTests {
    @Suite struct Argon2idHasherTests {
        @Test func defaultParametersGiveTheDocumentedFormat() async throws {
            let hasher = Argon2idHasher(threadPool: NIOThreadPool.singleton)
            #expect(hasher.parameters == .default)
            let encoded = try await hasher.hash("MyP@ssw0rd")
            let prefix = "$argon2id$v=19$m=65536,t=3,p=4$"
            #expect(encoded.hasPrefix(prefix))
            let fields = encoded.dropFirst(prefix.count).split(separator: "$", omittingEmptySubsequences: false)
            #expect(fields.count == 2)
            #expect(!fields.joined().contains("="))  // no padding
            #expect(decodePHCBase64(fields[0])?.count == 16)
            #expect(decodePHCBase64(fields[1])?.count == 32)
            #expect(try await hasher.verify("MyP@ssw0rd", against: encoded))
            #expect(try await !hasher.verify("MyP@ssw0rd!", against: encoded))
        }

        @Test func knownAnswerFromTheReferenceImplementation() async throws {
            // phc-winner-argon2's own test vector (src/test.c): Argon2id v=19, m=65536, t=2, p=1,
            // password "password", salt "somesalt".
            let reference = "$argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc"
            let encoded = try Argon2idHasher.encode(
                password: "password", salt: Array("somesalt".utf8),
                parameters: .init(timeCost: 2, memoryKiB: 65536, parallelism: 1))
            #expect(encoded == reference)
            let hasher = cheapHasher()
            #expect(try await hasher.verify("password", against: reference))
            #expect(try await !hasher.verify("Password", against: reference))
        }

        @Test func cheapRoundTripAndRandomSalt() async throws {
            let hasher = cheapHasher()
            let a = try await hasher.hash("Tr0ub4dor&3")
            let b = try await hasher.hash("Tr0ub4dor&3")
            #expect(a.hasPrefix("$argon2id$v=19$m=1024,t=1,p=1$"))
            #expect(a != b)
            #expect(try await hasher.verify("Tr0ub4dor&3", against: a))
            #expect(try await hasher.verify("Tr0ub4dor&3", against: b))
            #expect(try await !hasher.verify("tr0ub4dor&3", against: a))
            #expect(try await !hasher.verify("", against: a))
            // Hashes made with other parameters still verify (parameters come from the string).
            #expect(try await Argon2idHasher(threadPool: NIOThreadPool.singleton).verify("Tr0ub4dor&3", against: a))
            // Unicode and empty passwords hash fine.
            let unicode = try await hasher.hash("pässwörd✓")
            #expect(try await hasher.verify("pässwörd✓", against: unicode))
            let empty = try await hasher.hash("")
            #expect(try await hasher.verify("", against: empty))
        }

        @Test(arguments: [
            "",
            "garbage",
            "$argon2id$",
            "$argon2i$v=19$m=1024,t=1,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
            "$argon2d$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
            "$argon2id$v=16$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
            "$argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$",
            "$argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$!!!!",
            "$argon2id$v=19$m=65536,t=2,p=1$$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
            "$argon2id$v=19$m=65536,t=2$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
            "$argon2id$v=19$m=65536,t=0,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
            "$argon2id$v=19$m=4194304,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",  // 4 GiB: refused
            "$argon2id$v=19$m=65536,t=1000000,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
            "$argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc$extra",
            "$argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPP\u{0}c",
            " $argon2id$v=19$m=65536,t=2,p=1$c29tZXNhbHQ$CTFhFdXPJO1aFaMaO6Mm5c8y7cJHAph8ArZWb2GRPPc",
        ])
        func malformedHashesAreFalseNotErrors(_ encoded: String) async throws {
            #expect(try await !cheapHasher().verify("password", against: encoded))
        }

        @Test func semaphoreBoundsConcurrencyAndHonoursCancellation() async throws {
            let semaphore = AsyncSemaphore(permits: 2)
            try await semaphore.acquire()
            try await semaphore.acquire()
            final class Flag: Sendable { let value = Mutex(false) }
            let third = Flag()
            let waiter = Task {
                try await semaphore.acquire()
                third.value.withLock { $0 = true }
            }
            try await Task.sleep(for: .milliseconds(100))
            #expect(third.value.withLock { $0 } == false)
            semaphore.release()
            try await waiter.value
            #expect(third.value.withLock { $0 })

            // All permits taken again: a cancelled waiter throws and takes no permit.
            let cancelled = Task { try await semaphore.acquire() }
            try await Task.sleep(for: .milliseconds(50))
            cancelled.cancel()
            await #expect(throws: CancellationError.self) { try await cancelled.value }
            semaphore.release()
            try await semaphore.acquire()  // the permit released above is free
        }

        @Test func manyConcurrentHashesComplete() async throws {
            let hasher = Argon2idHasher(threadPool: NIOThreadPool.singleton, maxConcurrent: 2, parameters: cheap)
            let results = try await withThrowingTaskGroup(of: Bool.self) { group in
                for index in 0..<16 {
                    group.addTask {
                        let hash = try await hasher.hash("pw\(index)")
                        return try await hasher.verify("pw\(index)", against: hash)
                    }
                }
                return try await group.reduce(into: [Bool]()) { $0.append($1) }
            }
            #expect(results.count == 16)
            #expect(results.allSatisfy { $0 })
        }
    }
}

// MARK: - AccountService

/// Counts verifications; the hashing itself is the real Argon2id.
private final class CountingHasher: PasswordHasher {
    let inner: Argon2idHasher
    let verifications = Mutex(0)

    init(inner: Argon2idHasher) { self.inner = inner }

    func hash(_ password: String) async throws -> String { try await inner.hash(password) }
    func verify(_ password: String, against encodedHash: String) async throws -> Bool {
        verifications.withLock { $0 += 1 }
        return try await inner.verify(password, against: encodedHash)
    }
}

extension AccountTests {
    @Suite struct AccountServiceTests {
        @Test(arguments: ["john", "a", "0", "j.doe", "j_doe", "j-doe", "a1.b2_c3-d4", String(repeating: "a", count: 64)])
        func goodUsernames(_ username: String) throws {
            try AccountService.validateUsername(username)
        }

        @Test(arguments: [
            "", "John", "jOhn", ".john", "_john", "-john", "jo hn", "john@example.com", "jöhn", "john/..", "jo\nhn",
            String(repeating: "a", count: 65), "john\u{0}",
        ])
        func badUsernames(_ username: String) {
            #expect(throws: AccountError.invalidUsername(username)) { try AccountService.validateUsername(username) }
        }

        @Test(arguments: [
            "john@example.com", "John.Doe@Example.COM", "a@b.co", "first.last+tag@mail.example.org", "root@localhost",
            "x@LOCALHOST", "user_name-1@sub-domain.example.com", "müller@example.de", "o'brien@example.ie",
            String(repeating: "a", count: 64) + "@example.com",
            "a@" + String(repeating: "b", count: 63) + ".com",
            String(repeating: "a", count: 64) + "@" + [String](repeating: String(repeating: "b", count: 60), count: 3)
                .joined(separator: ".") + ".com",  // 64 + 1 + 186 = 251 octets
        ])
        func goodEmails(_ email: String) throws {
            try AccountService.validateEmail(email)
        }

        @Test(arguments: [
            "", "john", "@example.com", "john@", "john@@example.com", "jo@hn@example.com", "john@example",
            "john@-example.com", "john@example-.com", "john@exa_mple.com", "john@example..com", "john@.example.com",
            "john@example.com.", "jo hn@example.com", "john@exam ple.com", "<john@example.com>", "john<@example.com",
            "john>@example.com", "jo\nhn@example.com", "jo\rhn@example.com", "jo\thn@example.com", "jo\u{7f}hn@example.com",
            "jo\u{0}hn@example.com", ".john@example.com", "john.@example.com", "jo..hn@example.com", "a/b@example.com",
            "../x@example.com", "john@exämple.com", "john@[127.0.0.1]", "\"john\"@example.com",
            String(repeating: "a", count: 65) + "@example.com",
            "a@" + String(repeating: "b", count: 64) + ".com",
            String(repeating: "a", count: 64) + "@" + [String](repeating: String(repeating: "b", count: 60), count: 3)
                .joined(separator: ".") + ".comm" + ".de",  // 255 octets
        ])
        func badEmails(_ email: String) {
            #expect(throws: AccountError.invalidEmail(email)) { try AccountService.validateEmail(email) }
        }

        @Test(arguments: [
            "MyP@ssw0rd", "abcdefG1", "abcdefG!", "ABCDEFg1", "abcd1234!", "ABCD1234!", "Pass word 1",
            String(repeating: "aB1", count: 341) + "x",  // 1024 characters
            "Ünïcödé1",
        ])
        func goodPasswords(_ password: String) throws {
            try AccountService.validatePassword(password)
        }

        @Test(arguments: [
            ("", "must be 8 to 1024 characters"),
            ("aB1!aB1", "must be 8 to 1024 characters"),
            (String(repeating: "aB1", count: 341) + "xy", "must be 8 to 1024 characters"),
            (String(repeating: "aB1!", count: 100_000), "must be 8 to 1024 characters"),
            ("password", "must contain at least 3 of: lower case, upper case, digit, other character"),
            ("Password", "must contain at least 3 of: lower case, upper case, digit, other character"),
            ("password1", "must contain at least 3 of: lower case, upper case, digit, other character"),
            ("12345678!", "must contain at least 3 of: lower case, upper case, digit, other character"),
            ("PASSWORD1", "must contain at least 3 of: lower case, upper case, digit, other character"),
            ("aB1!\u{0}xyz", "must not contain a NUL character"),
        ])
        func badPasswords(_ password: String, _ reason: String) {
            #expect(throws: AccountError.weakPassword(reason)) { try AccountService.validatePassword(password) }
        }

        @Test func quotas() throws {
            for good in [0, 1, 1000, 1_048_576] { try AccountService.validateQuota(good) }
            for bad in [-1, 1_048_577, Int.max, Int.min] {
                #expect(throws: AccountError.invalidQuota(bad)) { try AccountService.validateQuota(bad) }
            }
        }

        @Test func errorMessagesAreOneLineAndSanitised() {
            let errors: [AccountError] = [
                .invalidUsername("bad\nname\u{1b}[31m"), .invalidEmail("x\r\ny"), .weakPassword("must be 8 to 1024 characters"),
                .invalidQuota(-1), .duplicateUsername, .duplicateEmail, .unknownUser("ghost\n"),
            ]
            for error in errors {
                #expect(!error.description.isEmpty)
                #expect(!error.description.contains("\n"))
                #expect(!error.description.contains("\r"))
                #expect(!error.description.contains("\u{1b}"))
            }
            #expect(AccountError.unknownUser("john").description == "unknown user: john")
            #expect(AccountError.invalidQuota(-5).description == "invalid quota: -5 MB (must be 0 to 1048576)")
        }

        @Test(arguments: DatabaseBackend.allCases)
        func createValidatesAndMapsDuplicates(_ backend: DatabaseBackend) async throws {
            try await withAccounts(backend) { (accounts: AccountService, store: any UserStore) async throws in
                let john = try await accounts.create(username: "john", email: "john@example.com", password: "MyP@ssw0rd")
                #expect(john.id == 1)
                #expect(john.quotaMB == 1000)
                #expect(!john.isAdmin)
                #expect(john.passwordHash.hasPrefix("$argon2id$v=19$m=1024,t=1,p=1$"))
                #expect(!john.passwordHash.contains("MyP@ssw0rd"))
                #expect(try await store.user(named: "john") == john)

                await #expect(throws: AccountError.duplicateUsername) {
                    _ = try await accounts.create(username: "john", email: "j2@example.com", password: "MyP@ssw0rd")
                }
                await #expect(throws: AccountError.duplicateEmail) {
                    _ = try await accounts.create(username: "john2", email: "JOHN@example.com", password: "MyP@ssw0rd")
                }
                await #expect(throws: AccountError.invalidUsername("John")) {
                    _ = try await accounts.create(username: "John", email: "x@example.com", password: "MyP@ssw0rd")
                }
                await #expect(throws: AccountError.invalidEmail("x@example")) {
                    _ = try await accounts.create(username: "x", email: "x@example", password: "MyP@ssw0rd")
                }
                await #expect(throws: AccountError.weakPassword("must be 8 to 1024 characters")) {
                    _ = try await accounts.create(username: "x", email: "x@example.com", password: "short")
                }
                await #expect(throws: AccountError.invalidQuota(-1)) {
                    _ = try await accounts.create(username: "x", email: "x@example.com", password: "MyP@ssw0rd", quotaMB: -1)
                }
                let admin = try await accounts.create(
                    username: "root", email: "root@localhost", password: "MyP@ssw0rd", quotaMB: 0, isAdmin: true)
                #expect(admin.isAdmin)
                #expect(admin.quotaMB == 0)
                #expect(try await store.count() == 2)
            }
        }

        @Test(arguments: DatabaseBackend.allCases)
        func updatesDeleteInfoAndList(_ backend: DatabaseBackend) async throws {
            try await withAccounts(backend) { (accounts: AccountService, _: any UserStore) async throws in
                _ = try await accounts.create(username: "john", email: "john@example.com", password: "MyP@ssw0rd")
                _ = try await accounts.create(username: "jane", email: "jane@example.com", password: "MyP@ssw0rd")

                try await accounts.setPassword(username: "john", password: "NewP@ssw0rd123")
                #expect(try await accounts.authenticate(login: "john", password: "MyP@ssw0rd") == nil)
                #expect(try await accounts.authenticate(login: "john", password: "NewP@ssw0rd123") != nil)
                await #expect(throws: AccountError.weakPassword("must be 8 to 1024 characters")) {
                    try await accounts.setPassword(username: "john", password: "x")
                }
                await #expect(throws: AccountError.unknownUser("ghost")) {
                    try await accounts.setPassword(username: "ghost", password: "NewP@ssw0rd123")
                }

                try await accounts.setQuota(username: "john", quotaMB: 2000)
                #expect(try await accounts.info(username: "john").quotaMB == 2000)
                await #expect(throws: AccountError.invalidQuota(1_048_577)) {
                    try await accounts.setQuota(username: "john", quotaMB: 1_048_577)
                }
                await #expect(throws: AccountError.unknownUser("ghost")) {
                    try await accounts.setQuota(username: "ghost", quotaMB: 1)
                }

                try await accounts.setEmail(username: "john", email: "johnny@example.org")
                #expect(try await accounts.info(username: "john").email == "johnny@example.org")
                await #expect(throws: AccountError.duplicateEmail) {
                    try await accounts.setEmail(username: "john", email: "Jane@Example.com")
                }

                let (users, total) = try await accounts.list(offset: 0, limit: 1)
                #expect(users.map(\.username) == ["john"])
                #expect(total == 2)
                #expect(try await accounts.list(offset: -5, limit: 5000).users.count == 2)

                try await accounts.delete(username: "john")
                await #expect(throws: AccountError.unknownUser("john")) { try await accounts.delete(username: "john") }
                await #expect(throws: AccountError.unknownUser("john")) { _ = try await accounts.info(username: "john") }
            }
        }

        @Test(arguments: DatabaseBackend.allCases)
        func authenticate(_ backend: DatabaseBackend) async throws {
            try await withTestDatabase(backend) { (database: TestDatabase) async throws in
                let store = database.users
                let hasher = CountingHasher(inner: cheapHasher())
                let accounts = AccountService(users: store, hasher: hasher)
                _ = try await accounts.create(username: "john", email: "john@example.com", password: "MyP@ssw0rd")
                _ = try await accounts.create(username: "jane", email: "jane@example.com", password: "MyP@ssw0rd")
                try await accounts.setEnabled(username: "jane", enabled: false)

                // Right password: the user, with last_login recorded.
                let before = Date().timeIntervalSince1970.rounded(.down)
                let john = try #require(try await accounts.authenticate(login: "john", password: "MyP@ssw0rd"))
                #expect(john.username == "john")
                let stored = try #require(try await store.user(named: "john")?.lastLogin)
                #expect(stored.timeIntervalSince1970 >= before)
                #expect(john.lastLogin == stored)

                // By email, case-insensitive.
                #expect(try await accounts.authenticate(login: "JOHN@example.com", password: "MyP@ssw0rd")?.id == john.id)

                // Wrong password, unknown user, disabled user, empty login: nil, each after one verification.
                for (login, password) in [
                    ("john", "MyP@ssw0rD"), ("ghost", "MyP@ssw0rd"), ("ghost@example.com", "MyP@ssw0rd"),
                    ("jane", "MyP@ssw0rd"), ("jane@example.com", "MyP@ssw0rd"), ("", ""),
                ] {
                    let count = hasher.verifications.withLock { $0 }
                    #expect(try await accounts.authenticate(login: login, password: password) == nil)
                    #expect(hasher.verifications.withLock { $0 } == count + 1, "login \(login)")
                }
                // A disabled user's last_login is not touched.
                #expect(try await store.user(named: "jane")?.lastLogin == nil)

                // recordLogin: false leaves last_login alone.
                try await store.recordLogin(username: "john", at: Date(timeIntervalSince1970: 100))
                #expect(try await accounts.authenticate(login: "john", password: "MyP@ssw0rd", recordLogin: false) != nil)
                #expect(try await store.user(named: "john")?.lastLogin == Date(timeIntervalSince1970: 100))

                // Re-enabled: works again.
                try await accounts.setEnabled(username: "jane", enabled: true)
                #expect(try await accounts.authenticate(login: "jane", password: "MyP@ssw0rd") != nil)
            }
        }

        @Test func dummyHashUsesTheSameParametersAndIsMadeOnce() async throws {
            let hasher = cheapHasher()
            let dummy = DummyHash()
            let first = try await dummy.value(using: hasher)
            let second = try await dummy.value(using: hasher)
            #expect(first == second)
            #expect(first.hasPrefix("$argon2id$v=19$m=1024,t=1,p=1$"))
        }

        @Test(arguments: DatabaseBackend.allCases)
        func ensureAdminGeneratesAPasswordOnceWhenEmpty(_ backend: DatabaseBackend) async throws {
            try await withAccounts(backend) { (accounts: AccountService, store: any UserStore) async throws in
                let generated = try #require(
                    try await accounts.ensureAdmin(username: "admin", email: "admin@localhost", password: nil))
                #expect(generated.count == 20)
                try AccountService.validatePassword(generated)
                let admin = try #require(try await store.user(named: "admin"))
                #expect(admin.isAdmin)
                #expect(admin.email == "admin@localhost")
                #expect(try await accounts.authenticate(login: "admin", password: generated) != nil)
                // Not empty any more: nothing happens.
                #expect(try await accounts.ensureAdmin(username: "other", email: "other@localhost", password: nil) == nil)
                #expect(try await store.count() == 1)
            }
        }

        @Test(arguments: DatabaseBackend.allCases)
        func ensureAdminWithAGivenPassword(_ backend: DatabaseBackend) async throws {
            try await withAccounts(backend) { (accounts: AccountService, store: any UserStore) async throws in
                await #expect(throws: AccountError.weakPassword("must be 8 to 1024 characters")) {
                    _ = try await accounts.ensureAdmin(username: "admin", email: "admin@localhost", password: "weak")
                }
                #expect(try await store.count() == 0)
                #expect(try await accounts.ensureAdmin(username: "admin", email: "admin@localhost", password: "Adm1n!pass") == nil)
                #expect(try await store.user(named: "admin")?.isAdmin == true)
                #expect(try await accounts.authenticate(login: "admin", password: "Adm1n!pass") != nil)
            }
            // A table with an ordinary user only is not empty either.
            try await withAccounts(backend) { (accounts: AccountService, store: any UserStore) async throws in
                _ = try await accounts.create(username: "john", email: "john@example.com", password: "MyP@ssw0rd")
                #expect(try await accounts.ensureAdmin(username: "admin", email: "admin@localhost", password: nil) == nil)
                #expect(try await store.user(named: "admin") == nil)
            }
        }

        @Test func generatedPasswordsAreStrongAndDistinct() throws {
            var seen = Set<String>()
            for _ in 0..<200 {
                let password = AccountService.generatePassword()
                #expect(password.count == 20)
                try AccountService.validatePassword(password)
                seen.insert(password)
            }
            #expect(seen.count == 200)
        }
    }
}

@Suite struct MessageIDTests {
    @Test func idsAreMsgAnd20Base32CharactersAndDistinct() {
        let ids = (0..<2000).map { _ in MessageID.make() }
        #expect(Set(ids).count == ids.count)
        for id in ids {
            #expect(id.wholeMatch(of: /msg_[a-z2-7]{20}/) != nil, "\(id)")
        }
        // Every position takes every value over many ids (no position stuck: the bit slicing is right).
        for position in 4..<24 {
            let values = Set(ids.map { Array($0.utf8)[position] })
            #expect(values.count == 32, "position \(position): \(values.count) values")
        }
    }
}

/// A mailbox store whose usage is set by the test, counting how often it is measured.
private final class MeasuredStore: MailboxStore {
    let usage = Mutex<(bytes: Int64, measured: Int)>((0, 0))
    func makeDeliveryKey() -> String { MessageID.make() }
    func deliver(_ content: ByteBuffer, _ delivery: MailboxDelivery) async throws -> Bool { true }
    func list(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (messages: [StoredMessage], total: Int) { ([], 0) }
    func fetch(mailbox: String, folder: String, id: String) async throws -> ByteBuffer? { nil }
    func delete(mailbox: String, folder: String, id: String) async throws -> Bool { false }
    func setFlags(_ flags: Set<MessageFlag>, mailbox: String, folder: String, id: String) async throws -> Bool { false }
    func usageBytes(of mailbox: String) async throws -> Int64 {
        usage.withLock { usage in
            usage.measured += 1
            return usage.bytes
        }
    }
    func deleteMailbox(_ mailbox: String) async throws {}
}

@Suite struct QuotaCheckerTests {
    let user = User(
        id: 1, username: "u", email: "u@example.test", passwordHash: "", quotaMB: 10, isAdmin: false, enabled: true,
        createdAt: Date(), lastLogin: nil)

    @Test("far from the quota, deliveries are counted into the cached usage instead of measuring the mailbox each time")
    func cachedFarFromTheLimit() async throws {
        let store = MeasuredStore()
        let quota = QuotaChecker(mailboxes: store, cacheLifetime: .seconds(60))
        for _ in 0..<100 { #expect(try await quota.wouldExceed(user, adding: 10_000) == false) }
        #expect(store.usage.withLock { $0.measured } == 1)
        // 100 × 10 kB counted: RCPT sees it without measuring.
        store.usage.withLock { $0.bytes = 0 }
        #expect(try await quota.isOverQuota(user) == false)
        #expect(store.usage.withLock { $0.measured } == 1)
    }

    @Test("near the quota, every delivery measures afresh, and one that would overflow is refused")
    func freshNearTheLimit() async throws {
        let store = MeasuredStore()
        store.usage.withLock { $0.bytes = 9 * 1_048_576 + 600_000 }  // 9.6 of 10 MB
        let quota = QuotaChecker(mailboxes: store, cacheLifetime: .seconds(60))
        #expect(try await quota.wouldExceed(user, adding: 100_000) == false)
        #expect(try await quota.wouldExceed(user, adding: 100_000) == false)
        #expect(store.usage.withLock { $0.measured } == 2)
        #expect(try await quota.wouldExceed(user, adding: 1_000_000) == true)
        #expect(store.usage.withLock { $0.measured } == 3)
    }
}
