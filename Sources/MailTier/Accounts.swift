#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Synchronization

/// Why an account operation was refused. `description` is one line for a human; it never
/// contains a password.
public enum AccountError: Error, Equatable, Sendable, CustomStringConvertible {
    case invalidUsername(String)
    case invalidEmail(String)
    /// The reason, e.g. "must be 8 to 1024 characters".
    case weakPassword(String)
    case invalidQuota(Int)
    case duplicateUsername
    case duplicateEmail
    case unknownUser(String)

    public var description: String {
        switch self {
        case .invalidUsername(let username):
            return "invalid username: \(Self.sanitized(username)) (use 1 to 64 of a-z 0-9 . _ -, starting with a letter or digit)"
        case .invalidEmail(let email):
            return "invalid email address: \(Self.sanitized(email))"
        case .weakPassword(let reason):
            return "weak password: \(reason)"
        case .invalidQuota(let quota):
            return "invalid quota: \(quota) MB (must be 0 to \(AccountService.maxQuotaMB))"
        case .duplicateUsername:
            return "username already exists"
        case .duplicateEmail:
            return "email address already in use"
        case .unknownUser(let username):
            return "unknown user: \(Self.sanitized(username))"
        }
    }

    /// User input as it may appear in a message: control characters escaped, long input cut.
    public static func sanitized(_ text: String) -> String {
        var out = ""
        for scalar in text.unicodeScalars.prefix(300) {
            if scalar.value < 0x20 || scalar.value == 0x7F || (0x80..<0xA0).contains(scalar.value) {
                out += scalar.escaped(asASCII: true)
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
        return text.unicodeScalars.count > 300 ? out + "…" : out
    }
}

/// Accounts: validation, hashing and the `users` table, for the CLI, SMTP AUTH and the API.
public struct AccountService: Sendable {
    public static let maxQuotaMB = 1_048_576
    public static let defaultQuotaMB = 1000
    public static let minPasswordLength = 8
    public static let maxPasswordLength = 1024

    public let users: any UserStore
    public let hasher: any PasswordHasher
    private let dummyHash: DummyHash

    public init(users: any UserStore, hasher: any PasswordHasher) {
        self.users = users
        self.hasher = hasher
        self.dummyHash = DummyHash()
    }

    // MARK: - Validation

    /// `^[a-z0-9][a-z0-9._-]{0,63}$`.
    public static func validateUsername(_ username: String) throws(AccountError) {
        let bytes = Array(username.utf8)
        guard (1...64).contains(bytes.count) else { throw .invalidUsername(username) }
        for (index, byte) in bytes.enumerated() {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "0")...UInt8(ascii: "9"):
                continue
            case UInt8(ascii: "."), UInt8(ascii: "_"), UInt8(ascii: "-"):
                guard index > 0 else { throw .invalidUsername(username) }
            default:
                throw .invalidUsername(username)
            }
        }
    }

    /// One `@`; a local part of 1 to 64 octets (a dot-atom: no leading, trailing or double
    /// dot; UTF-8 allowed; no space, control character, `<`, `>`, `"`, `\`, `/`, `(`, `)`,
    /// `,`, `;`, `:`, `[`, `]`); a domain that is `localhost` or has a dot, whose labels are
    /// 1 to 63 of `[A-Za-z0-9-]` not starting or ending with `-`; at most 254 octets in all.
    public static func validateEmail(_ email: String) throws(AccountError) {
        let bytes = Array(email.utf8)
        guard bytes.count <= 254, bytes.count(where: { $0 == UInt8(ascii: "@") }) == 1,
            let at = bytes.firstIndex(of: UInt8(ascii: "@"))
        else { throw .invalidEmail(email) }
        let local = bytes[..<at]
        let domain = bytes[(at + 1)...]

        guard (1...64).contains(local.count), local.first != UInt8(ascii: "."), local.last != UInt8(ascii: ".")
        else { throw .invalidEmail(email) }
        var previous: UInt8 = 0
        for byte in local {
            if byte < 0x20 || byte == 0x7F { throw .invalidEmail(email) }
            switch byte {
            case UInt8(ascii: " "), UInt8(ascii: "<"), UInt8(ascii: ">"), UInt8(ascii: "\""), UInt8(ascii: "\\"),
                UInt8(ascii: "/"), UInt8(ascii: "("), UInt8(ascii: ")"), UInt8(ascii: ","), UInt8(ascii: ";"),
                UInt8(ascii: ":"), UInt8(ascii: "["), UInt8(ascii: "]"):
                throw .invalidEmail(email)
            case UInt8(ascii: ".") where previous == UInt8(ascii: "."):
                throw .invalidEmail(email)
            default:
                break
            }
            previous = byte
        }
        // UTF-8 in the local part must be well formed and free of C1 controls.
        guard let localText = String(validating: local, as: UTF8.self),
            !localText.unicodeScalars.contains(where: { (0x80..<0xA0).contains($0.value) || $0.properties.generalCategory == .lineSeparator || $0.properties.generalCategory == .paragraphSeparator })
        else { throw .invalidEmail(email) }

        let labels = domain.split(separator: UInt8(ascii: "."), omittingEmptySubsequences: false)
        let isLocalhost = String(decoding: domain, as: UTF8.self).lowercased() == "localhost"
        guard isLocalhost || labels.count >= 2 else { throw .invalidEmail(email) }
        for label in labels {
            guard (1...63).contains(label.count), label.first != UInt8(ascii: "-"), label.last != UInt8(ascii: "-")
            else { throw .invalidEmail(email) }
            for byte in label {
                switch byte {
                case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                    UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"):
                    continue
                default:
                    throw .invalidEmail(email)
                }
            }
        }
    }

