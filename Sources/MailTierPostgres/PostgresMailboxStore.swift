#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import MailTier
import NIOCore
import PostgresNIO

/// The **database** mailbox store in PostgreSQL (the `messages` table of
/// `PostgresDatabase.migrations`), and the same table used as a `MailboxIndex` by the timeseries
/// and S3 stores. It behaves as `SQLiteMailboxStore` does; the table differs from API.md's in
/// the same ways:
/// - `UNIQUE ("user", folder, message_id)` instead of `message_id UNIQUE` (DESIGN.md);
///   `message_id` is the queue id (`msg_…`) and `StoredMessage.id`.
/// - `"user"` (the mailbox, the account's email address) is quoted: `user` is reserved here.
/// - `id` is BIGSERIAL, `date` TIMESTAMPTZ (when received), `size` BIGINT (SQLite's INTEGER is
///   64-bit), `flags` maildir letters, NOT NULL with `size`.
/// - `body` BYTEA is the message as delivered, or NULL for an index row, whose `location`
///   (added) says where the content is.
/// - `idx_messages_folder` is `("user", folder, date)`; `idx_messages_location` is partial.
/// - Full text: a `search` TSVECTOR column with a GIN index, written by the INSERT (a generated
///   column cannot decode BYTEA lossily): `to_tsvector('simple', subject)` weighted A, then the
///   body text weighted D. The body text is what SQLite indexes: the bytes after the header
///   section, decoded as UTF-8 lossily (NUL bytes become spaces), at most the first 256 KiB —
///   which also keeps the vector below PostgreSQL's 1 MB tsvector limit. Index rows index their
///   subject only.
///
/// Search uses the `simple` configuration (no stemming, no stop words: mail is in every
/// language, and a word is found as typed, like SQLite's `unicode61`; unlike SQLite, accents
/// are kept). The query is cut into the same words as SQLite's store, joined with spaces and
/// given to `plainto_tsquery('simple', …)`: every word must occur, and no tsquery syntax from
/// the user is interpreted. Ranked by `ts_rank`, newest first among equals.
public struct PostgresMailboxStore: SearchableMailboxStore, MailboxIndex {
    public let database: PostgresDatabase

    public init(database: PostgresDatabase) {
        self.database = database
    }

    /// Any unique string: this store identifies deliveries by (mailbox, folder, message id).
    public func makeDeliveryKey() -> String { MessageID.make() }

    // MARK: - MailboxStore

    public func deliver(_ content: ByteBuffer, _ delivery: MailboxDelivery) async throws -> Bool {
        try Self.validate(mailbox: delivery.mailbox, folder: delivery.folder, messageID: delivery.messageID)
        let headers = MessageHeaders(content)
        return try await insert(
            mailbox: delivery.mailbox, folder: delivery.folder, messageID: delivery.messageID, from: headers["From"],
            to: headers["To"], subject: headers.subject, date: delivery.receivedAt, size: Int64(content.readableBytes),
            flags: "", body: content, headers: headers.text, location: nil, bodyText: PostgresSearchText.body(of: content))
    }

