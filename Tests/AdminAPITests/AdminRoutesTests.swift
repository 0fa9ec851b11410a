import Foundation
import Hummingbird
import HummingbirdTesting
import MailTier
import MailTierArgon2
import MailTierFiles
import MailTierSQLite
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

@testable import AdminAPI

// The admin REST API in router mode, on real parts: a SQLite database (users, queue), Argon2id,
// a maildir and the in-process rate limiter. API.md "User Management", "Queue Management",
// "Statistics", "Rate Limiting".

private let adminPassword = "Admin-Passw0rd"
private let alicePassword = "Alice-Passw0rd"
private let bobPassword = "Bob-Passw0rd!"

private func basic(_ user: String, _ password: String) -> String {
    "Basic " + Data("\(user):\(password)".utf8).base64EncodedString()
}

/// The real Argon2id hasher, counting its verifications.
private final class CountingHasher: PasswordHasher {
    let real = Argon2idHasher(threadPool: NIOThreadPool.singleton)
    let count = NIOLockedValueBox(0)
    var verifications: Int { count.withLockedValue { $0 } }
    func hash(_ password: String) async throws -> String { try await real.hash(password) }
    func verify(_ password: String, against encodedHash: String) async throws -> Bool {
        count.withLockedValue { $0 += 1 }
        return try await real.verify(password, against: encodedHash)
    }
}

private struct Fixture {
    let directory: String
    let hasher: CountingHasher
    let accounts: AccountService
    let mailboxes: any MailboxStore
    let queue: SQLiteMessageQueue
    let spool: SpoolBlobStore
    let limiter: InProcessRateLimiter
    let admin: String
    let alice: String
    let bob: String

    /// admin (is_admin), alice and bob, with `limits` for the API (unlimited requests unless given).
    static func make(
        requestRule: RateRule? = nil, failureRule: RateRule? = RateRule(limit: 5, window: .seconds(3600)), databaseMailboxes: Bool = false
    ) async throws
        -> (Fixture, Application<RouterResponder<AdminRequestContext>>)
    {
        let directory = NSTemporaryDirectory() + "mailtier-api-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let database = try SQLiteDatabase(path: directory + "/smtp.db", threadPool: NIOThreadPool.singleton)
        let hasher = CountingHasher()
        let accounts = AccountService(users: SQLiteUserStore(database: database), hasher: hasher)
        _ = try await accounts.create(username: "admin", email: "admin@example.com", password: adminPassword, isAdmin: true)
        _ = try await accounts.create(username: "alice", email: "alice@example.com", password: alicePassword, quotaMB: 10)
        _ = try await accounts.create(username: "bob", email: "bob@example.com", password: bobPassword)
        let fixture = Fixture(
            directory: directory, hasher: hasher, accounts: accounts,
            mailboxes: databaseMailboxes
                ? SQLiteMailboxStore(database: database)
                : MaildirStore(root: directory + "/mail", hostname: "mx.example", threadPool: NIOThreadPool.singleton),
            queue: SQLiteMessageQueue(database: database),
            spool: try SpoolBlobStore(directory: directory + "/spool", threadPool: NIOThreadPool.singleton),
            limiter: InProcessRateLimiter(),
            admin: basic("admin", adminPassword), alice: basic("alice", alicePassword), bob: basic("bob", bobPassword))
        let services = AdminServices(
            accounts: accounts, mailboxes: fixture.mailboxes, queue: fixture.queue, spool: fixture.spool,
            authenticator: APIAuthenticator(accounts: accounts, limiter: fixture.limiter, settings: .init(failureRule: failureRule)),
            requestRule: requestRule,
            statistics: { [fixture] in
                try await AdminStatistics.collect(
                    queue: fixture.queue, storage: fixture.storedMail, connections: (2, 9))
            })
        let health = HealthEndpoint(checks: HealthChecks([]))
        return (fixture, Application(router: AdminAPI.router(health: health, services: services)))
    }

    func remove() { try? FileManager.default.removeItem(atPath: directory) }

    /// Measured on every call (the server keeps a measurement for 30 s).
    var storedMail: StoredMailFigures { StoredMailFigures(accounts: accounts, mailboxes: mailboxes, lifetime: .zero) }