    /// 8 to 1024 characters, no NUL (SMTP AUTH PLAIN could not carry it), and at least 3 of
    /// the 4 classes: lower case, upper case, digit, other.
    public static func validatePassword(_ password: String) throws(AccountError) {
        // Bound the work before counting grapheme clusters.
        guard password.utf8.count <= maxPasswordLength * 16 else {
            throw .weakPassword("must be \(minPasswordLength) to \(maxPasswordLength) characters")
        }
        guard (minPasswordLength...maxPasswordLength).contains(password.count) else {
            throw .weakPassword("must be \(minPasswordLength) to \(maxPasswordLength) characters")
        }
        guard !password.unicodeScalars.contains("\0") else {
            throw .weakPassword("must not contain a NUL character")
        }
        var lower = false
        var upper = false
        var digit = false
        var other = false
        for character in password {
            if character.isLowercase {
                lower = true
            } else if character.isUppercase {
                upper = true
            } else if character.isNumber {
                digit = true
            } else {
                other = true
            }
        }
        guard [lower, upper, digit, other].filter({ $0 }).count >= 3 else {
            throw .weakPassword("must contain at least 3 of: lower case, upper case, digit, other character")
        }
    }

    /// 0 to 1_048_576 MB.
    public static func validateQuota(_ quotaMB: Int) throws(AccountError) {
        guard (0...maxQuotaMB).contains(quotaMB) else { throw .invalidQuota(quotaMB) }
    }

    // MARK: - Operations

    /// Validates, hashes the password and stores the account.
    public func create(
        username: String, email: String, password: String, quotaMB: Int = AccountService.defaultQuotaMB,
        isAdmin: Bool = false
    ) async throws -> User {
        try Self.validateUsername(username)
        try Self.validateEmail(email)
        try Self.validatePassword(password)
        try Self.validateQuota(quotaMB)
        let hash = try await hasher.hash(password)
        return try await mapped(username) {
            try await users.create(
                username: username, email: email, passwordHash: hash, quotaMB: quotaMB, isAdmin: isAdmin)
        }
    }

    public func setPassword(username: String, password: String) async throws {
        try Self.validatePassword(password)
        var user = try await info(username: username)
        user.passwordHash = try await hasher.hash(password)
        try await save(user)
    }

    public func setQuota(username: String, quotaMB: Int) async throws {
        try Self.validateQuota(quotaMB)
        var user = try await info(username: username)
        user.quotaMB = quotaMB
        try await save(user)
    }

    public func setEmail(username: String, email: String) async throws {
        try Self.validateEmail(email)
        var user = try await info(username: username)
        user.email = email
        try await save(user)
    }

    /// A disabled account cannot authenticate.
    public func setEnabled(username: String, enabled: Bool) async throws {
        var user = try await info(username: username)
        user.enabled = enabled
        try await save(user)
    }

    /// Several changes to one account at once (the admin API's `PUT`): every value is validated
    /// before anything is written, then the account is saved once. Nil leaves a field as it is.
    public struct Changes: Sendable, Equatable {
        public var email: String?
        public var password: String?
        public var quotaMB: Int?
        public var enabled: Bool?
        public var isAdmin: Bool?

        public init(email: String? = nil, password: String? = nil, quotaMB: Int? = nil, enabled: Bool? = nil, isAdmin: Bool? = nil) {
            self.email = email
            self.password = password
            self.quotaMB = quotaMB
            self.enabled = enabled
            self.isAdmin = isAdmin
        }
    }

    /// Applies `changes` to `username` and returns the account as saved. Throws `AccountError`.
    public func update(username: String, _ changes: Changes) async throws -> User {
        if let email = changes.email { try Self.validateEmail(email) }
        if let password = changes.password { try Self.validatePassword(password) }
        if let quotaMB = changes.quotaMB { try Self.validateQuota(quotaMB) }
        var user = try await info(username: username)
        if let email = changes.email { user.email = email }
        if let password = changes.password { user.passwordHash = try await hasher.hash(password) }
        if let quotaMB = changes.quotaMB { user.quotaMB = quotaMB }
        if let enabled = changes.enabled { user.enabled = enabled }
        if let isAdmin = changes.isAdmin { user.isAdmin = isAdmin }
        try await save(user)
        return user
    }