    public func list(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (messages: [StoredMessage], total: Int) {
        let (entries, total) = try await entries(mailbox: mailbox, folder: folder, offset: offset, limit: limit)
        return (entries.map(\.storedMessage), total)
    }

    /// The body as delivered; nil when there is no such message. Throws `MailboxError.unavailable`
    /// for an index row (its content is elsewhere, at its location).
    public func fetch(mailbox: String, folder: String, id: String) async throws -> ByteBuffer? {
        guard Self.storable(mailbox, folder, id) else { return nil }
        let rows = try await database.query(
            #"SELECT body FROM messages WHERE "user" = \#(mailbox) AND folder = \#(folder) AND message_id = \#(id)"#)
        guard let row = rows.first else { return nil }
        guard let body = try row.decode(ByteBuffer?.self) else {
            throw MailboxError(.unavailable, "message \(id) is an index row; its content is not in the database")
        }
        return body
    }

    public func delete(mailbox: String, folder: String, id: String) async throws -> Bool {
        try await remove(mailbox: mailbox, folder: folder, messageID: id) != nil
    }

    public func setFlags(_ flags: Set<MessageFlag>, mailbox: String, folder: String, id: String) async throws -> Bool {
        try await setFlags(flags, mailbox: mailbox, folder: folder, messageID: id)
    }

    public func usageBytes(of mailbox: String) async throws -> Int64 {
        guard Self.storable(mailbox) else { return 0 }
        let rows = try await database.query(
            #"SELECT COALESCE(SUM(size), 0)::BIGINT FROM messages WHERE "user" = \#(mailbox)"#)
        return try rows.first?.decode(Int64.self) ?? 0
    }

    public func deleteMailbox(_ mailbox: String) async throws {
        guard Self.storable(mailbox) else { return }
        try await database.query(#"DELETE FROM messages WHERE "user" = \#(mailbox)"#)
    }

    // MARK: - SearchableMailboxStore

    public func search(mailbox: String, query: String, limit: Int) async throws -> [StoredMessage] {
        let words = PostgresSearchText.words(query).prefix(32)
        guard !words.isEmpty, limit > 0, Self.storable(mailbox) else { return [] }
        let text = words.joined(separator: " ")
        let rows = try await database.query(
            """
            SELECT \(unescaped: Self.columns) FROM messages, plainto_tsquery('simple', \(text)) AS q
            WHERE "user" = \(mailbox) AND search @@ q
            ORDER BY ts_rank(search, q) DESC, date DESC, id DESC
            LIMIT \(min(limit, 10_000))
            """)
        return try rows.map { try Self.entry($0).storedMessage }
    }

    // MARK: - MailboxIndex

    /// Inserts an index row (`body` NULL, `location` set). Its subject is searchable.
    public func insert(_ entry: MailboxIndexEntry) async throws -> Bool {
        try Self.validate(mailbox: entry.mailbox, folder: entry.folder, messageID: entry.messageID)
        return try await insert(
            mailbox: entry.mailbox, folder: entry.folder, messageID: entry.messageID, from: entry.from, to: entry.to,
            subject: entry.subject, date: entry.date, size: Int64(entry.size), flags: MessageFlag.letters(entry.flags),
            body: nil, headers: entry.headers, location: entry.location, bodyText: "")
    }

    /// The row, index or inline; an inline row's `location` is empty.
    public func entry(mailbox: String, folder: String, messageID: String) async throws -> MailboxIndexEntry? {
        guard Self.storable(mailbox, folder, messageID) else { return nil }
        let rows = try await database.query(
            """
            SELECT \(unescaped: Self.columns) FROM messages
            WHERE "user" = \(mailbox) AND folder = \(folder) AND message_id = \(messageID)
            """)
        return try rows.first.map(Self.entry)
    }

    public func list(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (entries: [MailboxIndexEntry], total: Int) {
        try await entries(mailbox: mailbox, folder: folder, offset: offset, limit: limit)
    }

    /// `list` as an index, under a name that is not overloaded on its result type.
    func entries(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (entries: [MailboxIndexEntry], total: Int) {
        guard Self.storable(mailbox, folder) else { return ([], 0) }
        // One statement, so the page and its total are one snapshot; the LEFT JOIN keeps one
        // row (of NULLs) for the total when the page is empty.
        let rows = try await database.query(
            """
            SELECT \(unescaped: Self.columns),
                (SELECT COUNT(*) FROM messages WHERE "user" = \(mailbox) AND folder = \(folder))
            FROM (SELECT 1) AS one LEFT JOIN LATERAL (
                SELECT \(unescaped: Self.columns) FROM messages WHERE "user" = \(mailbox) AND folder = \(folder)
                ORDER BY date, id LIMIT \(max(0, limit)) OFFSET \(max(0, offset))
            ) AS messages ON true
            ORDER BY messages.date, messages.id
            """)
        var total = 0
        var entries: [MailboxIndexEntry] = []
        for row in rows {
            let cells = row.makeRandomAccess()
            total = Int(try cells[Self.columnCount].decode(Int64.self))
            if try cells[0].decode(Int64?.self) != nil { entries.append(try Self.entry(row)) }
        }
        return (entries, total)
    }

    public func remove(mailbox: String, folder: String, messageID: String) async throws -> MailboxIndexEntry? {
        guard Self.storable(mailbox, folder, messageID) else { return nil }
        let rows = try await database.query(
            """
            DELETE FROM messages WHERE "user" = \(mailbox) AND folder = \(folder) AND message_id = \(messageID)
            RETURNING \(unescaped: Self.columns)
            """)
        return try rows.first.map(Self.entry)
    }

    public func setFlags(_ flags: Set<MessageFlag>, mailbox: String, folder: String, messageID: String) async throws -> Bool {
        guard Self.storable(mailbox, folder, messageID) else { return false }
        let rows = try await database.query(
            """
            UPDATE messages SET flags = \(MessageFlag.letters(flags))
            WHERE "user" = \(mailbox) AND folder = \(folder) AND message_id = \(messageID) RETURNING id
            """)
        return !rows.isEmpty
    }

    public func removeMailbox(_ mailbox: String) async throws -> [MailboxIndexEntry] {
        guard Self.storable(mailbox) else { return [] }
        let rows = try await database.query(#"DELETE FROM messages WHERE "user" = \#(mailbox) RETURNING \#(unescaped: Self.columns)"#)
        return try rows.map(Self.entry)
    }

    public func references(to location: String) async throws -> Int {
        guard Self.storable(location) else { return 0 }
        let rows = try await database.query("SELECT COUNT(*) FROM messages WHERE location = \(location)")
        return try Int(rows.first?.decode(Int64.self) ?? 0)
    }

    // MARK: - Rows

    /// Every column but the body and the vector, in the order `entry(_:)` decodes them.
    static let columns = """
        messages.id, messages."user", messages.folder, messages.message_id, messages.from_addr, messages.to_addrs, \
        messages.subject, messages.date, messages.size, messages.flags, messages.headers, messages.location
        """
    static let columnCount = 12

    static func entry(_ row: PostgresRow) throws -> MailboxIndexEntry {
        let (_, mailbox, folder, messageID, from, to, subject, date, size, flags, headers, location) = try row.decode(
            (Int64, String, String, String, String?, String?, String?, Date, Int64, String, String?, String?).self)
        return MailboxIndexEntry(
            mailbox: mailbox, folder: folder, messageID: messageID, location: location ?? "", size: Int(size), date: date,
            flags: MessageFlag.parse(flags), subject: subject, from: from, to: to, headers: headers)
    }

    /// Inserts the row with its search vector; false when (user, folder, message_id) exists.
    private func insert(
        mailbox: String, folder: String, messageID: String, from: String?, to: String?, subject: String?, date: Date,
        size: Int64, flags: String, body: ByteBuffer?, headers: String?, location: String?, bodyText: String
    ) async throws -> Bool {
        let clean = PostgresSearchText.withoutNUL
        let rows = try await database.query(
            """
            INSERT INTO messages (message_id, "user", folder, from_addr, to_addrs, subject, date, size, flags, body, headers, location, search)
            VALUES (\(messageID), \(mailbox), \(folder), \(from.map(clean)), \(to.map(clean)), \(subject.map(clean)), \(date),
                \(size), \(flags), \(body), \(headers.map(clean)), \(location.map(clean)),
                setweight(to_tsvector('simple', \(clean(subject ?? ""))), 'A')
                    || setweight(to_tsvector('simple', \(clean(bodyText))), 'D'))
            ON CONFLICT ("user", folder, message_id) DO NOTHING
            RETURNING id
            """)
        return !rows.isEmpty
    }

    /// PostgreSQL text cannot hold NUL: a key with one names no row.
    static func storable(_ keys: String...) -> Bool {
        keys.allSatisfy { !$0.utf8.contains(0) }
    }

    static func validate(mailbox: String, folder: String, messageID: String) throws {
        if mailbox.isEmpty || !storable(mailbox) { throw MailboxError(.invalidMailbox, "empty mailbox name, or one with NUL") }
        if folder.isEmpty || !storable(folder) { throw MailboxError(.unsupportedFolder, "empty folder name, or one with NUL") }
        if messageID.isEmpty || !storable(messageID) { throw MailboxError(.invalidMailbox, "empty message id, or one with NUL") }
    }
}

/// The text full-text search sees, and the words of a query: the rules of
/// `MailTierSQLite`'s store, repeated here because the adapters do not import each other.
enum PostgresSearchText {
    /// How much of a body is indexed.
    static let maxBodyBytes = 262_144

    /// The bytes after the header section (after the first empty line; none when there is no
    /// empty line), at most `maxBodyBytes`, decoded as UTF-8 with invalid sequences replaced.
    static func body(of message: ByteBuffer) -> String {
        let bytes = message.readableBytesView
        var index = bytes.startIndex
        var atLineStart = true
        var start: Int?
        while index < bytes.endIndex {
            let byte = bytes[index]
            if atLineStart {
                if byte == UInt8(ascii: "\n") {
                    start = index + 1
                    break
                }
                if byte == UInt8(ascii: "\r"), index + 1 < bytes.endIndex, bytes[index + 1] == UInt8(ascii: "\n") {
                    start = index + 2
                    break
                }
            }
            atLineStart = byte == UInt8(ascii: "\n")
            index += 1
        }
        guard let start else { return "" }
        return String(decoding: bytes[start..<min(bytes.endIndex, start + maxBodyBytes)], as: UTF8.self)
    }

    /// Runs of letters, digits, private-use characters and the marks that follow them.
    static func words(_ text: String) -> [String] {
        var words: [String] = []
        var current = String.UnicodeScalarView()
        for scalar in text.unicodeScalars {
            switch scalar.properties.generalCategory {
            case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter,
                .decimalNumber, .letterNumber, .otherNumber, .privateUse:
                current.append(scalar)
            case .nonspacingMark, .spacingMark, .enclosingMark:
                if !current.isEmpty { current.append(scalar) }
            default:
                if !current.isEmpty { words.append(String(current)) }
                current = String.UnicodeScalarView()
            }
        }
        if !current.isEmpty { words.append(String(current)) }
        return words
    }

    /// `text` with every NUL replaced by a space (PostgreSQL text cannot hold NUL).
    @Sendable static func withoutNUL(_ text: String) -> String {
        guard text.utf8.contains(0) else { return text }
        return String(String.UnicodeScalarView(text.unicodeScalars.map { $0 == "\0" ? " " : $0 }))
    }
}