    func store(_ content: String, for mailbox: String) async throws {
        _ = try await mailboxes.deliver(
            ByteBuffer(string: content),
            MailboxDelivery(mailbox: mailbox, messageID: "msg_\(UUID().uuidString.prefix(8))", deliveryKey: mailboxes.makeDeliveryKey(),
                            sender: "s@example.com", receivedAt: Date()))
    }

    func enqueue(_ id: String, to recipients: [String] = ["bob@example.com"]) async throws {
        let blob = "Subject: Test Email\r\n\r\nhello\r\n"
        try await spool.put(key: id, data: ByteBuffer(string: blob))
        try await queue.enqueue(
            QueuedMessage(
                id: id, blobKey: id, sha256: "", sizeBytes: blob.utf8.count, mailFrom: "sender@example.com", subject: "Test Email",
                smtputf8: false, bodyType: nil, deliverBy: nil, deliverByMode: nil, clientAddress: "192.0.2.1",
                heloName: "client.example", authenticatedUser: nil, createdAt: Date()),
            recipients: recipients.map { QueuedRecipient(address: $0, domain: "example.com", isLocal: true) }, maxAttempts: 5)
    }
}

private func json(_ buffer: ByteBuffer) throws -> [String: Any] {
    let object = try JSONSerialization.jsonObject(with: Data(buffer.readableBytesView))
    return try #require(object as? [String: Any], "not an object: \(String(buffer: buffer))")
}

private func body(_ object: [String: Any]) throws -> ByteBuffer {
    ByteBuffer(data: try JSONSerialization.data(withJSONObject: object))
}

extension TestClientProtocol {
    /// One request; returns the status, the headers and the body as JSON (an error body too).
    fileprivate func call(
        _ method: HTTPRequest.Method, _ uri: String, auth: String?, body: ByteBuffer? = nil
    ) async throws -> (status: HTTPResponse.Status, headers: HTTPFields, json: [String: Any]) {
        var headers: HTTPFields = [:]
        if let auth { headers[.authorization] = auth }
        if body != nil { headers[.contentType] = "application/json" }
        return try await execute(uri: uri, method: method, headers: headers, body: body) { response in
            #expect(response.headers[.apiVersion] == "1.0", "\(method) \(uri): no X-API-Version")
            #expect(response.headers[.contentType]?.hasPrefix("application/json") == true, "\(method) \(uri)")
            let parsed = try json(response.body)
            if response.status.code >= 400 {
                #expect(parsed["error"] is String && parsed["message"] is String, "\(method) \(uri): error body \(parsed)")
            }
            return (response.status, response.headers, parsed)
        }
    }
}

