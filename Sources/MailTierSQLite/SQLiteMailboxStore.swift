#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import MailTier
import NIOCore

/// The **database** mailbox store over the `messages` table (schema version 2), and the same
/// table used as a `MailboxIndex` by the timeseries and S3 stores.
///
/// The table is API.md's "Database Storage" `messages`, with these deviations:
/// - `UNIQUE("user", folder, message_id)` instead of `message_id UNIQUE` (DESIGN.md): one message
///   can be delivered to several local users, and a retried delivery stores no second copy.
///   `message_id` is our queue id (`msg_…`) and is what `StoredMessage.id` is.
/// - `"user"` is the mailbox (the account's email address), quoted everywhere because `user` is
///   a reserved word in PostgreSQL, whose schema is the same.
/// - `date` is integer Unix seconds (when the message was received), `size` and `flags` are
///   NOT NULL, `flags` holds maildir letters (`FS`).
/// - `body` is the message exactly as delivered, or NULL for an index row; `location` (added)
///   is then where the content lives. `references(to:)` counts rows by location.
/// - `idx_messages_folder` is `("user", folder, date)`, so that listings (oldest first) read
///   the index in order; `idx_messages_location` (partial) serves `references(to:)`.
/// - Full text: `messages_fts` (FTS5, `unicode61 remove_diacritics 2`), one row per message
///   with the same rowid, holding the subject and the **body text**: the bytes after the header
///   section, decoded as UTF-8 lossily (no MIME decoding), at most the first 256 KiB. Headers
///   other than the subject are not indexed. Index rows index their subject only. A trigger
///   removes the FTS row when the message row goes.
///
/// Search: the query is cut into words (runs of letters, digits and private-use characters;
/// everything else separates them), each word is quoted as an FTS5 string, and all must occur
/// (implicit AND) in the subject or the body. No user syntax (`OR`, `NEAR`, `*`, `"`, column
/// filters) ever reaches FTS5. Ranked by bm25 with the subject weighted twice the body.
public struct SQLiteMailboxStore: SearchableMailboxStore, MailboxIndex {
    public let database: SQLiteDatabase

    public init(database: SQLiteDatabase) {
        self.database = database
    }

    /// Any unique string: this store identifies deliveries by (mailbox, folder, message id).
    public func makeDeliveryKey() -> String { MessageID.make() }

    // MARK: - MailboxStore

    public func deliver(_ content: ByteBuffer, _ delivery: MailboxDelivery) async throws -> Bool {
        try Self.validate(mailbox: delivery.mailbox, folder: delivery.folder)
        let headers = MessageHeaders(content)
        let row = NewRow(
            mailbox: delivery.mailbox, folder: delivery.folder, messageID: delivery.messageID,
            from: headers["From"], to: headers["To"], subject: headers.subject, date: Self.seconds(delivery.receivedAt),
            size: Int64(content.readableBytes), flags: "", body: Array(content.readableBytesView), headers: headers.text,
            location: nil, bodyText: MessageSearchText.body(of: content))
        return try await database.write { connection in try Self.insert(row, connection) }
    }

