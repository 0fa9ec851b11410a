#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Crypto
import Logging
import NIOCore
import SMTPNIO
import SMTPProtocol

/// The ingress role: SMTP policy (who may send, who may receive) and the durability contract
/// of DESIGN.md — blob first, then one transaction, and only then 250.
public struct IngressService: SMTPServerDelegate {
    public let configuration: Configuration
    public let accounts: AccountService
    public let queue: any MessageQueue
    public let spool: any BlobStore
    /// Rung after each accepted message, so an in-process delivery loop starts at once.
    public let newMail: Doorbell?
    /// For quotas at RCPT time; none means no check here (delivery still checks).
    public let quota: QuotaChecker?
    /// Counts connections, commands, AUTH failures and messages per client address.
    public let limiter: any RateLimiter
    /// Delivers queued mail over a connection turned around by ATRN; without it, ATRN for a
    /// domain with mail waiting answers 451 (try later).
    public let turnaround: (any ATRNDeliverer)?
    /// Messages received, their processing time and size, AUTH attempts. By default nothing is
    /// recorded: an `IngressService` used only as a router (bounces) must not register ingress
    /// metrics in a role that does not receive mail.
    public let metrics: IngressMetrics
    /// Where `auth.failed` webhook events go (when `configuration.recordedEvents` holds it).
    public let events: (any EventOutbox)?
    public let logger: Logger

    public init(
        configuration: Configuration, accounts: AccountService, queue: any MessageQueue, spool: any BlobStore,
        newMail: Doorbell?, quota: QuotaChecker? = nil, limiter: any RateLimiter = InProcessRateLimiter(),
        turnaround: (any ATRNDeliverer)? = nil, metrics: IngressMetrics = .none, events: (any EventOutbox)? = nil,
        logger: Logger
    ) {
        self.metrics = metrics
        self.events = events
        self.limiter = limiter
        self.turnaround = turnaround
        self.configuration = configuration
        self.accounts = accounts
        self.queue = queue
        self.spool = spool
        self.newMail = newMail
        self.quota = quota
        self.logger = logger
    }

    // MARK: Rate limits

    /// The SMTP session configuration's switches for the checks this service makes.
    public var checksConnections: Bool { configuration.rateLimits.rule(for: .connection) != nil }
    public var checksCommands: Bool { configuration.rateLimits.rule(for: .command) != nil }

    /// The rule for `kind` applied to this session's client; nil when the limit is off or the
    /// client is a trusted proxy itself (the load balancer's health checks are not limited).
    private func rule(_ kind: RateLimitKind, for session: SMTPSessionInfo) -> RateRule? {
        guard let rule = configuration.rateLimits.rule(for: kind),
            !configuration.trustedProxies.containsAddress(session.clientAddress)
        else { return nil }
        return rule
    }

    /// Counts an event of `kind` for the client; nil when within the limit (or the limit is off).
    func hit(_ kind: RateLimitKind, session: SMTPSessionInfo) async -> RateDecision? {
        guard let rule = rule(kind, for: session) else { return nil }
        let decision = await limiter.hit(kind, key: session.clientAddress, rule: rule, now: Date())
        return decision.allowed ? nil : decision
    }

    /// Whether one more event of `kind` would be over the limit, without counting it.
    func peek(_ kind: RateLimitKind, session: SMTPSessionInfo) async -> RateDecision? {
        guard let rule = rule(kind, for: session) else { return nil }
        let decision = await limiter.peek(kind, key: session.clientAddress, rule: rule, now: Date())
        return decision.allowed ? nil : decision
    }

    public func connectionOpened(session: SMTPSessionInfo) async -> SMTPReply? {
        guard let refusal = await hit(.connection, session: session) else { return nil }
        if refusal.unavailable { return .rateLimiterUnavailable(configuration.hostname) }
        logger.notice("connection rate limit", metadata: ["client": "\(session.clientAddress)"])
        metrics.connectionRefused()
        return .connectionRateExceeded(configuration.hostname)
    }