@Suite("Admin REST API (router, SQLite, Argon2id, maildir)")
struct AdminRoutesTests {
    @Test("authorisation matrix: admin, self, another user, no credentials, a malformed header")
    func authorisationMatrix() async throws {
        let (fixture, app) = try await Fixture.make()
        defer { fixture.remove() }
        try await fixture.enqueue("msg_matrix1")
        try await app.test(.router) { client in
            // (method, uri, body, expected for admin, alice on herself, alice on others)
            let cases: [(HTTPRequest.Method, String, [String: Any]?, HTTPResponse.Status, HTTPResponse.Status)] = [
                (.get, "/api/users", nil, .ok, .forbidden),
                (.get, "/api/users/alice", nil, .ok, .ok),
                (.get, "/api/users/bob", nil, .ok, .forbidden),
                (.put, "/api/users/alice", ["email": "alice2@example.com"], .ok, .ok),
                (.put, "/api/users/bob", ["email": "bob2@example.com"], .ok, .forbidden),
                (.get, "/api/queue", nil, .ok, .forbidden),
                (.get, "/stats", nil, .ok, .forbidden),
                (.post, "/api/queue/msg_none/retry", nil, .notFound, .forbidden),
                (.delete, "/api/queue/msg_none", nil, .notFound, .forbidden),
                (.post, "/api/users", ["username": "carol", "email": "carol@example.com", "password": "Carol-Passw0rd"], .created, .forbidden),
                (.delete, "/api/users/carol", nil, .ok, .forbidden),
            ]
            for (method, uri, payload, forAdmin, forAlice) in cases {
                // Non-admin first: a 403 must change nothing.
                let asAlice = try await client.call(method, uri, auth: fixture.alice, body: try payload.map(body))
                #expect(asAlice.status == forAlice, "alice \(method) \(uri): \(asAlice.status) \(asAlice.json)")
                let asAdmin = try await client.call(method, uri, auth: fixture.admin, body: try payload.map(body))
                #expect(asAdmin.status == forAdmin, "admin \(method) \(uri): \(asAdmin.status) \(asAdmin.json)")
                #expect(asAdmin.headers[.xRateLimitLimit] == nil, "no request limit configured")
                for auth in [nil, "Basic !!!", "Bearer abc", basic("", "x"), "Basic " + Data("nocolon".utf8).base64EncodedString()] {
                    let anonymous = try await client.call(method, uri, auth: auth, body: try payload.map(body))
                    #expect(anonymous.status == .unauthorized, "\(auth ?? "none") \(method) \(uri): \(anonymous.status)")
                    #expect(anonymous.headers[.wwwAuthenticate]?.hasPrefix("Basic realm=\"mailtier\"") == true)
                }
            }
            // /health needs nothing.
            #expect(try await client.call(.get, "/health", auth: nil).status == .ok)
        }
    }

