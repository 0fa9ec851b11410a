import Foundation
import Hummingbird
import MailTier

/// What the authenticated routes work on: accounts, mailboxes (for `used_mb`), the queue and its
/// spool, and how requests are limited. `smtp-server` builds it from the adapters.
public struct AdminServices: Sendable {
    public var accounts: AccountService
    public var mailboxes: any MailboxStore
    public var queue: any MessageQueue
    public var spool: any BlobStore
    public var authenticator: APIAuthenticator
    /// Requests per window per client address; nil: unlimited.
    public var requestRule: RateRule?
    /// Rung after a forced retry, so that a delivery worker in this process starts at once.
    public var newMail: Doorbell?
    /// `GET /stats`.
    public var statistics: @Sendable () async throws -> ServerStatistics

    public init(
        accounts: AccountService, mailboxes: any MailboxStore, queue: any MessageQueue, spool: any BlobStore,
        authenticator: APIAuthenticator, requestRule: RateRule?, newMail: Doorbell? = nil,
        statistics: @escaping @Sendable () async throws -> ServerStatistics
    ) {
        self.accounts = accounts
        self.mailboxes = mailboxes
        self.queue = queue
        self.spool = spool
        self.authenticator = authenticator
        self.requestRule = requestRule
        self.newMail = newMail
        self.statistics = statistics
    }
}

// MARK: - JSON shapes (API.md "User Management")

struct UserJSON: Encodable {
    var id: Int64
    var username: String
    var email: String
    var createdAt: String
    var lastLogin: String?
    var quotaMB: Int
    var usedMB: Double
    var enabled: Bool
    var statistics: Statistics?

    struct Statistics: Encodable {
        var messagesReceived: Int
        var messagesSent: Int
        var storageUsedMB: Double

        enum CodingKeys: String, CodingKey {
            case messagesReceived = "messages_received"
            case messagesSent = "messages_sent"
            case storageUsedMB = "storage_used_mb"
        }
    }

    enum CodingKeys: String, CodingKey {
        case id, username, email, enabled, statistics
        case createdAt = "created_at"
        case lastLogin = "last_login"
        case quotaMB = "quota_mb"
        case usedMB = "used_mb"
    }

    init(_ user: User, usedBytes: Int64, statistics: Statistics? = nil) {
        id = user.id
        username = user.username
        email = user.email
        createdAt = MailDate.iso8601(user.createdAt)
        lastLogin = user.lastLogin.map(MailDate.iso8601)
        quotaMB = user.quotaMB
        usedMB = JSON.megabytes(usedBytes)
        enabled = user.enabled
        self.statistics = statistics
    }


    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(id, forKey: .id)
        try container.encode(username, forKey: .username)
        try container.encode(email, forKey: .email)
        try container.encode(createdAt, forKey: .createdAt)
        try container.encode(lastLogin, forKey: .lastLogin)  // null when never
        try container.encode(quotaMB, forKey: .quotaMB)
        try container.encode(usedMB, forKey: .usedMB)
        try container.encode(enabled, forKey: .enabled)
        try container.encodeIfPresent(statistics, forKey: .statistics)
    }
}

struct UserListJSON: Encodable {
    var users: [UserJSON]
    var total: Int
    var offset: Int
    var limit: Int
}

/// `POST` answers with the account as created (no `used_mb`, no `last_login`), `PUT` with the
/// fields it can change (no `created_at` either).
struct AccountJSON: Encodable {
    var id: Int64
    var username: String
    var email: String
    /// Encoded only when set (`POST`).
    var createdAt: String?
    var quotaMB: Int
    var enabled: Bool

    enum CodingKeys: String, CodingKey {
        case id, username, email, enabled
        case createdAt = "created_at"
        case quotaMB = "quota_mb"
    }

    init(_ user: User, withCreation: Bool) {
        id = user.id
        username = user.username
        email = user.email
        createdAt = withCreation ? MailDate.iso8601(user.createdAt) : nil
        quotaMB = user.quotaMB
        enabled = user.enabled
    }
}

