#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Crypto
import Logging
import NIOCore
import SMTPProtocol

/// The bounce generator (issue 5, item 5): for recipients that failed for good, one RFC 3464
/// delivery status notification per message to its envelope sender, queued like any other
/// message (spool blob first, then the rows), from the null reverse path `<>`.
///
/// - Never to `<>`: a message from the null sender (a bounce among them) fails silently, so two
///   servers cannot bounce a message between them forever (RFC 5321 §4.5.5, RFC 3464 §2).
/// - The sender is routed as ingress routes a recipient (`IngressService.route`, as if
///   authenticated): a local account gets it in its mailbox, any other address is a remote
///   recipient for the outbound transport. An unknown or disabled local sender gets nothing.
/// - Idempotent: the DSN's queue id is derived from the original's id and the failed jobs' ids,
///   and `MessageQueue.enqueueIfAbsent` treats an existing id as done, so a notice repeated
///   after a crash (the notifier runs before the failures are recorded) queues no second DSN
///   while the first is still queued.
public struct BounceService: FailureNotifier {
    public let configuration: Configuration
    public let queue: any MessageQueue
    public let spool: any BlobStore
    /// Rung after a DSN was queued, so an in-process delivery loop takes it at once.
    public let newMail: Doorbell?
    public let logger: Logger
    private let router: IngressService
    private let now: @Sendable () -> Date

    public init(
        configuration: Configuration, accounts: AccountService, queue: any MessageQueue, spool: any BlobStore,
        newMail: Doorbell?, logger: Logger, now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.configuration = configuration
        self.queue = queue
        self.spool = spool
        self.newMail = newMail
        self.logger = logger
        self.now = now
        // Routing only: no quota check (a DSN to a full local mailbox is deferred like any
        // message), no rate limits.
        router = IngressService(
            configuration: configuration, accounts: accounts, queue: queue, spool: spool, newMail: nil, quota: nil,
            logger: logger)
    }

    public func notify(_ failures: [FailedDelivery]) async throws {
        let byMessage = Dictionary(grouping: failures, by: \.job.messageID)
        for messageID in byMessage.keys.sorted() {
            try await bounce(byMessage[messageID]!)
        }
    }

    /// The queue id of the DSN for these failures of one message: `msg_` and 20 base32
    /// characters of SHA-256 over the message id and the sorted job ids — the same for the same
    /// failures, so a repeated notice finds the DSN it already queued.
    public static func queueID(messageID: String, jobIDs: [Int64]) -> String {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyz234567".utf8)
        let input = "mailtier-dsn\u{0}\(messageID)\u{0}" + jobIDs.sorted().map(String.init).joined(separator: ",")
        let digest = Array(SHA256.hash(data: Array(input.utf8)))
        return "msg_" + String(decoding: digest.prefix(20).map { alphabet[Int($0 & 31)] }, as: UTF8.self)
    }