    public func commandReceived(session: SMTPSessionInfo) async -> SMTPReply? {
        guard let refusal = await hit(.command, session: session) else { return nil }
        if refusal.unavailable { return .rateLimiterUnavailable(configuration.hostname) }
        logger.notice("command rate limit", metadata: ["client": "\(session.clientAddress)"])
        return .commandRateExceeded(configuration.hostname)
    }

    // MARK: AUTH

    public func authenticate(login: String, password: String, session: SMTPSessionInfo) async throws -> String? {
        if let refusal = await peek(.authFailure, session: session) {
            if refusal.unavailable { throw SMTPRefusal(.authTemporaryFailure) }
            logger.notice("AUTH refused: too many failures", metadata: ["client": "\(session.clientAddress)"])
            metrics.authenticationAttempted(succeeded: false)
            throw SMTPRefusal(.authRateExceeded)
        }
        // A temporary failure (the store unreachable) throws before it counts: not an attempt judged.
        let user = try await accounts.authenticate(login: login, password: password)
        metrics.authenticationAttempted(succeeded: user != nil)
        if user == nil {
            logger.info("AUTH failed", metadata: ["client": "\(session.clientAddress)"])
            _ = await hit(.authFailure, session: session)
            await recordAuthFailure(login: login, session: session)
        }
        return user?.username
    }

    /// Writes an `auth.failed` event (the name tried, at most 256 characters, and the client's
    /// address). A failure to write it is logged; the client's reply does not change.
    private func recordAuthFailure(login: String, session: SMTPSessionInfo) async {
        guard let events, configuration.recordedEvents.contains(.authFailed) else { return }
        do {
            try await events.append(.authFailed(username: String(login.prefix(256)), clientAddress: session.clientAddress, at: Date()))
        } catch {
            logger.error("auth.failed webhook event not recorded", metadata: ["error": "\(error)"])
        }
    }

    // MARK: RCPT

    /// Where a recipient goes: a local mailbox (an enabled account), a remote domain, or nowhere.
    public enum Route: Sendable, Equatable {
        case local(mailbox: String)
        case remote(domain: String)
        case rejected(SMTPReply)
    }

    /// With `checkQuota` (RCPT), a full local mailbox is refused (452 4.2.2); without it (the end
    /// of data, after RCPT said 250), the recipient stays: delivery defers it, and bounces it if
    /// the mailbox stays full.
    public func route(_ recipient: ForwardPath, authenticated: Bool, checkQuota: Bool = true) async throws -> Route {
        let mailbox: Mailbox
        switch recipient {
        case .postmaster:
            guard let admin = try await firstAdmin() else { return .rejected(.userUnknown("Postmaster")) }
            return .local(mailbox: admin.email)
        case .mailbox(let value):
            mailbox = value
        }
        let address = mailbox.description
        if mailbox.localPart.lowercased() == "postmaster" && configuration.isLocalDomain(mailbox.domain),
            try await accounts.users.user(email: address) == nil, let admin = try await firstAdmin()
        {
            // RFC 5321 §4.5.1: postmaster at every local domain.
            return .local(mailbox: admin.email)
        }
        if let user = try await accounts.users.user(email: address) {
            guard user.enabled else { return .rejected(.userUnknown(address)) }
            if checkQuota, let quota, try await quota.isOverQuota(user) { return .rejected(.mailboxFull(address)) }
            return .local(mailbox: user.email)
        }
        if configuration.isLocalDomain(mailbox.domain) { return .rejected(.userUnknown(address)) }
        guard authenticated else { return .rejected(.relayDenied(address)) }
        return .remote(domain: mailbox.normalizedDomain)
    }

    private func firstAdmin() async throws -> User? {
        try await accounts.users.list(offset: 0, limit: 1000).users.first { $0.isAdmin && $0.enabled }
    }