    @Test("users: create, list, get, update, delete with the document's shapes; a non-admin cannot change quota, enabled or admin")
    func userLifecycle() async throws {
        let (fixture, app) = try await Fixture.make()
        defer { fixture.remove() }
        // 2 MiB of mail for alice: used_mb 2.0
        let big = ByteBuffer(string: "Subject: big\r\n\r\n" + String(repeating: "x", count: 2 * 1_048_576 - 16))
        _ = try await fixture.mailboxes.deliver(
            big, MailboxDelivery(mailbox: "alice@example.com", messageID: "msg_big", deliveryKey: fixture.mailboxes.makeDeliveryKey(),
                                 sender: "s@example.com", receivedAt: Date()))
        try await app.test(.router) { client in
            let created = try await client.call(
                .post, "/api/users", auth: fixture.admin,
                body: try body(["username": "jane", "email": "jane@example.com", "password": "SecureP@ssw0rd", "quota_mb": 1000]))
            #expect(created.status == .created)
            #expect(Set(created.json.keys) == ["id", "username", "email", "created_at", "quota_mb", "enabled"])
            #expect(created.json["username"] as? String == "jane" && created.json["quota_mb"] as? Int == 1000)
            #expect(created.json["enabled"] as? Bool == true)
            let createdAt = try #require(created.json["created_at"] as? String)
            #expect(createdAt.wholeMatch(of: /\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ/) != nil, "\(createdAt)")
            #expect(try await client.call(
                .post, "/api/users", auth: fixture.admin,
                body: try body(["username": "jane", "email": "other@example.com", "password": "SecureP@ssw0rd"])).status == .conflict)
            #expect(try await client.call(
                .post, "/api/users", auth: fixture.admin,
                body: try body(["username": "jane2", "email": "JANE@example.com", "password": "SecureP@ssw0rd"])).status == .conflict)

            let list = try await client.call(.get, "/api/users?limit=2&offset=1", auth: fixture.admin)
            #expect(list.status == .ok)
            #expect(list.json["total"] as? Int == 4 && list.json["offset"] as? Int == 1 && list.json["limit"] as? Int == 2)
            let users = try #require(list.json["users"] as? [[String: Any]])
            #expect(users.map { $0["username"] as? String } == ["alice", "bob"])
            #expect(Set(users[0].keys) == ["id", "username", "email", "created_at", "last_login", "quota_mb", "used_mb", "enabled"])
            #expect(users[0]["used_mb"] as? Double == 2.0, "\(users[0])")
            #expect(users[1]["used_mb"] as? Double == 0.0)
            // Defaults: offset 0, limit 100.
            let all = try await client.call(.get, "/api/users", auth: fixture.admin)
            #expect(all.json["offset"] as? Int == 0 && all.json["limit"] as? Int == 100)
            #expect((all.json["users"] as? [[String: Any]])?.count == 4)

            let alice = try await client.call(.get, "/api/users/alice", auth: fixture.alice)
            #expect(alice.status == .ok)
            #expect(alice.json["last_login"] is String, "alice logged in with this request: \(alice.json)")
            let statistics = try #require(alice.json["statistics"] as? [String: Any])
            #expect(statistics["messages_received"] as? Int == 1 && statistics["storage_used_mb"] as? Double == 2.0, "\(statistics)")
            #expect(statistics["messages_sent"] is Int)
            #expect(alice.json["password_hash"] == nil && alice.json["password"] == nil)
            #expect(try await client.call(.get, "/api/users/nobody", auth: fixture.admin).status == .notFound)

            // Self: email and password yes; quota, enabled, is_admin no.
            for forbidden: [String: Any] in [["quota_mb": 5000], ["enabled": false], ["is_admin": true]] {
                let refused = try await client.call(.put, "/api/users/alice", auth: fixture.alice, body: try body(forbidden))
                #expect(refused.status == .forbidden, "\(forbidden): \(refused.status)")
            }
            #expect(try await fixture.accounts.info(username: "alice").quotaMB == 10)
            // Mailboxes are named by address: with mail in it, the address stays.
            let moved = try await client.call(.put, "/api/users/alice", auth: fixture.alice, body: try body(["email": "new@example.com"]))
            #expect(moved.status == .conflict, "\(moved.json)")
            let updated = try await client.call(.put, "/api/users/bob", auth: fixture.bob, body: try body(["email": "new@example.com"]))
            #expect(updated.status == .ok)
            #expect(Set(updated.json.keys) == ["id", "username", "email", "quota_mb", "enabled"])
            #expect(updated.json["email"] as? String == "new@example.com" && updated.json["username"] as? String == "bob")
            let byAdmin = try await client.call(.put, "/api/users/alice", auth: fixture.admin, body: try body(["quota_mb": 2000, "enabled": false]))
            #expect(byAdmin.status == .ok && byAdmin.json["quota_mb"] as? Int == 2000 && byAdmin.json["enabled"] as? Bool == false)
            // Disabled: alice's remembered credentials no longer work.
            #expect(try await client.call(.get, "/api/users/alice", auth: fixture.alice).status == .unauthorized)
            // An admin cannot lock themselves out.
            #expect(try await client.call(.put, "/api/users/admin", auth: fixture.admin, body: try body(["enabled": false])).status == .conflict)
            #expect(try await client.call(.put, "/api/users/admin", auth: fixture.admin, body: try body(["is_admin": false])).status == .conflict)
            #expect(try await client.call(.delete, "/api/users/admin", auth: fixture.admin).status == .conflict)

            let deleted = try await client.call(.delete, "/api/users/alice", auth: fixture.admin)
            #expect(deleted.status == .ok)
            #expect(deleted.json["success"] as? Bool == true && deleted.json["message"] as? String == "User deleted successfully")
            #expect(try await fixture.mailboxes.usageBytes(of: "alice@example.com") == 0, "the mailbox went with the account")
            #expect(try await client.call(.delete, "/api/users/alice", auth: fixture.admin).status == .notFound)
            #expect(try await client.call(.get, "/api/users/alice", auth: fixture.admin).status == .notFound)
        }
    }

    @Test("bad input is 400 with a JSON body naming the problem, never a 500")
    func validation() async throws {
        let (fixture, app) = try await Fixture.make()
        defer { fixture.remove() }
        try await app.test(.router) { client in
            let good: [String: Any] = ["username": "dave", "email": "dave@example.com", "password": "SecureP@ssw0rd"]
            let bad: [([String: Any], String)] = [
                (good.merging(["username": "-dave"]) { $1 }, "username"),
                (good.merging(["username": String(repeating: "d", count: 65)]) { $1 }, "username"),
                (good.merging(["email": "not an address"]) { $1 }, "email"),
                (good.merging(["password": "short"]) { $1 }, "password"),
                (good.merging(["password": "alllowercaseletters"]) { $1 }, "password"),
                (good.merging(["quota_mb": -1]) { $1 }, "quota"),
                (good.merging(["quota_mb": 2_000_000]) { $1 }, "quota"),
                (good.merging(["quota_mb": "1000"]) { $1 }, "quota_mb must be an integer"),
                (good.merging(["quota_mb": 1.5]) { $1 }, "quota_mb must be an integer"),
                (good.merging(["is_admin": "yes"]) { $1 }, "is_admin must be true or false"),
                (good.merging(["role": "admin"]) { $1 }, "unknown field role"),
                (["email": "dave@example.com", "password": "SecureP@ssw0rd"], "username is required"),
            ]
            for (payload, expected) in bad {
                let answer = try await client.call(.post, "/api/users", auth: fixture.admin, body: try body(payload))
                #expect(answer.status == .badRequest, "\(payload): \(answer.status)")
                #expect((answer.json["message"] as? String)?.contains(expected) == true, "\(payload): \(answer.json)")
            }
            for raw in ["{", "[1,2]", "\"text\"", "null", ""] {
                let answer = try await client.call(.post, "/api/users", auth: fixture.admin, body: ByteBuffer(string: raw))
                #expect(answer.status == .badRequest, "\(raw): \(answer.status)")
            }
            let huge = try await client.call(.post, "/api/users", auth: fixture.admin, body: ByteBuffer(repeating: 0x20, count: 70_000))
            #expect(huge.status == .contentTooLarge)
            #expect(try await client.call(.put, "/api/users/bob", auth: fixture.admin, body: ByteBuffer(string: "{}")).status == .badRequest)
            for query in ["limit=1001", "limit=0", "limit=-5", "limit=ten", "offset=-1", "offset=x"] {
                let answer = try await client.call(.get, "/api/users?\(query)", auth: fixture.admin)
                #expect(answer.status == .badRequest, "\(query): \(answer.status)")
                #expect(try await client.call(.get, "/api/queue?\(query)", auth: fixture.admin).status == .badRequest, "\(query)")
            }
            #expect(try await client.call(.get, "/api/users?limit=1000", auth: fixture.admin).status == .ok)
            #expect(try await client.call(.get, "/api/queue?status=done", auth: fixture.admin).status == .badRequest)
            #expect(try await fixture.accounts.list().total == 3, "nothing was created")
        }
    }

    @Test("queue: list with the document's shape and filter, retry, delete; unknown ids are 404")
    func queueRoutes() async throws {
        let (fixture, app) = try await Fixture.make()
        defer { fixture.remove() }
        try await fixture.enqueue("msg_first", to: ["bob@example.com", "alice@example.com"])
        try await fixture.enqueue("msg_second")
        try await app.test(.router) { client in
            let page = try await client.call(.get, "/api/queue", auth: fixture.admin)
            #expect(page.status == .ok)
            #expect(page.json["total"] as? Int == 2 && page.json["offset"] as? Int == 0 && page.json["limit"] as? Int == 100)
            let messages = try #require(page.json["messages"] as? [[String: Any]])
            #expect(messages.map { $0["id"] as? String } == ["msg_first", "msg_second"])
            #expect(Set(messages[0].keys) == ["id", "from", "to", "subject", "size_bytes", "attempts", "max_attempts", "next_retry", "status", "created_at"])
            #expect(messages[0]["to"] as? [String] == ["bob@example.com", "alice@example.com"])
            #expect(messages[0]["status"] as? String == "pending" && messages[0]["max_attempts"] as? Int == 5)
            #expect(try await client.call(.get, "/api/queue?status=retry", auth: fixture.admin).json["total"] as? Int == 0)
            #expect(try await client.call(.get, "/api/queue?status=pending&limit=1", auth: fixture.admin).json["total"] as? Int == 2)

            let retried = try await client.call(.post, "/api/queue/msg_first/retry", auth: fixture.admin)
            #expect(retried.status == .ok && retried.json["message"] as? String == "Message queued for immediate retry")
            let removed = try await client.call(.delete, "/api/queue/msg_second", auth: fixture.admin)
            #expect(removed.status == .ok && removed.json["message"] as? String == "Message removed from queue")
            #expect(try await client.call(.delete, "/api/queue/msg_second", auth: fixture.admin).status == .notFound)
            #expect(try await client.call(.post, "/api/queue/msg_second/retry", auth: fixture.admin).status == .notFound)
            #expect(try await client.call(.delete, "/api/queue/..%2Fetc", auth: fixture.admin).status == .notFound)
            #expect(try await client.call(.get, "/api/queue", auth: fixture.admin).json["total"] as? Int == 1)
            #expect((try? await fixture.spool.get(key: "msg_second")) == nil, "the deleted message's blob is gone")
        }
    }

    @Test("/stats has the document's structure, with the queue and the mailboxes counted")
    func statistics() async throws {
        let (fixture, app) = try await Fixture.make()
        defer { fixture.remove() }
        try await fixture.enqueue("msg_stats")
        _ = try await fixture.mailboxes.deliver(
            ByteBuffer(string: "Subject: x\r\n\r\nx\r\n"),
            MailboxDelivery(mailbox: "bob@example.com", messageID: "msg_x", deliveryKey: fixture.mailboxes.makeDeliveryKey(),
                            sender: "s@example.com", receivedAt: Date()))
        try await app.test(.router) { client in
            let stats = try await client.call(.get, "/stats", auth: fixture.admin)
            #expect(stats.status == .ok)
            #expect(Set(stats.json.keys) == ["messages", "connections", "authentication", "spam", "virus", "storage", "performance"])
            #expect(stats.json["messages"] as? [String: Int] == ["received": 0, "sent": 0, "queued": 1, "failed": 0])
            #expect(stats.json["connections"] as? [String: Int] == ["current": 2, "total": 9, "rejected": 0])
            #expect(Set((stats.json["authentication"] as? [String: Int] ?? [:]).keys) == ["attempts", "successful", "failed"])
            #expect(Set((stats.json["spam"] as? [String: Any] ?? [:]).keys) == ["detected", "rate"])
            #expect(Set((stats.json["virus"] as? [String: Any] ?? [:]).keys) == ["detected", "rate"])
            let storage = try #require(stats.json["storage"] as? [String: Any])
            #expect(storage["messages_stored"] as? Int == 1 && storage["total_size_mb"] is Double)
            #expect(Set((stats.json["performance"] as? [String: Any] ?? [:]).keys) == ["avg_processing_ms", "p95_processing_ms", "p99_processing_ms"])
        }
    }

    @Test("/stats' storage figures are measured at most once per lifetime, not for every call")
    func storedMailFiguresAreKept() async throws {
        let (fixture, _) = try await Fixture.make()
        defer { fixture.remove() }
        try await fixture.store("Subject: one\r\n\r\none\r\n", for: "bob@example.com")
        let kept = StoredMailFigures(accounts: fixture.accounts, mailboxes: fixture.mailboxes, lifetime: .seconds(3600))
        let before = try await kept.current()
        #expect(before.messages == 1 && before.bytes > 0)
        try await fixture.store("Subject: two\r\n\r\ntwo\r\n", for: "alice@example.com")
        let again = try await kept.current()
        #expect(again.messages == before.messages && again.bytes == before.bytes, "within its lifetime: the same measurement")
        let fresh = try await fixture.storedMail.current()
        #expect(fresh.messages == 2 && fresh.bytes > before.bytes)
    }

    @Test("an unknown user and a wrong password look the same; failed logins are throttled per address and username (429, Retry-After)")
    func failedLogins() async throws {
        let (fixture, app) = try await Fixture.make(failureRule: RateRule(limit: 3, window: .seconds(3600)))
        defer { fixture.remove() }
        try await app.test(.router) { client in
            let unknown = try await client.call(.get, "/api/users/bob", auth: basic("nobody", "Whatever-1"))
            let wrong = try await client.call(.get, "/api/users/bob", auth: basic("bob", "Wrong-Passw0rd"))
            #expect(unknown.status == .unauthorized && wrong.status == .unauthorized)
            #expect(unknown.json as NSDictionary == wrong.json as NSDictionary)
            _ = try await client.call(.get, "/api/users/bob", auth: basic("bob", "Wrong-Passw0rd2"))
            // Three failures: the fourth attempt is refused before any verification, even the right password.
            let throttled = try await client.call(.get, "/api/users/bob", auth: fixture.bob)
            #expect(throttled.status == .tooManyRequests, "\(throttled.json)")
            let retryAfter = try #require(throttled.headers[.retryAfter].flatMap { Int($0) })
            #expect((1...3600).contains(retryAfter))
        }
    }

    @Test("requests per address: X-RateLimit-* on authenticated responses, 429 with Retry-After over the limit")
    func requestLimit() async throws {
        let (fixture, app) = try await Fixture.make(requestRule: RateRule(limit: 3, window: .seconds(60)))
        defer { fixture.remove() }
        try await app.test(.router) { client in
            let start = Int(Date().timeIntervalSince1970)
            for remaining in [2, 1, 0] {
                let answer = try await client.call(.get, "/api/users/bob", auth: fixture.bob)
                #expect(answer.status == .ok)
                #expect(answer.headers[.xRateLimitLimit] == "3")
                #expect(answer.headers[.xRateLimitRemaining] == "\(remaining)")
                // The window opened by the first request: 60 s after it (each request verifies a
                // password, which takes seconds on a loaded machine).
                let reset = try #require(answer.headers[.xRateLimitReset].flatMap { Int($0) })
                #expect((start + 59...Int(Date().timeIntervalSince1970) + 61).contains(reset), "reset \(reset), start \(start)")
            }
            let refused = try await client.call(.get, "/api/users/bob", auth: fixture.bob)
            #expect(refused.status == .tooManyRequests)
            #expect(refused.headers[.retryAfter].flatMap { Int($0) }.map { (1...60).contains($0) } == true)
            #expect(refused.headers[.xRateLimitRemaining] == "0")
            #expect(try await client.call(.get, "/health", auth: nil).status == .ok, "/health is not limited")
        }
    }

    @Test("verified credentials are remembered, but a changed password takes effect at once")
    func credentialCache() async throws {
        let (fixture, app) = try await Fixture.make()
        defer { fixture.remove() }
        try await app.test(.router) { client in
            #expect(try await client.call(.get, "/api/users/bob", auth: fixture.bob).status == .ok)
            let verified = fixture.hasher.verifications
            for _ in 0..<20 { #expect(try await client.call(.get, "/api/users/bob", auth: fixture.bob).status == .ok) }
            #expect(fixture.hasher.verifications == verified, "remembered credentials cost no Argon2id run")
            let changed = try await client.call(.put, "/api/users/bob", auth: fixture.bob, body: try body(["password": "Changed-Passw0rd"]))
            #expect(changed.status == .ok)
            #expect(try await client.call(.get, "/api/users/bob", auth: fixture.bob).status == .unauthorized)
            #expect(try await client.call(.get, "/api/users/bob", auth: basic("bob", "Changed-Passw0rd")).status == .ok)
        }
    }

    @Test("a user's messages: listed for admin and self, paged; full-text search with database storage, 400 without it")
    func userMessages() async throws {
        for database in [false, true] {
            let (fixture, app) = try await Fixture.make(databaseMailboxes: database)
            defer { fixture.remove() }
            try await fixture.store("From: Ann <ann@example.org>\r\nSubject: Quarterly invoice\r\n\r\nPlease pay the invoice.\r\n", for: "bob@example.com")
            try await fixture.store("From: Ben <ben@example.org>\r\nSubject: Lunch\r\n\r\nSandwiches at noon.\r\n", for: "bob@example.com")
            try await app.test(.router) { client in
                let all = try await client.call(.get, "/api/users/bob/messages", auth: fixture.bob)
                #expect(all.status == .ok, "\(all.json)")
                #expect(all.json["total"] as? Int == 2 && all.json["offset"] as? Int == 0 && all.json["limit"] as? Int == 100)
                let messages = try #require(all.json["messages"] as? [[String: Any]])
                #expect(messages.map { $0["subject"] as? String } == ["Quarterly invoice", "Lunch"], "\(messages)")
                #expect(Set(messages[0].keys) == ["id", "folder", "size_bytes", "date", "flags", "subject", "from"])
                #expect(messages[0]["folder"] as? String == "INBOX" && messages[0]["flags"] as? [String] == [])
                let paged = try await client.call(.get, "/api/users/bob/messages?offset=1&limit=1", auth: fixture.admin)
                #expect((paged.json["messages"] as? [[String: Any]])?.map { $0["subject"] as? String } == ["Lunch"])
                #expect(try await client.call(.get, "/api/users/bob/messages", auth: fixture.alice).status == .forbidden)
                let search = try await client.call(.get, "/api/users/bob/messages?q=invoice", auth: fixture.bob)
                if database {
                    #expect(search.status == .ok && search.json["total"] as? Int == 1, "\(search.json)")
                    #expect((search.json["messages"] as? [[String: Any]])?.first?["subject"] as? String == "Quarterly invoice")
                } else {
                    #expect(search.status == .badRequest, "\(search.json)")
                }
            }
        }
    }

    @Test("GET /openapi.json serves docs/openapi.json as committed, without authentication, and every route it names exists")
    func openAPIDocument() async throws {
        let committed = try String(
            contentsOf: URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../docs/openapi.json"),
            encoding: .utf8)
        let (fixture, app) = try await Fixture.make()
        defer { fixture.remove() }
        try await app.test(.router) { client in
            try await client.execute(uri: "/openapi.json", method: .get) { response in
                #expect(response.status == .ok)
                #expect(String(buffer: response.body) == committed, "docs/openapi.json changed: run scripts/embed-openapi.sh")
            }
            let document = try #require(try JSONSerialization.jsonObject(with: Data(committed.utf8)) as? [String: Any])
            #expect(document["openapi"] as? String == "3.1.0")
            let paths = try #require(document["paths"] as? [String: [String: Any]])
            for (path, operations) in paths {
                for method in operations.keys where method != "parameters" {
                    let uri = path.replacingOccurrences(of: "{username}", with: "bob").replacingOccurrences(of: "{message_id}", with: "msg_none")
                    let status = try await client.execute(uri: uri, method: HTTPRequest.Method(rawValue: method.uppercased())!) { $0.status }
                    #expect(status != .notFound || path.contains("{message_id}"), "\(method) \(path) is not served")
                }
            }
        }
    }

    @Test("a failed API login writes an auth.failed webhook event (the name tried and the address), a good one none")
    func failedLoginEvent() async throws {
        let directory = NSTemporaryDirectory() + "mailtier-api-" + UUID().uuidString
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let database = try SQLiteDatabase(path: directory + "/smtp.db", threadPool: NIOThreadPool.singleton)
        let accounts = AccountService(users: SQLiteUserStore(database: database), hasher: Argon2idHasher(threadPool: NIOThreadPool.singleton))
        _ = try await accounts.create(username: "bob", email: "bob@example.com", password: bobPassword)
        let outbox = SQLiteEventOutbox(database: database)
        let authenticator = APIAuthenticator(
            accounts: accounts, limiter: InProcessRateLimiter(), settings: .init(failureRule: nil), failedLogins: outbox)
        _ = try await authenticator.authenticate(basic("bob", bobPassword), client: "192.0.2.7")
        await #expect(throws: APIError.self) { try await authenticator.authenticate(basic("bob", "Wrong-Passw0rd"), client: "192.0.2.7") }
        // (The user store records user.created for bob.)
        let events = try await outbox.claim(now: Date().addingTimeInterval(5), limit: 10, lease: .seconds(60)).filter { $0.type != "user.created" }
        #expect(events.map(\.type) == ["auth.failed"])
        let payload = try #require(try JSONSerialization.jsonObject(with: Data((events.first?.payload ?? "").utf8)) as? [String: Any])
        #expect(payload["event"] as? String == "auth.failed")
        #expect(payload["data"] as? [String: String] == ["username": "bob", "client_ip": "192.0.2.7"], "\(payload)")
    }
}
