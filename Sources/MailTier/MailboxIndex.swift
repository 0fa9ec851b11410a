#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import NIOCore

/// One message of one mailbox, as an index row (the `messages` table): where its content lives
/// and what a listing shows. Used by stores that keep content elsewhere (timeseries files, S3).
public struct MailboxIndexEntry: Sendable, Equatable {
    public var mailbox: String
    public var folder: String
    /// The queue id (`msg_…`): unique with mailbox and folder.
    public var messageID: String
    /// Where the content is (a relative path or an object key). Several entries may share one.
    public var location: String
    public var size: Int
    public var date: Date
    public var flags: Set<MessageFlag>
    public var subject: String?
    public var from: String?
    public var to: String?
    /// The header section, unfolded, as text.
    public var headers: String?

    public init(
        mailbox: String, folder: String, messageID: String, location: String, size: Int, date: Date, flags: Set<MessageFlag>,
        subject: String?, from: String?, to: String?, headers: String?
    ) {
        self.mailbox = mailbox
        self.folder = folder
        self.messageID = messageID
        self.location = location
        self.size = size
        self.date = date
        self.flags = flags
        self.subject = subject
        self.from = from
        self.to = to
        self.headers = headers
    }

    public var storedMessage: StoredMessage {
        StoredMessage(id: messageID, folder: folder, size: size, date: date, flags: flags, subject: subject, from: from)
    }
}

/// The `messages` table used as an index (SQLite or PostgreSQL).
public protocol MailboxIndex: Sendable {
    /// Inserts the entry; false (and nothing changed) when (mailbox, folder, messageID) exists.
    func insert(_ entry: MailboxIndexEntry) async throws -> Bool
    func entry(mailbox: String, folder: String, messageID: String) async throws -> MailboxIndexEntry?
    /// Oldest first, with the total.
    func list(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (entries: [MailboxIndexEntry], total: Int)
    /// Removes and returns the entry.
    func remove(mailbox: String, folder: String, messageID: String) async throws -> MailboxIndexEntry?
    func setFlags(_ flags: Set<MessageFlag>, mailbox: String, folder: String, messageID: String) async throws -> Bool
    func usageBytes(of mailbox: String) async throws -> Int64
    /// Removes every entry of the mailbox and returns them.
    func removeMailbox(_ mailbox: String) async throws -> [MailboxIndexEntry]
    /// How many entries point at `location`.
    func references(to location: String) async throws -> Int
}

/// Where a store keeps message content by location (encrypted date tree, S3 bucket).
public protocol MessageContentStore: Sendable {
    /// The location of a delivery's content: the same for every retry of it.
    func location(for delivery: MailboxDelivery) -> String
    /// Writes durably; writing the same location again replaces it (idempotent).
    func write(_ content: ByteBuffer, at location: String) async throws
    func read(at location: String) async throws -> ByteBuffer
    /// Removing a missing location is not an error.
    func remove(at location: String) async throws
}

/// A mailbox store made of an index and a content store: content first, then the index row
/// (a crash between them leaves content no row refers to, never a row pointing at nothing).
/// One message delivered to several local users is stored once and indexed once per user.
public struct IndexedMailboxStore: MailboxStore {
    public let index: any MailboxIndex
    public let content: any MessageContentStore

    public init(index: any MailboxIndex, content: any MessageContentStore) {
        self.index = index
        self.content = content
    }

    public func makeDeliveryKey() -> String { MessageID.make() }

    public func deliver(_ message: ByteBuffer, _ delivery: MailboxDelivery) async throws -> Bool {
        if try await index.entry(mailbox: delivery.mailbox, folder: delivery.folder, messageID: delivery.messageID) != nil {
            return false
        }
        let location = content.location(for: delivery)
        try await content.write(message, at: location)
        let headers = MessageHeaders(message)
        return try await index.insert(
            MailboxIndexEntry(
                mailbox: delivery.mailbox, folder: delivery.folder, messageID: delivery.messageID, location: location,
                size: message.readableBytes, date: delivery.receivedAt, flags: [], subject: headers.subject,
                from: headers["From"], to: headers["To"], headers: headers.text))
    }

