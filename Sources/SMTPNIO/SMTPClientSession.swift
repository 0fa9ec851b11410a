import NIOCore
import NIOSSL
import SMTPProtocol

/// Whether the client uses STARTTLS (RFC 3207).
public enum SMTPClientTLSPolicy: Sendable {
    /// Never.
    case none
    /// When the server offers it (RFC 7435 opportunistic security: `context` normally verifies
    /// no certificate). A server that does not offer it, or refuses it, gets plaintext.
    case opportunistic(NIOSSLContext)
    /// Always: no STARTTLS offered, refused or failed fails the session (`.tlsRequired`).
    case required(NIOSSLContext)
}

/// One message for one server: the envelope and the content as it is to arrive.
public struct SMTPClientTransaction: Sendable {
    /// The reverse path without angle brackets; empty for `<>`.
    public var mailFrom: String
    public var recipients: [String]
    /// The message as it is to arrive (not dot-stuffed).
    public var content: ByteBuffer
    /// The envelope or headers need SMTPUTF8 (RFC 6531).
    public var smtputf8: Bool
    /// `7BIT`, `8BITMIME`, `BINARYMIME` or nil.
    public var bodyType: String?

    public init(mailFrom: String, recipients: [String], content: ByteBuffer, smtputf8: Bool = false, bodyType: String? = nil) {
        self.mailFrom = mailFrom
        self.recipients = recipients
        self.content = content
        self.smtputf8 = smtputf8
        self.bodyType = bodyType
    }
}

/// What became of a transaction at the server.
public enum SMTPTransactionResult: Sendable, Hashable {
    /// Not sent: the server lacks what the message needs (SMTPUTF8, size, BINARYMIME).
    case refused(SMTPTransactionPlan.Refusal)
    /// For each recipient, the reply that decided it: the RCPT reply when it refused the
    /// recipient, the MAIL reply when that refused the whole transaction, otherwise the reply
    /// to the content. Positive means accepted.
    case replies([SMTPReply])
}

/// An SMTP client session (RFC 5321 §3): greeting, EHLO (HELO when EHLO is refused with 5xx),
/// STARTTLS by policy, then any number of transactions, RSET between them, and QUIT.
///
/// Not safe for concurrent use: one transaction at a time (a pool hands a session to one user).
public final class SMTPClientSession: Sendable {
    public let connection: SMTPClientConnection
    /// The EHLO capabilities; nil after HELO.
    public let capabilities: SMTPCapabilities?
    /// True when STARTTLS succeeded.
    public let isTLS: Bool
    /// The server's greeting.
    public let greeting: SMTPReply
    public let timeouts: SMTPClientTimeouts

    private init(
        connection: SMTPClientConnection, capabilities: SMTPCapabilities?, isTLS: Bool, greeting: SMTPReply,
        timeouts: SMTPClientTimeouts
    ) {
        self.connection = connection
        self.capabilities = capabilities
        self.isTLS = isTLS
        self.greeting = greeting
        self.timeouts = timeouts
    }

    /// Reads the greeting, says EHLO as `hostname`, and runs STARTTLS as `tls` asks. On any
    /// error the connection is closed.
    public static func start(
        on connection: SMTPClientConnection, hostname: String, serverName: String?, tls: SMTPClientTLSPolicy,
        timeouts: SMTPClientTimeouts
    ) async throws(SMTPClientError) -> SMTPClientSession {
        do throws(SMTPClientError) {
            let greeting = try await connection.readReply(timeout: timeouts.greeting, waitingFor: "the greeting")
            guard greeting.code == 220 else {
                throw SMTPClientError(.rejected(greeting), "greeting refused: \(greeting.summary)")
            }
            var capabilities = try await hello(connection, hostname: hostname, timeouts: timeouts)
            var isTLS = false
            switch tls {
            case .none:
                break
            case .opportunistic(let context), .required(let context):
                let required = if case .required = tls { true } else { false }
                guard capabilities?.startTLS == true else {
                    if required { throw SMTPClientError(.tlsRequired, "TLS is required and the server does not offer STARTTLS") }
                    break
                }
                let reply = try await connection.send(.startTLS, timeout: timeouts.command)
                guard reply.code == 220 else {
                    if required { throw SMTPClientError(.tlsRequired, "TLS is required and the server refused STARTTLS: \(reply.summary)") }
                    break
                }
                do {
                    try await connection.startTLS(context: context, serverHostname: serverName, timeout: timeouts.command)
                } catch {
                    throw required ? SMTPClientError(.tlsRequired, "TLS is required and \(error.description)") : error
                }
                isTLS = true
                // RFC 3207 §4.2: forget everything learnt before TLS and ask again.
                capabilities = try await hello(connection, hostname: hostname, timeouts: timeouts)
            }
            return SMTPClientSession(
                connection: connection, capabilities: capabilities, isTLS: isTLS, greeting: greeting, timeouts: timeouts)
        } catch {
            await connection.close()
            throw error
        }
    }