    public func list(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (messages: [StoredMessage], total: Int) {
        let (entries, total) = try await entries(mailbox: mailbox, folder: folder, offset: offset, limit: limit)
        return (entries.map(\.storedMessage), total)
    }

    /// The body as delivered; nil when there is no such message. Throws `MailboxError.unavailable`
    /// for an index row (its content is elsewhere, at its location).
    public func fetch(mailbox: String, folder: String, id: String) async throws -> ByteBuffer? {
        let row = try await database.read { connection in
            try connection.query(
                #"SELECT body, location FROM messages WHERE "user" = ? AND folder = ? AND message_id = ?"#,
                [.text(mailbox), .text(folder), .text(id)]
            ).first
        }
        guard let row else { return nil }
        guard let body = row.blob("body") else {
            throw MailboxError(.unavailable, "message \(id) is an index row; its content is not in the database")
        }
        return ByteBuffer(bytes: body)
    }

    public func delete(mailbox: String, folder: String, id: String) async throws -> Bool {
        try await database.write { connection in
            try connection.execute(
                #"DELETE FROM messages WHERE "user" = ? AND folder = ? AND message_id = ?"#,
                [.text(mailbox), .text(folder), .text(id)])
            return connection.changes > 0
        }
    }

    public func setFlags(_ flags: Set<MessageFlag>, mailbox: String, folder: String, id: String) async throws -> Bool {
        try await setFlags(flags, mailbox: mailbox, folder: folder, messageID: id)
    }

    public func usageBytes(of mailbox: String) async throws -> Int64 {
        try await database.read { connection in
            try connection.query(#"SELECT COALESCE(SUM(size), 0) AS n FROM messages WHERE "user" = ?"#, [.text(mailbox)])
                .first?.int("n") ?? 0
        }
    }

    public func deleteMailbox(_ mailbox: String) async throws {
        try await database.write { connection in
            try connection.execute(#"DELETE FROM messages WHERE "user" = ?"#, [.text(mailbox)])
        }
    }

    // MARK: - SearchableMailboxStore

    public func search(mailbox: String, query: String, limit: Int) async throws -> [StoredMessage] {
        guard let match = Self.ftsQuery(query), limit > 0 else { return [] }
        return try await database.read { connection in
            try connection.query(
                """
                SELECT \(Self.columns) FROM messages_fts JOIN messages ON messages.id = messages_fts.rowid
                WHERE messages_fts MATCH ? AND messages."user" = ?
                ORDER BY bm25(messages_fts, 2.0, 1.0), messages.date DESC, messages.id DESC
                LIMIT ?
                """,
                [.text(match), .text(mailbox), .integer(Int64(min(limit, 10_000)))]
            ).map { Self.entry($0).storedMessage }
        }
    }

    /// The FTS5 query for the user's words: every word quoted, all required; nil when the query
    /// has no word. At most 32 words are used.
    static func ftsQuery(_ query: String) -> String? {
        let words = MessageSearchText.words(query).prefix(32)
        guard !words.isEmpty else { return nil }
        // A word holds only letters, digits and marks: never a `"`, so quoting needs no escape.
        return words.map { "\"" + $0 + "\"" }.joined(separator: " ")
    }

    // MARK: - MailboxIndex

    /// Inserts an index row (`body` NULL, `location` set). Its subject is searchable.
    public func insert(_ entry: MailboxIndexEntry) async throws -> Bool {
        try Self.validate(mailbox: entry.mailbox, folder: entry.folder)
        let row = NewRow(
            mailbox: entry.mailbox, folder: entry.folder, messageID: entry.messageID, from: entry.from, to: entry.to,
            subject: entry.subject, date: Self.seconds(entry.date), size: Int64(entry.size),
            flags: MessageFlag.letters(entry.flags), body: nil, headers: entry.headers, location: entry.location, bodyText: "")
        return try await database.write { connection in try Self.insert(row, connection) }
    }

    /// The row, index or inline; an inline row's `location` is empty.
    public func entry(mailbox: String, folder: String, messageID: String) async throws -> MailboxIndexEntry? {
        try await database.read { connection in
            try connection.query(
                #"SELECT \#(Self.columns) FROM messages WHERE "user" = ? AND folder = ? AND message_id = ?"#,
                [.text(mailbox), .text(folder), .text(messageID)]
            ).first.map(Self.entry)
        }
    }

    public func list(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (entries: [MailboxIndexEntry], total: Int) {
        try await entries(mailbox: mailbox, folder: folder, offset: offset, limit: limit)
    }

    /// `list` as an index, under a name that is not overloaded on its result type.
    func entries(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (entries: [MailboxIndexEntry], total: Int) {
        let result = try await database.read { connection in
            let rows = try connection.query(
                #"SELECT \#(Self.columns) FROM messages WHERE "user" = ? AND folder = ? ORDER BY date, id LIMIT ? OFFSET ?"#,
                [.text(mailbox), .text(folder), .integer(Int64(max(0, limit))), .integer(Int64(max(0, offset)))])
            let total = try connection.query(
                #"SELECT COUNT(*) AS n FROM messages WHERE "user" = ? AND folder = ?"#, [.text(mailbox), .text(folder)]
            ).first?.int("n") ?? 0
            return (rows.map(Self.entry), Int(total))
        }
        return (result.0, result.1)
    }

    public func remove(mailbox: String, folder: String, messageID: String) async throws -> MailboxIndexEntry? {
        try await database.write { connection in
            try connection.query(
                #"DELETE FROM messages WHERE "user" = ? AND folder = ? AND message_id = ? RETURNING \#(Self.columns)"#,
                [.text(mailbox), .text(folder), .text(messageID)]
            ).first.map(Self.entry)
        }
    }

    public func setFlags(_ flags: Set<MessageFlag>, mailbox: String, folder: String, messageID: String) async throws -> Bool {
        try await database.write { connection in
            try connection.execute(
                #"UPDATE messages SET flags = ? WHERE "user" = ? AND folder = ? AND message_id = ?"#,
                [.text(MessageFlag.letters(flags)), .text(mailbox), .text(folder), .text(messageID)])
            return connection.changes > 0
        }
    }

    public func removeMailbox(_ mailbox: String) async throws -> [MailboxIndexEntry] {
        try await database.write { connection in
            try connection.query(#"DELETE FROM messages WHERE "user" = ? RETURNING \#(Self.columns)"#, [.text(mailbox)])
                .map(Self.entry)
        }
    }

    public func references(to location: String) async throws -> Int {
        try await database.read { connection in
            Int(try connection.query("SELECT COUNT(*) AS n FROM messages WHERE location = ?", [.text(location)]).first?.int("n") ?? 0)
        }
    }

    // MARK: - Rows

    /// Every column but the body, named as `entry(_:)` reads them.
    static let columns = """
        messages.id AS id, messages."user" AS mailbox, messages.folder AS folder, messages.message_id AS message_id, \
        messages.from_addr AS from_addr, messages.to_addrs AS to_addrs, messages.subject AS subject, \
        messages.date AS date, messages.size AS size, messages.flags AS flags, messages.headers AS headers, \
        messages.location AS location
        """

    static func entry(_ row: SQLiteRow) -> MailboxIndexEntry {
        MailboxIndexEntry(
            mailbox: row.string("mailbox") ?? "", folder: row.string("folder") ?? "", messageID: row.string("message_id") ?? "",
            location: row.string("location") ?? "", size: Int(row.int("size") ?? 0),
            date: Date(timeIntervalSince1970: TimeInterval(row.int("date") ?? 0)),
            flags: MessageFlag.parse(row.string("flags") ?? ""), subject: row.string("subject"), from: row.string("from_addr"),
            to: row.string("to_addrs"), headers: row.string("headers"))
    }

    /// What one insert writes.
    struct NewRow: Sendable {
        var mailbox: String
        var folder: String
        var messageID: String
        var from: String?
        var to: String?
        var subject: String?
        var date: Int64
        var size: Int64
        var flags: String
        var body: [UInt8]?
        var headers: String?
        var location: String?
        var bodyText: String
    }

    /// Inserts the row and its FTS row; false when (user, folder, message_id) exists.
    static func insert(_ row: NewRow, _ connection: SQLiteConnection) throws -> Bool {
        try connection.execute(
            """
            INSERT INTO messages (message_id, "user", folder, from_addr, to_addrs, subject, date, size, flags, body, headers, location)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT("user", folder, message_id) DO NOTHING
            """,
            [.text(row.messageID), .text(row.mailbox), .text(row.folder), .optionalText(row.from), .optionalText(row.to),
             .optionalText(row.subject), .integer(row.date), .integer(row.size), .text(row.flags),
             row.body.map { .blob($0) } ?? .null, .optionalText(row.headers), .optionalText(row.location)])
        guard connection.changes > 0 else { return false }
        try connection.execute(
            "INSERT INTO messages_fts (rowid, subject, body) VALUES (?, ?, ?)",
            [.integer(connection.lastInsertRowID), .text(row.subject ?? ""), .text(row.bodyText)])
        return true
    }

    static func validate(mailbox: String, folder: String) throws {
        if mailbox.isEmpty { throw MailboxError(.invalidMailbox, "empty mailbox name") }
        if folder.isEmpty { throw MailboxError(.unsupportedFolder, "empty folder name") }
    }

    static func seconds(_ date: Date) -> Int64 { Int64(date.timeIntervalSince1970.rounded(.down)) }
}

/// The text that full-text search sees, and the words of a query. (PostgreSQL's store has the
/// same rules in `MailTierPostgres`.)
enum MessageSearchText {
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
}