    public func checkRecipient(_ recipient: ForwardPath, envelope: Envelope, session: SMTPSessionInfo) async -> SMTPReply? {
        // Refuse early, before the content is sent, when no message could be accepted anyway.
        if envelope.recipients.isEmpty, let refusal = await peek(.message, session: session) {
            return refusal.unavailable ? .rateLimiterUnavailableForMessage : .messageRateExceeded
        }
        do {
            switch try await route(recipient, authenticated: envelope.authenticatedUser != nil) {
            case .local, .remote:
                return nil
            case .rejected(let reply):
                logger.info(
                    "RCPT rejected",
                    metadata: ["client": "\(session.clientAddress)", "from": "<\(envelope.reversePath)>", "to": "<\(recipient)>", "reply": "\(reply.code) \(reply.enhancedCode.map { "\($0)" } ?? "")"])
                return reply
            }
        } catch {
            logger.error("RCPT lookup failed", metadata: ["error": "\(error)"])
            return SMTPReply(451, .init(4, 3, 0), "Temporary lookup failure, try again later")
        }
    }

    // MARK: DATA / BDAT LAST

    public func deliver(_ envelope: Envelope, content: ByteBuffer, session: SMTPSessionInfo) async -> SMTPDeliveryOutcome {
        let id = MessageID.make()
        let now = Date()
        do {
            var recipients: [QueuedRecipient] = []
            for recipient in envelope.recipients {
                switch try await route(recipient, authenticated: envelope.authenticatedUser != nil, checkQuota: false) {
                case .local(let mailbox):
                    let domain = mailbox.split(separator: "@").last.map { $0.lowercased() } ?? ""
                    if !recipients.contains(where: { $0.address == mailbox }) {
                        recipients.append(QueuedRecipient(address: mailbox, domain: domain, isLocal: true))
                    }
                case .remote(let domain):
                    recipients.append(QueuedRecipient(address: "\(recipient)", domain: domain, isLocal: false))
                case .rejected:
                    break  // The account went away between RCPT and now.
                }
            }
            guard !recipients.isEmpty else { return .rejected(.noValidRecipients) }
            // Counted here, atomically: of two sessions racing for the last message of the hour,
            // one gets the refusal.
            if let refusal = await hit(.message, session: session) {
                logger.notice("message rate limit", metadata: ["client": "\(session.clientAddress)", "queue_id": "\(id)"])
                return .rejected(refusal.unavailable ? .rateLimiterUnavailableForMessage : .messageRateExceeded)
            }

            var blob = ByteBufferAllocator().buffer(capacity: content.readableBytes + 256)
            blob.writeString(receivedHeader(id: id, envelope: envelope, session: session, date: now))
            blob.writeImmutableBuffer(content)
            var hasher = SHA256()
            blob.withUnsafeReadableBytes { hasher.update(bufferPointer: $0) }
            let digest = hasher.finalize()
            let message = QueuedMessage(
                id: id, blobKey: id, sha256: digest.map { byteHex($0) }.joined(), sizeBytes: blob.readableBytes,
                mailFrom: envelope.reversePath.description, subject: Self.subject(of: content),
                smtputf8: envelope.parameters.smtputf8, bodyType: envelope.parameters.body?.rawValue,
                deliverBy: envelope.parameters.deliverBy.map { now.addingTimeInterval(Double($0.seconds)) },
                deliverByMode: envelope.parameters.deliverBy?.mode.rawValue, clientAddress: session.clientAddress,
                heloName: envelope.heloName, authenticatedUser: envelope.authenticatedUser, createdAt: now)

            // 1. The blob, durable. 2. The rows, in one transaction. 3. Only then 250.
            try await spool.put(key: message.blobKey, data: blob)
            try await queue.enqueue(message, recipients: recipients, maxAttempts: configuration.maxAttempts)
            newMail?.ring()
            logger.info(
                "message accepted",
                metadata: [
                    "queue_id": "\(id)", "client": "\(session.clientAddress)", "from": "<\(envelope.reversePath)>",
                    "recipients": "\(recipients.count)", "size": "\(blob.readableBytes)",
                ])
            return .queued(id)
        } catch {
            logger.error(
                "message not queued", metadata: ["queue_id": "\(id)", "client": "\(session.clientAddress)", "error": "\(error)"])
            return .rejected(.storageFailure)
        }
    }

    public func messageReceived(_ receipt: SMTPMessageReceipt) {
        metrics.messageReceived(sizeBytes: receipt.sizeBytes, accepted: receipt.accepted, processing: receipt.processing)
    }