/// One stored message in `GET /api/users/{username}/messages`.
struct MessageJSON: Encodable {
    var id: String
    var folder: String
    var sizeBytes: Int
    var date: String
    var flags: [String]
    var subject: String?
    var from: String?

    enum CodingKeys: String, CodingKey {
        case id, folder, date, flags, subject, from
        case sizeBytes = "size_bytes"
    }

    init(_ message: StoredMessage) {
        id = message.id
        folder = message.folder
        sizeBytes = message.size
        date = MailDate.iso8601(message.date)
        flags = message.flags.sorted().map(\.imapName)
        subject = message.subject
        from = message.from
    }

    func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(id, forKey: .id)
        try container.encode(folder, forKey: .folder)
        try container.encode(sizeBytes, forKey: .sizeBytes)
        try container.encode(date, forKey: .date)
        try container.encode(flags, forKey: .flags)
        try container.encode(subject, forKey: .subject)  // null when there is none
        try container.encode(from, forKey: .from)
    }
}

struct MessageListJSON: Encodable {
    var messages: [MessageJSON]
    var total: Int
    var offset: Int
    var limit: Int
}

// MARK: - Routes

extension AdminAPI {
    static func addRoutes(to router: Router<AdminRequestContext>, services: AdminServices) {
        let api = router.group()
            .add(middleware: AuthenticationMiddleware(authenticator: services.authenticator, requestRule: services.requestRule))
        let users = UserRoutes(services: services)
        api.get("api/users") { request, context in try await users.list(request, context) }
        api.post("api/users") { request, context in try await users.create(request, context) }
        api.get("api/users/:username") { request, context in try await users.get(request, context) }
        api.put("api/users/:username") { request, context in try await users.update(request, context) }
        api.delete("api/users/:username") { request, context in try await users.delete(request, context) }
        api.get("api/users/:username/messages") { request, context in try await users.messages(request, context) }
        let queue = QueueRoutes(services: services)
        api.get("api/queue") { request, context in try await queue.list(request, context) }
        api.post("api/queue/:id/retry") { request, context in try await queue.retry(request, context) }
        api.delete("api/queue/:id") { request, context in try await queue.delete(request, context) }
        api.get("stats") { _, context in
            try requireAdmin(context)
            return ResponseJSON.response(try await services.statistics())
        }
    }

    static func requireAdmin(_ context: AdminRequestContext) throws {
        guard context.user?.isAdmin == true else { throw APIError.forbidden }
    }
}

struct UserRoutes: Sendable {
    let services: AdminServices
    var accounts: AccountService { services.accounts }

    func list(_ request: Request, _ context: AdminRequestContext) async throws -> Response {
        try AdminAPI.requireAdmin(context)
        let paging = try Paging(request)
        let (users, total) = try await accounts.list(offset: paging.offset, limit: paging.limit)
        var entries: [UserJSON] = []
        for user in users { entries.append(UserJSON(user, usedBytes: try await usage(user))) }
        return ResponseJSON.response(UserListJSON(users: entries, total: total, offset: paging.offset, limit: paging.limit))
    }

    func get(_ request: Request, _ context: AdminRequestContext) async throws -> Response {
        let user = try await target(context)
        let used = try await usage(user)
        let stored = (try? await services.mailboxes.list(mailbox: user.email, folder: "INBOX", offset: 0, limit: 0).total) ?? 0
        let statistics = UserJSON.Statistics(
            messagesReceived: stored, messagesSent: 0, storageUsedMB: JSON.megabytes(used))
        return ResponseJSON.response(UserJSON(user, usedBytes: used, statistics: statistics))
    }

    func create(_ request: Request, _ context: AdminRequestContext) async throws -> Response {
        try AdminAPI.requireAdmin(context)
        let body = try await JSONBody.read(request, allowing: ["username", "email", "password", "quota_mb", "is_admin"])
        let username = try body.required("username", body.string)
        let email = try body.required("email", body.string)
        let password = try body.required("password", body.string)
        let quota = try body.integer("quota_mb") ?? AccountService.defaultQuotaMB
        let isAdmin = try body.bool("is_admin") ?? false
        let user = try await accountCall {
            try await accounts.create(username: username, email: email, password: password, quotaMB: quota, isAdmin: isAdmin)
        }
        return ResponseJSON.response(.created, AccountJSON(user, withCreation: true))
    }

