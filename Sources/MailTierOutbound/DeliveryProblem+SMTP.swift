import MailTier
import SMTPNIO
import SMTPProtocol

// How an SMTP peer's answers become delivery outcomes, for every outbound path (MX or relay
// through SMTPRemoteTransport, and an ATRN turnaround).

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