    /// RFC 5321 §4.4 trace field; RFC 3848 / RFC 6531 protocol names.
    func receivedHeader(id: String, envelope: Envelope, session: SMTPSessionInfo, date: Date) -> String {
        var with = envelope.parameters.smtputf8 ? "UTF8SMTP" : (envelope.usedEHLO ? "ESMTP" : "SMTP")
        if envelope.tlsActive { with += "S" }
        if envelope.authenticatedUser != nil { with += "A" }
        let helo = envelope.heloName.isEmpty ? "unknown" : envelope.heloName
        // RFC 5321 §4.1.3 address literals: [192.0.2.7], [IPv6:2001:db8::7].
        let literal = session.clientAddress.contains(":") ? "IPv6:\(session.clientAddress)" : session.clientAddress
        var header = "Received: from \(helo) ([\(literal)])\r\n"
        if envelope.tlsActive, let version = session.tlsVersion {
            // RFC 5321 §4.4 leaves comments free; this is the form Postfix writes.
            header += "\t(using \(version)\(session.tlsCipher.map { " with cipher \($0)" } ?? ""))\r\n"
        }
        header += "\tby \(configuration.hostname) (MailTier) with \(with) id \(id)"
        if envelope.recipients.count == 1, let only = envelope.recipients.first {
            header += "\r\n\tfor <\(only)>"
        }
        header += "; \(MailDate.rfc5322(date))\r\n"
        return header
    }

    /// The first `Subject:` field of the header section, unfolded, at most 998 characters.
    static func subject(of content: ByteBuffer) -> String? { MessageHeaders(content).subject }

    // MARK: ETRN / ATRN

    public func etrn(domain: String, session: SMTPSessionInfo) async -> SMTPReply {
        do {
            let count = try await queue.makeDue(domain: domain.lowercased(), now: Date())
            if count > 0 { newMail?.ring() }
            logger.info("ETRN", metadata: ["client": "\(session.clientAddress)", "domain": "\(domain)", "recipients": "\(count)"])
            return .queuingStarted(domain)
        } catch {
            logger.error("ETRN failed", metadata: ["error": "\(error)"])
            return SMTPReply(458, .init(4, 3, 0), "Unable to queue messages for \(domain)")
        }
    }

    /// RFC 2645: an authenticated user may take the mail waiting for its own domain (an
    /// administrator for any). With mail waiting and a deliverer, the connection turns around.
    public func atrn(domains: [String], user: String, session: SMTPSessionInfo) async -> SMTPATRNDecision {
        do {
            guard let account = try await accounts.users.user(named: user), account.enabled else {
                return .reply(.atrnRefused(domains.first ?? ""))
            }
            let ownDomain = account.email.split(separator: "@").last.map { $0.lowercased() } ?? ""
            for domain in domains where !account.isAdmin && domain.lowercased() != ownDomain {
                return .reply(.atrnRefused(domain))
            }
            let names = domains.map { $0.lowercased() }
            var waiting = 0
            for domain in names { waiting += try await queue.waitingCount(domain: domain) }
            logger.info("ATRN", metadata: ["client": "\(session.clientAddress)", "user": "\(user)", "waiting": "\(waiting)"])
            guard waiting > 0 else { return .reply(.noMail) }
            guard let turnaround else { return .reply(.atrnUnavailable) }
            return .turnAround(.atrnAccepted) { channel in
                await turnaround.deliver(domains: names, over: channel)
            }
        } catch {
            logger.error("ATRN failed", metadata: ["error": "\(error)"])
            return .reply(.atrnUnavailable)
        }
    }
}

private func byteHex(_ byte: UInt8) -> String {
    let digits = Array("0123456789abcdef")
    return String([digits[Int(byte >> 4)], digits[Int(byte & 0x0F)]])
}

/// ATRN (RFC 2645, On-Demand Mail Relay): delivers the mail queued for `domains` as the client
/// on a connection whose peer has just become the server, then closes it.
public protocol ATRNDeliverer: Sendable {
    func deliver(domains: [String], over channel: any Channel) async
}