    public func list(mailbox: String, folder: String, offset: Int, limit: Int) async throws -> (messages: [StoredMessage], total: Int) {
        let (entries, total) = try await index.list(mailbox: mailbox, folder: folder, offset: offset, limit: limit)
        return (entries.map(\.storedMessage), total)
    }

    public func fetch(mailbox: String, folder: String, id: String) async throws -> ByteBuffer? {
        guard let entry = try await index.entry(mailbox: mailbox, folder: folder, messageID: id) else { return nil }
        return try await content.read(at: entry.location)
    }

    public func delete(mailbox: String, folder: String, id: String) async throws -> Bool {
        guard let entry = try await index.remove(mailbox: mailbox, folder: folder, messageID: id) else { return false }
        if try await index.references(to: entry.location) == 0 { try await content.remove(at: entry.location) }
        return true
    }

    public func setFlags(_ flags: Set<MessageFlag>, mailbox: String, folder: String, id: String) async throws -> Bool {
        try await index.setFlags(flags, mailbox: mailbox, folder: folder, messageID: id)
    }

    public func usageBytes(of mailbox: String) async throws -> Int64 {
        try await index.usageBytes(of: mailbox)
    }

    public func deleteMailbox(_ mailbox: String) async throws {
        for entry in try await index.removeMailbox(mailbox) where try await index.references(to: entry.location) == 0 {
            try await content.remove(at: entry.location)
        }
    }
}

/// The header section of a message (RFC 5322 §2.2), unfolded. Only what listings and the
/// database store need: no MIME decoding.
public struct MessageHeaders: Sendable {
    public private(set) var fields: [(name: String, value: String)] = []

    /// Reads at most the first 256 KiB, up to the first empty line.
    public init(_ message: ByteBuffer) {
        let view = message.readableBytesView
        let limit = view.startIndex + min(view.count, 262_144)
        // Only the header section is decoded: the body (often far larger) is not looked at.
        var end = view.startIndex
        var lineStart = true
        while end < limit {
            let byte = view[end]
            if lineStart && (byte == UInt8(ascii: "\n") || (byte == UInt8(ascii: "\r") && end + 1 < limit && view[end + 1] == UInt8(ascii: "\n"))) {
                break
            }
            lineStart = byte == UInt8(ascii: "\n")
            end += 1
        }
        let text = String(decoding: view[view.startIndex..<end], as: UTF8.self)
        var current: (name: String, value: String)?
        // "\r\n" is one Character in Swift: split on newline characters, not on "\n".
        for line in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline) {
            if line.isEmpty { break }
            if let first = line.first, first == " " || first == "\t" {
                current?.value += " " + Self.trimmed(line)
                continue
            }
            if let field = current { fields.append(field) }
            guard let colon = line.firstIndex(of: ":") else {
                current = nil
                continue
            }
            current = (String(line[..<colon]).trimmingSpacesAndTabs(), Self.trimmed(line[line.index(after: colon)...]))
        }
        if let field = current { fields.append(field) }
    }

    private static func trimmed(_ text: Substring) -> String { String(text).trimmingSpacesAndTabs() }

    /// The first field of that name (case-insensitive).
    public subscript(_ name: String) -> String? {
        let lower = name.lowercased()
        return fields.first { $0.name.lowercased() == lower }?.value
    }

    public var subject: String? { self["Subject"].map { String($0.prefix(998)) } }

    /// The fields as `Name: value` lines.
    public var text: String { fields.map { "\($0.name): \($0.value)" }.joined(separator: "\n") }
}

extension String {
    func trimmingSpacesAndTabs() -> String {
        var slice = Substring(self)
        while let first = slice.first, first == " " || first == "\t" { slice = slice.dropFirst() }
        while let last = slice.last, last == " " || last == "\t" { slice = slice.dropLast() }
        return String(slice)
    }
}