    /// Admin or self; only an admin changes `quota_mb`, `enabled` or `is_admin`, and an admin
    /// cannot disable or demote the account they are using.
    func update(_ request: Request, _ context: AdminRequestContext) async throws -> Response {
        let user = try await target(context)
        let body = try await JSONBody.read(request, allowing: ["email", "password", "quota_mb", "enabled", "is_admin"])
        guard !body.isEmpty else {
            throw APIError.badRequest("nothing to change: give email, password, quota_mb, enabled or is_admin")
        }
        let changes = AccountService.Changes(
            email: try body.string("email"), password: try body.string("password"), quotaMB: try body.integer("quota_mb"),
            enabled: try body.bool("enabled"), isAdmin: try body.bool("is_admin"))
        let caller = try requireUser(context)
        if !caller.isAdmin, changes.quotaMB != nil || changes.enabled != nil || changes.isAdmin != nil {
            throw APIError(.forbidden, "forbidden", "only an administrator can change quota_mb, enabled or is_admin")
        }
        if caller.id == user.id, changes.enabled == false || (caller.isAdmin && changes.isAdmin == false) {
            throw APIError(.conflict, "conflict", "you cannot disable or demote the account you are authenticated as")
        }
        if let email = changes.email, email.lowercased() != user.email.lowercased(),
            try await usage(user) > 0
        {
            // Mailboxes are named by address, and no backend can move one yet.
            throw APIError(
                .conflict, "conflict",
                "the mailbox of \(user.email) holds mail; changing the address would leave it behind")
        }
        let saved = try await accountCall { try await accounts.update(username: user.username, changes) }
        return ResponseJSON.response(AccountJSON(saved, withCreation: false))
    }

    /// Beyond API.md: a user's stored mail, newest paging as the store lists it (oldest first),
    /// in `folder` (INBOX by default); with `q`, a full-text search over subject and body where
    /// the store has one (database storage), newest relevance first, `offset` applied after.
    func messages(_ request: Request, _ context: AdminRequestContext) async throws -> Response {
        let user = try await target(context)
        let paging = try Paging(request)
        let folder = request.uri.queryParameters["folder"].map(String.init) ?? "INBOX"
        let query = request.uri.queryParameters["q"].map(String.init)
        let page: (messages: [StoredMessage], total: Int)
        do {
            if let query, !query.isEmpty {
                guard let searchable = services.mailboxes as? any SearchableMailboxStore else {
                    throw APIError.badRequest("full-text search needs SMTP_STORAGE_TYPE=database")
                }
                guard query.utf8.count <= 1000 else { throw APIError.badRequest("q is over 1000 bytes") }
                let found = try await searchable.search(mailbox: user.email, query: query, limit: paging.offset + paging.limit)
                page = (Array(found.dropFirst(paging.offset)), found.count)
            } else {
                page = try await services.mailboxes.list(mailbox: user.email, folder: folder, offset: paging.offset, limit: paging.limit)
            }
        } catch let error as MailboxError where error.kind == .invalidMailbox || error.kind == .unsupportedFolder {
            throw APIError.badRequest(error.description)
        }
        return ResponseJSON.response(
            MessageListJSON(
                messages: page.messages.map(MessageJSON.init), total: page.total, offset: paging.offset, limit: paging.limit))
    }

    /// The account and its mail (API.md: "Delete a user and all their data").
    func delete(_ request: Request, _ context: AdminRequestContext) async throws -> Response {
        try AdminAPI.requireAdmin(context)
        let user = try await target(context)
        if user.id == context.user?.id {
            throw APIError(.conflict, "conflict", "you cannot delete the account you are authenticated as")
        }
        try await accountCall { try await accounts.delete(username: user.username) }
        do {
            try await services.mailboxes.deleteMailbox(user.email)
        } catch {
            context.logger.error("mailbox not removed after its user", metadata: ["user": "\(user.username)", "error": "\(error)"])
            throw APIError(
                .internalServerError, "internal_error", "user deleted, but the mailbox \(user.email) could not be removed")
        }
        return ResponseJSON.response(ResponseJSON.Success(message: "User deleted successfully"))
    }

