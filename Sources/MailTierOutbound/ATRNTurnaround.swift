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