    public func delete(username: String) async throws {
        guard try await users.delete(username: username) else { throw AccountError.unknownUser(username) }
    }

    /// Throws `AccountError.unknownUser`.
    public func info(username: String) async throws -> User {
        guard let user = try await users.user(named: username) else { throw AccountError.unknownUser(username) }
        return user
    }

    /// Ordered by id; `limit` is clamped to 0…1000 and `offset` to ≥ 0. `total` counts every user.
    public func list(offset: Int = 0, limit: Int = 100) async throws -> (users: [User], total: Int) {
        try await users.list(offset: max(0, offset), limit: min(max(0, limit), 1000))
    }

    /// The user when `password` is right for `login` (a username, or an email address when it
    /// contains `@`) and the account is enabled; nil otherwise. An unknown or disabled account
    /// still costs one full verification (against a dummy hash made once with the same
    /// hasher), so the time taken does not tell whether the account exists. A success records
    /// `last_login` unless `recordLogin` is false.
    public func authenticate(login: String, password: String, recordLogin: Bool = true) async throws -> User? {
        let found: User?
        if login.contains("@") {
            found = try await users.user(email: login)
        } else {
            found = try await users.user(named: login)
        }
        guard var user = found, user.enabled else {
            _ = try await hasher.verify(password, against: try await dummyHash.value(using: hasher))
            return nil
        }
        guard try await hasher.verify(password, against: user.passwordHash) else { return nil }
        if recordLogin {
            let now = Date(timeIntervalSince1970: Date().timeIntervalSince1970.rounded(.down))
            do {
                try await users.recordLogin(username: user.username, at: now)
            } catch UserStoreError.notFound {
                return nil  // deleted meanwhile
            }
            user.lastLogin = now
        }
        return user
    }

    /// When there is no user at all, creates the administrator `username` (is_admin) and returns
    /// the generated password when `password` was nil (so the server can print it once); returns
    /// nil otherwise (a password was given, or users exist already).
    public func ensureAdmin(username: String, email: String, password: String?) async throws -> String? {
        guard try await users.count() == 0 else { return nil }
        let chosen = password ?? Self.generatePassword()
        do {
            _ = try await create(username: username, email: email, password: chosen, isAdmin: true)
        } catch AccountError.duplicateUsername {
            return nil  // another process created it first
        } catch AccountError.duplicateEmail {
            return nil
        }
        return password == nil ? chosen : nil
    }

    /// A random password of `length` characters (at least 4) with all four classes, from
    /// `SystemRandomNumberGenerator`.
    public static func generatePassword(length: Int = 20) -> String {
        let lower = Array("abcdefghijkmnopqrstuvwxyz")
        let upper = Array("ABCDEFGHJKLMNPQRSTUVWXYZ")
        let digits = Array("23456789")
        // Symbols that need no quoting in a shell or a URL: the password is printed to be pasted.
        let symbols = Array("-_.+@")
        let all = lower + upper + digits + symbols
        var generator = SystemRandomNumberGenerator()
        var characters = [lower, upper, digits, symbols].map { $0.randomElement(using: &generator)! }
        while characters.count < max(4, length) {
            characters.append(all.randomElement(using: &generator)!)
        }
        characters.shuffle(using: &generator)
        return String(characters)
    }

    // MARK: - Internals

    private func save(_ user: User) async throws {
        try await mapped(user.username) { try await users.update(user) }
    }

    private func mapped<T>(_ username: String, _ body: () async throws -> T) async throws -> T {
        do {
            return try await body()
        } catch let error as UserStoreError {
            switch error {
            case .duplicateUsername: throw AccountError.duplicateUsername
            case .duplicateEmail: throw AccountError.duplicateEmail
            case .notFound: throw AccountError.unknownUser(username)
            }
        }
    }
}

/// The dummy hash that unknown and disabled accounts are verified against, made once, lazily,
/// by the service's own hasher (so with the same parameters as real hashes).
final class DummyHash: Sendable {
    private let task = Mutex<Task<String, any Error>?>(nil)

    func value(using hasher: any PasswordHasher) async throws -> String {
        let task = self.task.withLock { stored in
            if let stored { return stored }
            let made = Task { try await hasher.hash(AccountService.generatePassword(length: 32)) }
            stored = made
            return made
        }
        do {
            return try await task.value
        } catch {
            self.task.withLock { stored in
                if stored == task { stored = nil }  // let the next call try again
            }
            throw error
        }
    }
}