    /// The user the path names, when the caller may see it (admin or self). Any other name gives a
    /// non-admin 403, whether it exists or not, so usernames cannot be probed.
    private func target(_ context: AdminRequestContext) async throws -> User {
        let caller = try requireUser(context)
        let name = context.parameters.get("username") ?? ""
        if !caller.isAdmin && name.lowercased() != caller.username.lowercased() {
            throw APIError(.forbidden, "forbidden", "you can only see and change your own account")
        }
        guard let user = try await accounts.users.user(named: name) else {
            throw APIError.notFound("no such user: \(AccountError.sanitized(name))")
        }
        return user
    }

    private func requireUser(_ context: AdminRequestContext) throws -> User {
        guard let user = context.user else { throw APIError.unauthorized("authentication required") }
        return user
    }

    private func usage(_ user: User) async throws -> Int64 {
        try await services.mailboxes.usageBytes(of: user.email)
    }

    /// `AccountError` as 400, 404 or 409.
    private func accountCall<T>(_ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let error as AccountError {
            switch error {
            case .duplicateUsername, .duplicateEmail: throw APIError(.conflict, "conflict", error.description)
            case .unknownUser: throw APIError.notFound(error.description)
            case .invalidUsername, .invalidEmail, .weakPassword, .invalidQuota: throw APIError.badRequest(error.description)
            }
        }
    }
}

struct QueueRoutes: Sendable {
    let services: AdminServices

    func list(_ request: Request, _ context: AdminRequestContext) async throws -> Response {
        try AdminAPI.requireAdmin(context)
        let paging = try Paging(request)
        var status: QueueMessageStatus?
        if let text = request.uri.queryParameters["status"] {
            guard let value = QueueMessageStatus(rawValue: String(text)) else {
                throw APIError.badRequest("status must be pending, retry or failed, not \(AccountError.sanitized(String(text)))")
            }
            status = value
        }
        let page = try await services.queue.list(status: status, offset: paging.offset, limit: paging.limit)
        return AdminAPI.jsonResponse(.ok, page.json)
    }

    func retry(_ request: Request, _ context: AdminRequestContext) async throws -> Response {
        try AdminAPI.requireAdmin(context)
        let id = try messageID(context)
        guard try await services.queue.retryNow(messageID: id, now: Date()) else {
            throw APIError.notFound("no message \(id) waiting in the queue")
        }
        services.newMail?.ring()
        return ResponseJSON.response(ResponseJSON.Success(message: "Message queued for immediate retry"))
    }

    func delete(_ request: Request, _ context: AdminRequestContext) async throws -> Response {
        try AdminAPI.requireAdmin(context)
        let id = try messageID(context)
        guard try await services.queue.delete(messageID: id, spool: services.spool) else {
            throw APIError.notFound("no message \(id) in the queue")
        }
        return ResponseJSON.response(ResponseJSON.Success(message: "Message removed from queue"))
    }

    /// Queue ids are `msg_` and letters, digits, `_` (at most 200 characters).
    private func messageID(_ context: AdminRequestContext) throws -> String {
        let id = context.parameters.get("id") ?? ""
        guard !id.isEmpty, id.utf8.count <= 200,
            id.utf8.allSatisfy({ ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) || $0 == 0x5F || $0 == 0x2D })
        else { throw APIError.notFound("no message \(AccountError.sanitized(id)) in the queue") }
        return id
    }
}

extension MessageFlag {
    /// The IMAP system flag (`\Seen`), as the API lists flags.
    var imapName: String {
        switch self {
        case .draft: "\\Draft"
        case .flagged: "\\Flagged"
        case .replied: "\\Answered"
        case .seen: "\\Seen"
        case .trashed: "\\Deleted"
        }
    }
}