    /// Queues one DSN for `failures`, which all belong to one message. Returns its queue id, or
    /// nil when none may or can be sent (null sender, a sender that cannot receive mail).
    @discardableResult
    func bounce(_ failures: [FailedDelivery]) async throws -> String? {
        guard let first = failures.first else { return nil }
        let original = first.job
        var metadata: Logger.Metadata = ["queue_id": "\(original.messageID)", "recipients": "\(failures.count)"]
        guard let sender = Self.mailbox(original.mailFrom) else {
            // Also every DSN's own failures: they come from <>.
            logger.info("no bounce: the message came from the null sender <>", metadata: metadata)
            return nil
        }
        metadata["to"] = "<\(original.mailFrom)>"
        let recipient: QueuedRecipient
        switch try await router.route(.mailbox(sender), authenticated: true) {
        case .local(let mailbox):
            recipient = QueuedRecipient(address: mailbox, domain: Self.domain(of: mailbox), isLocal: true)
        case .remote(let domain):
            recipient = QueuedRecipient(address: sender.description, domain: domain, isLocal: false)
        case .rejected(let reply):
            metadata["reply"] = "\(reply.code) \(reply.enhancedCode.map { "\($0)" } ?? "")"
            logger.warning("no bounce: the sender cannot receive mail", metadata: metadata)
            return nil
        }

        let id = Self.queueID(messageID: original.messageID, jobIDs: failures.map(\.job.id))
        metadata["bounce_id"] = "\(id)"
        let date = now()
        var headers = ByteBuffer()
        do {
            headers = try await spool.get(key: original.blobKey)
        } catch {
            // The notice matters more than the copy of the headers: send it without them.
            metadata["error"] = "\(error)"
            logger.warning("bounce without the original headers: cannot read the spooled message", metadata: metadata)
            metadata["error"] = nil
        }
        let notification = DeliveryStatusNotification(
            reportingMTA: configuration.hostname, arrivalDate: Self.mailDateTime(original.receivedAt), original: headers,
            sender: sender, recipients: failures.map { Self.report($0, at: date) }, returnContent: .headers,
            date: Self.mailDateTime(date), messageID: "dsn.\(original.messageID).\(id)@\(configuration.hostname)")
        let rendered = notification.render()

        let blob = rendered.message
        let digest = SHA256.hash(data: Array(blob.readableBytesView)).map { Self.hex($0) }.joined()
        // A blob key of its own: a repeated notice must not replace the blob of a DSN already queued.
        let blobKey = MessageID.make()
        let message = QueuedMessage(
            id: id, blobKey: blobKey, sha256: digest, sizeBytes: blob.readableBytes, mailFrom: "",
            subject: notification.subject, smtputf8: rendered.requiresSMTPUTF8,
            bodyType: rendered.requires8BitMIME ? "8BITMIME" : nil, deliverBy: nil, deliverByMode: nil,
            clientAddress: "127.0.0.1", heloName: configuration.hostname, authenticatedUser: nil, createdAt: date)
        try await spool.put(key: blobKey, data: blob)
        guard try await queue.enqueueIfAbsent(message, recipients: [recipient], maxAttempts: configuration.maxAttempts) else {
            try? await spool.delete(key: blobKey)
            logger.info("bounce already queued", metadata: metadata)
            return id
        }
        newMail?.ring()
        logger.info("bounce queued", metadata: metadata)
        return id
    }

    /// One recipient's field group. A failure without a server's reply reports our own text
    /// with the private diagnostic type `x-mailtier`. An expiry reports the last temporary
    /// status as permanent (`4.2.2` → `5.2.2`): `Action: failed` is final.
    static func report(_ failure: FailedDelivery, at date: Date) -> DeliveryStatusNotification.Recipient {
        let problem = failure.problem
        let numbers = problem.status.split(separator: ".").compactMap { UInt16($0) }
        // Class 5 whatever the last attempt said; an unreadable status is 5.0.0 (other).
        let status = numbers.count == 3 && numbers[1] < 1000 && numbers[2] < 1000
            ? EnhancedStatusCode(5, numbers[1], numbers[2]) : EnhancedStatusCode(5, 0, 0)
        return DeliveryStatusNotification.Recipient(
            finalRecipient: mailbox(failure.job.recipient) ?? Mailbox(localPart: failure.job.recipient, domain: ""),
            action: .failed, status: status, remoteMTA: problem.remoteMTA.map { withoutType("dns", $0) },
            diagnostic: problem.diagnostic.map { withoutType("smtp", $0) } ?? problem.message,
            diagnosticType: problem.diagnostic == nil ? "x-mailtier" : "smtp",
            // No attempt was made for a missed deadline.
            lastAttempt: failure.reason == .deadline ? nil : mailDateTime(date))
    }

    /// `mx.example.com` of `dns; mx.example.com` (the builder writes the type itself).
    static func withoutType(_ type: String, _ value: String) -> String {
        guard value.lowercased().hasPrefix(type + ";") else { return value }
        return String(value.dropFirst(type.count + 1).drop(while: { $0 == " " }))
    }

    /// `local@domain` split at its last `@`; nil for the null path (empty) or no `@`.
    static func mailbox(_ address: String) -> Mailbox? {
        guard let at = address.lastIndex(of: "@"), at != address.startIndex, address.index(after: at) != address.endIndex
        else { return nil }
        return Mailbox(localPart: String(address[..<at]), domain: String(address[address.index(after: at)...]))
    }

    static func domain(of address: String) -> String { mailbox(address)?.normalizedDomain ?? "" }

    static func mailDateTime(_ date: Date) -> MailDateTime { MailDateTime(secondsSince1970: date.unixSeconds) }

    static func hex(_ byte: UInt8) -> String {
        let digits = Array("0123456789abcdef".utf8)
        return String(decoding: [digits[Int(byte >> 4)], digits[Int(byte & 0x0F)]], as: UTF8.self)
    }
}