    /// EHLO, or HELO when EHLO is refused with 5xx (RFC 5321 §3.2). Nil capabilities after HELO.
    private static func hello(
        _ connection: SMTPClientConnection, hostname: String, timeouts: SMTPClientTimeouts
    ) async throws(SMTPClientError) -> SMTPCapabilities? {
        let ehlo = try await connection.send(.ehlo(hostname), timeout: timeouts.command)
        if ehlo.code == 250 { return SMTPCapabilities(ehloReply: ehlo) }
        guard ehlo.isPermanent else { throw SMTPClientError(.rejected(ehlo), "EHLO refused: \(ehlo.summary)") }
        let helo = try await connection.send(.helo(hostname), timeout: timeouts.command)
        guard helo.code == 250 else { throw SMTPClientError(.rejected(helo), "HELO refused: \(helo.summary)") }
        return nil
    }

    /// Sends one message to its recipients in one transaction. Throws only when the connection
    /// failed (then nothing was delivered and the session is unusable); refusals by the server
    /// are in the result.
    public func send(_ transaction: SMTPClientTransaction) async throws(SMTPClientError) -> SMTPTransactionResult {
        guard !transaction.recipients.isEmpty else { return .replies([]) }
        let plan: SMTPTransactionPlan
        switch SMTPTransactionPlan.make(
            capabilities: capabilities, size: transaction.content.readableBytes, smtputf8: transaction.smtputf8,
            body: transaction.bodyType)
        {
        case .failure(let refusal): return .refused(refusal)
        case .success(let made): plan = made
        }
        let mail = SMTPClientCommand.mail(from: transaction.mailFrom, parameters: plan.mailParameters)
        let rcpts = transaction.recipients.map { SMTPClientCommand.rcpt(to: $0) }
        // MAIL, RCPTs (and DATA) in one flush when PIPELINING is offered (RFC 2920 §3.1).
        var envelope: [(command: SMTPClientCommand, timeout: TimeAmount)] = [(mail, timeouts.mail)]
        envelope += rcpts.map { ($0, timeouts.rcpt) }
        if plan.pipelining && !plan.chunking { envelope.append((.data, timeouts.dataInitiation)) }
        var replies: [SMTPReply]
        if plan.pipelining {
            replies = try await connection.send(envelope)
        } else {
            replies = [try await connection.send(mail, timeout: timeouts.mail)]
            guard replies[0].isPositive else { return .replies(transaction.recipients.map { _ in replies[0] }) }
            for rcpt in rcpts { replies.append(try await connection.send(rcpt, timeout: timeouts.rcpt)) }
        }
        let mailReply = replies[0]
        let rcptReplies = Array(replies[1...transaction.recipients.count])
        guard mailReply.isPositive else {
            // A 354 to a pipelined DATA after a refused MAIL would take our content: end it empty.
            if plan.pipelining && !plan.chunking, replies.last?.code == 354 { _ = try await endEmptyData() }
            return .replies(transaction.recipients.map { _ in mailReply })
        }
        let accepted = rcptReplies.contains(where: \.isPositive)
        let contentReply: SMTPReply?
        if plan.chunking {
            contentReply = accepted ? try await sendChunk(transaction.content) : nil
        } else {
            let dataReply = plan.pipelining ? replies[replies.count - 1] : (accepted ? try await connection.send(.data, timeout: timeouts.dataInitiation) : nil)
            if let dataReply, dataReply.code == 354 {
                // RFC 2920 §3.1: DATA accepted with no recipient: send only the dot.
                contentReply = accepted ? try await sendData(transaction.content) : try await endEmptyData()
            } else {
                contentReply = dataReply
            }
        }
        return .replies(zip(transaction.recipients.indices, rcptReplies).map { _, rcpt in
            guard rcpt.isPositive, let contentReply else { return rcpt }
            return contentReply
        })
    }

    private func sendData(_ content: ByteBuffer) async throws(SMTPClientError) -> SMTPReply {
        try await connection.write(DotStuffing.encode(content), timeout: timeouts.dataBlock)
        return try await connection.readReply(timeout: timeouts.finalDot, waitingFor: "the end of the data")
    }

    private func endEmptyData() async throws(SMTPClientError) -> SMTPReply {
        try await connection.write(ByteBuffer(string: ".\r\n"), timeout: timeouts.dataBlock)
        return try await connection.readReply(timeout: timeouts.finalDot, waitingFor: "the end of the data")
    }

    /// The whole content as one `BDAT n LAST` chunk (RFC 3030 §2): no dot-stuffing.
    private func sendChunk(_ content: ByteBuffer) async throws(SMTPClientError) -> SMTPReply {
        let command = SMTPClientCommand.bdat(size: content.readableBytes, last: true)
        var buffer = connection.channel.allocator.buffer(capacity: content.readableBytes + 32)
        command.write(into: &buffer)
        buffer.writeImmutableBuffer(content)
        try await connection.write(buffer, timeout: timeouts.dataBlock)
        return try await connection.readReply(timeout: timeouts.finalDot, waitingFor: "BDAT LAST")
    }

    /// RSET (RFC 5321 §4.1.1.5): before the next transaction on a reused connection; also the
    /// check that a pooled connection still works. True when the server answered 250.
    public func reset() async -> Bool {
        (try? await connection.send(.rset, timeout: timeouts.command))?.code == 250
    }

    /// QUIT and close (errors are ignored: the session is over either way).
    public func quit() async {
        _ = try? await connection.send(.quit, timeout: .seconds(10))
        await connection.close()
    }
}
