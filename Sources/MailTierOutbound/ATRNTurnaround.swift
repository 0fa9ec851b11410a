import Logging
import MailTier
import NIOCore
import SMTPNIO
import SMTPProtocol

/// ATRN (RFC 2645, On-Demand Mail Relay): after our 250 the peer greets as the server, and we
/// deliver the mail waiting for its domains as an SMTP client on the same connection (TLS, when
/// the session had it, stays), then QUIT.
///
/// Delivery goes through `DeliveryService.deliverWaiting`, so claims, leases, retries, bounces and
/// events are those of any other delivery: a recipient the peer refuses with 4xx is retried later
/// (by the next ATRN or ETRN, or the regular schedule), one refused with 5xx fails and bounces.
public struct ATRNTurnaround: ATRNDeliverer {
    private let delivery: DeliveryService
    private let hostname: String
    private let timeouts: SMTPClientTimeouts
    private let logger: Logger

    /// `hostname`: our EHLO name.
    public init(delivery: DeliveryService, hostname: String, timeouts: SMTPClientTimeouts = SMTPClientTimeouts(), logger: Logger) {
        self.delivery = delivery
        self.hostname = hostname
        self.timeouts = timeouts
        self.logger = logger
    }

    public func deliver(domains: [String], over channel: any Channel) async {
        let peer = channel.remoteAddress?.ipAddress ?? "ATRN client"
        var logger = self.logger
        logger[metadataKey: "atrn"] = "\(domains.joined(separator: ","))"
        do {
            let connection = try await SMTPClientConnection.attach(to: channel)
            // The server handler left reading paused: the peer's greeting waits for the client.
            try await channel.setOption(.autoRead, value: true)
            let session = try await SMTPClientSession.start(
                on: connection, hostname: hostname, serverName: nil, tls: .none, timeouts: timeouts)
            let count = try await delivery.deliverWaiting(domains: domains, through: SessionTransport(session: session, peer: peer))
            logger.info("ATRN: queue delivered", metadata: ["jobs": "\(count)"])
            await session.quit()
        } catch {
            logger.warning("ATRN: delivery over the turned-around connection failed", metadata: ["error": "\(error)"])
        }
        try? await channel.close()
    }
}

/// A `RemoteTransport` over one session that is already open (the turned-around connection):
/// one transaction at a time, in the order asked (delivery runs message groups concurrently).
struct SessionTransport: RemoteTransport {
    let session: SMTPClientSession
    /// How the peer is named in `Remote-MTA` and logs.
    let peer: String
    private let turnstile = Turnstile()

    init(session: SMTPClientSession, peer: String) {
        self.session = session
        self.peer = peer
    }

    func deliver(_ message: ByteBuffer, jobs: [DeliveryJob]) async -> [DeliveryProblem?] {
        await turnstile.enter()
        let problems = await send(message, jobs: jobs)
        await turnstile.leave()
        return problems
    }

    private func send(_ message: ByteBuffer, jobs: [DeliveryJob]) async -> [DeliveryProblem?] {
        guard let first = jobs.first else { return [] }
        let transaction = SMTPClientTransaction(
            mailFrom: first.mailFrom, recipients: jobs.map(\.recipient), content: message, smtputf8: first.smtputf8,
            bodyType: first.bodyType)
        do {
            return try await session.send(transaction).problems(count: jobs.count, peer: peer)
        } catch {
            return jobs.map { _ in DeliveryProblem(error, peer: peer) }
        }
    }
}

/// Lets one caller through at a time, the others in arrival order.
private actor Turnstile {
    private var busy = false
    private var waiters: [CheckedContinuation<Void, Never>] = []

    func enter() async {
        guard busy else {
            busy = true
            return
        }
        await withCheckedContinuation { waiters.append($0) }
    }

    /// Hands the turn to the next waiter (still busy), or frees it.
    func leave() {
        if waiters.isEmpty { busy = false } else { waiters.removeFirst().resume() }
    }
}

extension SMTPTransactionResult {
    /// One entry per recipient: nil for an accepted one, otherwise why not.
    func problems(count: Int, peer: String) -> [DeliveryProblem?] {
        switch self {
        case .refused(let refusal):
            let problem = DeliveryProblem(
                isPermanent: refusal.status.klass == 5, status: refusal.status.description,
                message: "\(peer): \(refusal.description)", remoteMTA: "dns; \(peer)")
            return Array(repeating: problem, count: count)
        case .replies(let replies):
            return replies.map { reply in reply.isPositive ? nil : DeliveryProblem(reply, peer: peer) }
        }
    }
}

extension DeliveryProblem {
    /// A refusal from the server: 5xx permanent, 4xx temporary, its own enhanced code.
    init(_ reply: SMTPReply, peer: String) {
        self.init(
            isPermanent: reply.isPermanent, status: reply.status.description, message: "\(peer) said: \(reply.summary)",
            diagnostic: "smtp; \(reply.summary)", remoteMTA: "dns; \(peer)")
    }

    /// A connection that failed: connect 4.4.1, lost or timed out 4.4.2, TLS 4.7.0, the
    /// greeting's or EHLO's own reply otherwise.
    init(_ error: SMTPClientError, peer: String) {
        let status: String
        switch error.kind {
        case .rejected(let reply):
            self.init(reply, peer: peer)
            return
        case .connect: status = "4.4.1"
        case .timeout, .connectionLost: status = "4.4.2"
        case .protocolViolation: status = "4.5.0"
        case .tls, .tlsRequired: status = "4.7.0"
        }
        self.init(isPermanent: false, status: status, message: "\(peer): \(error.description)", remoteMTA: "dns; \(peer)")
    }
}
