import NIOCore
import Testing

@testable import SMTPProtocol

private func line(_ text: String) -> ByteBuffer { ByteBuffer(string: text) }
private func send(_ replies: SMTPReply...) -> SMTPServerStateMachine.Action { .send(replies, thenClose: false) }

private func machine(
    tls: Bool = false, auth: Bool = false, maxSize: Int = 1000, maxRecipients: Int = 2
) -> SMTPServerStateMachine {
    SMTPServerStateMachine(
        configuration: .init(
            hostname: "mx.example", maxMessageSize: maxSize, maxRecipients: maxRecipients, tlsAvailable: tls,
            authRequired: auth, deliverByMinimum: 86400))
}

private let alice = Mailbox(localPart: "alice", domain: "example.test")
private let bob = Mailbox(localPart: "bob", domain: "example.org")

@Suite("SMTP server state machine")
struct SMTPServerStateMachineTests {
    @Test func greetingAndEHLO() {
        var m = machine()
        #expect(m.connectionEstablished() == send(.greeting("mx.example")))
        #expect(m.framingMode == .line(maxLength: 12_288))
        #expect(
            m.lineReceived(line("EHLO client.example"))
                == send(
                    SMTPReply(
                        250, nil,
                        [
                            "mx.example", "PIPELINING", "SIZE 1000", "ETRN", "AUTH PLAIN LOGIN", "ENHANCEDSTATUSCODES",
                            "8BITMIME", "SMTPUTF8", "CHUNKING", "DELIVERBY 86400", "ATRN",
                        ])))
        #expect(m.lineReceived(line("HELO client.example")) == send(SMTPReply(250, nil, "mx.example")))
    }

    @Test("with TLS: STARTTLS before, AUTH only after")
    func ehloWithTLS() {
        var m = machine(tls: true)
        guard case .send(let replies, _) = m.lineReceived(line("EHLO c.example")) else { Issue.record(); return }
        #expect(replies[0].lines.contains("STARTTLS"))
        #expect(!replies[0].lines.contains("AUTH PLAIN LOGIN"))
        #expect(m.lineReceived(line("AUTH PLAIN AHVAcA==")) == send(.encryptionRequired))
        #expect(m.lineReceived(line("STARTTLS")) == .startTLS(.readyToStartTLS))
        m.tlsEstablished()
        #expect(m.lineReceived(line("MAIL FROM:<a@b.example>")) == send(.sendHELOFirst))
        guard case .send(let after, _) = m.lineReceived(line("EHLO c.example")) else { Issue.record(); return }
        #expect(!after[0].lines.contains("STARTTLS"))
        #expect(after[0].lines.contains("AUTH PLAIN LOGIN"))
        #expect(m.lineReceived(line("STARTTLS")) == send(.tlsAlreadyActive))
    }

    @Test func startTLSWithoutTLS() {
        var m = machine()
        #expect(m.lineReceived(line("STARTTLS")) == send(.tlsNotAvailable))
    }

    @Test("a whole transaction, DATA")
    func transaction() {
        var m = machine()
        _ = m.lineReceived(line("EHLO client.example"))
        #expect(m.lineReceived(line("MAIL FROM:<bob@example.org> BODY=8BITMIME")) == send(.senderOk))
        let envelope = Envelope(
            reversePath: .mailbox(bob), recipients: [], parameters: MailParameters(body: .eightBitMIME),
            heloName: "client.example", usedEHLO: true, authenticatedUser: nil, tlsActive: false, chunked: false)
        #expect(m.lineReceived(line("RCPT TO:<alice@example.test>")) == .checkRecipient(.mailbox(alice), envelope))
        #expect(m.framingMode == .paused)
        #expect(m.isInTransaction)
        #expect(m.recipientChecked(rejection: nil) == send(.recipientOk))
        #expect(m.lineReceived(line("RCPT TO:<alice@example.test>")) == send(.recipientOk), "duplicate: accepted once")
        #expect(m.lineReceived(line("DATA")) == send(.startMailInput))
        #expect(m.framingMode == .data(maxSize: 1000))
        var full = envelope
        full.recipients = [.mailbox(alice)]
        #expect(m.dataSectionReceived(DataSection(content: line("Hi\r\n"))) == .deliver(full, line("Hi\r\n")))
        #expect(m.framingMode == .paused)
        #expect(m.deliveryCompleted(queueID: "msg_1") == send(.queued("msg_1")))
        #expect(!m.isInTransaction)
        #expect(m.lineReceived(line("RCPT TO:<alice@example.test>")) == send(.needMail))
    }

    @Test("sequence errors")
    func sequence() {
        var m = machine()
        #expect(m.lineReceived(line("MAIL FROM:<a@b.example>")) == send(.sendHELOFirst))
        #expect(m.lineReceived(line("AUTH PLAIN")) == send(.sendEHLOFirst))
        #expect(m.lineReceived(line("ETRN b.example")) == send(.sendHELOFirst))
        _ = m.lineReceived(line("HELO c.example"))
        #expect(m.lineReceived(line("RCPT TO:<a@b.example>")) == send(.needMail))
        #expect(m.lineReceived(line("DATA")) == send(.needMail))
        #expect(m.lineReceived(line("MAIL FROM:<a@b.example>")) == send(.senderOk))
        #expect(m.lineReceived(line("MAIL FROM:<a@b.example>")) == send(.senderAlreadySpecified))
        #expect(m.lineReceived(line("DATA")) == send(.noValidRecipients))
        #expect(m.lineReceived(line("ETRN b.example")) == send(.etrnDuringTransaction))
        #expect(m.lineReceived(line("RSET")) == send(.ok))
        #expect(m.lineReceived(line("MAIL FROM:<a@b.example>")) == send(.senderOk), "RSET ended the transaction")
        #expect(m.lineReceived(line("NOOP")) == send(.ok))
        #expect(m.lineReceived(line("VRFY x")) == send(.vrfy))
        #expect(m.lineReceived(line("EXPN x")) == send(.notImplemented))
        #expect(m.lineReceived(line("QUIT")) == .send([.bye], thenClose: true))
        #expect(m.framingMode == .closed)
    }

    static let mailParameterCases: [(String, SMTPReply)] = [
        ("MAIL FROM:<a@b.example> SIZE=1000", .senderOk),
        ("MAIL FROM:<a@b.example> SIZE=1001", .messageTooBig),
        ("MAIL FROM:<a@b.example> SIZE=x", .invalidParameter("SIZE")),
        ("MAIL FROM:<a@b.example> BODY=7BIT", .senderOk),
        ("MAIL FROM:<a@b.example> BODY=BINARYMIME", .invalidParameter("BODY")),
        ("MAIL FROM:<a@b.example> SMTPUTF8=yes", .invalidParameter("SMTPUTF8")),
        ("MAIL FROM:<a@b.example> BY=86400;R", .senderOk),
        ("MAIL FROM:<a@b.example> BY=3600;R", .deliverByBelowMinimum(86400)),
        ("MAIL FROM:<a@b.example> BY=3600;N", .senderOk),
        ("MAIL FROM:<a@b.example> BY=abc;R", .invalidParameter("BY")),
        ("MAIL FROM:<a@b.example> AUTH=<>", .senderOk),
        ("MAIL FROM:<a@b.example> RET=FULL", .unsupportedParameter("RET")),
        ("MAIL FROM:<a@b.example> ENVID=x", .unsupportedParameter("ENVID")),
        ("MAIL FROM:<用户@例え.jp>", .smtputf8Required),
        ("MAIL FROM:<用户@例え.jp> SMTPUTF8", .senderOk),
        ("MAIL FROM:<a@b.example> XFOO", .unsupportedParameter("XFOO")),
    ]

    @Test("MAIL parameters", arguments: mailParameterCases)
    func mailParameters(command: String, reply: SMTPReply) {
        var m = machine()
        _ = m.lineReceived(line("EHLO c.example"))
        #expect(m.lineReceived(line(command)) == send(reply))
    }

    @Test("RCPT rules")
    func rcptRules() {
        var m = machine(maxRecipients: 2)
        _ = m.lineReceived(line("EHLO c.example"))
        _ = m.lineReceived(line("MAIL FROM:<a@b.example>"))
        #expect(m.lineReceived(line("RCPT TO:<x@y.example> NOTIFY=NEVER")) == send(.unsupportedParameter("NOTIFY")))
        #expect(m.lineReceived(line("RCPT TO:<用户@例え.jp>")) == send(.smtputf8Required))
        guard case .checkRecipient = m.lineReceived(line("RCPT TO:<x@y.example>")) else { Issue.record(); return }
        #expect(m.recipientChecked(rejection: .relayDenied("x@y.example")) == send(.relayDenied("x@y.example")))
        for address in ["p@y.example", "q@y.example"] {
            guard case .checkRecipient = m.lineReceived(line("RCPT TO:<\(address)>")) else { Issue.record(); return }
            #expect(m.recipientChecked(rejection: nil) == send(.recipientOk))
        }
        #expect(m.lineReceived(line("RCPT TO:<r@y.example>")) == send(.tooManyRecipients))
    }

    @Test("AUTH required, PLAIN with initial response")
    func authPlain() {
        var m = machine(auth: true)
        _ = m.lineReceived(line("EHLO c.example"))
        #expect(m.lineReceived(line("MAIL FROM:<a@b.example>")) == send(.authenticationRequired))
        #expect(m.lineReceived(line("ATRN b.example")) == send(.authenticationRequired))
        let response = Base64.encode(Array("\0alice\0s3cret".utf8))
        #expect(m.lineReceived(line("AUTH PLAIN \(response)")) == .authenticate(login: "alice", password: "s3cret"))
        #expect(m.framingMode == .paused)
        #expect(m.authenticationCompleted(user: nil) == send(.authFailed))
        #expect(m.lineReceived(line("AUTH PLAIN \(response)")) == .authenticate(login: "alice", password: "s3cret"))
        #expect(m.authenticationCompleted(user: "alice") == send(.authSucceeded))
        #expect(m.authenticatedUser == "alice")
        #expect(m.lineReceived(line("AUTH PLAIN \(response)")) == send(.alreadyAuthenticated))
        #expect(m.lineReceived(line("MAIL FROM:<a@b.example>")) == send(.senderOk))
        #expect(m.lineReceived(line("AUTH PLAIN \(response)")) == send(.authDuringTransaction))
    }

    @Test("AUTH PLAIN continuation, LOGIN, cancel, bad data")
    func authExchanges() {
        var m = machine()
        _ = m.lineReceived(line("EHLO c.example"))
        #expect(m.lineReceived(line("AUTH PLAIN")) == send(.authChallenge("")))
        #expect(m.lineReceived(line(Base64.encode(Array("alice\0alice\0pw".utf8)))) == .authenticate(login: "alice", password: "pw"))
        _ = m.authenticationCompleted(user: nil)
        #expect(m.lineReceived(line("AUTH PLAIN")) == send(.authChallenge("")))
        #expect(m.lineReceived(line("*")) == send(.authCancelled))
        #expect(m.lineReceived(line("AUTH PLAIN not-base64!")) == send(.invalidAuthData))
        #expect(m.lineReceived(line("AUTH PLAIN \(Base64.encode(Array("bob\0alice\0pw".utf8)))")) == send(.invalidAuthData), "authzid ≠ authcid")
        #expect(m.lineReceived(line("AUTH CRAM-MD5")) == send(.unknownMechanism))
        #expect(m.lineReceived(line("AUTH LOGIN")) == send(.authChallenge("VXNlcm5hbWU6")))
        #expect(m.lineReceived(line(Base64.encode(Array("alice".utf8)))) == send(.authChallenge("UGFzc3dvcmQ6")))
        #expect(m.lineReceived(line(Base64.encode(Array("pw".utf8)))) == .authenticate(login: "alice", password: "pw"))
        #expect(m.authenticationCompleted(user: "alice") == send(.authSucceeded))
    }

    @Test("AUTH LOGIN with initial response; temporary failure")
    func authLoginInitial() {
        var m = machine()
        _ = m.lineReceived(line("EHLO c.example"))
        #expect(m.lineReceived(line("AUTH LOGIN \(Base64.encode(Array("alice".utf8)))")) == send(.authChallenge("UGFzc3dvcmQ6")))
        #expect(m.lineReceived(line(Base64.encode(Array("pw".utf8)))) == .authenticate(login: "alice", password: "pw"))
        #expect(m.authenticationFailedTemporarily() == send(.authTemporaryFailure))
    }

    @Test("BDAT chunks")
    func bdat() {
        var m = machine()
        _ = m.lineReceived(line("EHLO c.example"))
        #expect(m.lineReceived(line("BDAT 3")) == .none)
        #expect(m.framingMode == .chunk(size: 3, discard: true))
        #expect(m.chunkReceived(ByteBuffer()) == send(.needMail))
        _ = m.lineReceived(line("MAIL FROM:<bob@example.org>"))
        _ = m.lineReceived(line("RCPT TO:<alice@example.test>"))
        _ = m.recipientChecked(rejection: nil)
        #expect(m.lineReceived(line("BDAT 5")) == .none)
        #expect(m.framingMode == .chunk(size: 5, discard: false))
        #expect(m.chunkReceived(line("Hello")) == send(.chunkReceived(5)))
        #expect(m.lineReceived(line("DATA")) == send(.dataAfterBDAT))
        #expect(m.lineReceived(line("BDAT 6 LAST")) == .none)
        guard case .deliver(let envelope, let content) = m.chunkReceived(line(" world")) else { Issue.record(); return }
        #expect(envelope.chunked)
        #expect(content == line("Hello world"))
        #expect(m.deliveryCompleted(queueID: "msg_2") == send(.queued("msg_2")))
    }

    @Test("BDAT over the size limit is read, discarded and refused")
    func bdatTooBig() {
        var m = machine(maxSize: 10)
        _ = m.lineReceived(line("EHLO c.example"))
        _ = m.lineReceived(line("MAIL FROM:<bob@example.org>"))
        _ = m.lineReceived(line("RCPT TO:<alice@example.test>"))
        _ = m.recipientChecked(rejection: nil)
        _ = m.lineReceived(line("BDAT 11 LAST"))
        #expect(m.framingMode == .chunk(size: 11, discard: true))
        #expect(m.chunkReceived(ByteBuffer()) == send(.messageTooBig))
        #expect(m.lineReceived(line("RCPT TO:<alice@example.test>")) == send(.needMail), "transaction ended")
    }

    @Test("DATA content problems refuse the whole message", arguments: [
        (DataSection(content: ByteBuffer(), exceededSize: true), SMTPReply.messageTooBig),
        (DataSection(content: ByteBuffer(), hadBareCROrLF: true), SMTPReply.bareCROrLF),
        (DataSection(content: ByteBuffer(), hadLongLine: true), SMTPReply.lineTooLong),
    ])
    func dataProblems(section: DataSection, reply: SMTPReply) {
        var m = machine()
        _ = m.lineReceived(line("EHLO c.example"))
        _ = m.lineReceived(line("MAIL FROM:<bob@example.org>"))
        _ = m.lineReceived(line("RCPT TO:<alice@example.test>"))
        _ = m.recipientChecked(rejection: nil)
        _ = m.lineReceived(line("DATA"))
        #expect(m.dataSectionReceived(section) == send(reply))
        #expect(m.lineReceived(line("MAIL FROM:<bob@example.org>")) == send(.senderOk))
    }

    @Test("over-long command lines; AUTH may be longer")
    func longLines() {
        var m = machine()
        _ = m.lineReceived(line("EHLO c.example"))
        #expect(m.lineReceived(line("NOOP " + String(repeating: "x", count: 506))) == send(.lineTooLong))
        #expect(m.lineReceived(line("NOOP " + String(repeating: "x", count: 505))) == send(.ok))
        #expect(m.lineTooLongReceived() == send(.lineTooLong))
        #expect(m.bareLineFeedReceived() == send(.bareLineFeed))
        let longAuth = "AUTH PLAIN " + Base64.encode(Array(("\0alice\0" + String(repeating: "p", count: 600)).utf8))
        guard case .authenticate = m.lineReceived(line(longAuth)) else { Issue.record(); return }
    }

    @Test("graceful shutdown: idle sessions now, transactions after they finish")
    func shutdown() {
        var idle = machine()
        _ = idle.lineReceived(line("EHLO c.example"))
        #expect(idle.shutdownWasRequested() == .send([.shuttingDown("mx.example")], thenClose: true))

        var busy = machine()
        _ = busy.lineReceived(line("EHLO c.example"))
        _ = busy.lineReceived(line("MAIL FROM:<bob@example.org>"))
        _ = busy.lineReceived(line("RCPT TO:<alice@example.test>"))
        _ = busy.recipientChecked(rejection: nil)
        _ = busy.lineReceived(line("DATA"))
        #expect(busy.shutdownWasRequested() == .none)
        _ = busy.dataSectionReceived(DataSection(content: line("x\r\n")))
        #expect(busy.deliveryCompleted(queueID: "msg_3") == .send([.queued("msg_3"), .shuttingDown("mx.example")], thenClose: true))
    }

    @Test("idle timeout, but not while waiting for the system")
    func idleTimeout() {
        var m = machine()
        _ = m.lineReceived(line("EHLO c.example"))
        _ = m.lineReceived(line("MAIL FROM:<bob@example.org>"))
        _ = m.lineReceived(line("RCPT TO:<alice@example.test>"))
        #expect(m.idleTimeoutReached() == .none)
        _ = m.recipientChecked(rejection: nil)
        #expect(m.idleTimeoutReached() == .send([.timeout("mx.example")], thenClose: true))
    }

    @Test("ETRN and ATRN")
    func queueCommands() {
        var m = machine()
        _ = m.lineReceived(line("EHLO c.example"))
        #expect(m.lineReceived(line("ETRN @b.example")) == .etrn("b.example"))
        #expect(m.etrnCompleted(.queuingStarted("b.example")) == send(.queuingStarted("b.example")))
        _ = m.lineReceived(line("AUTH PLAIN \(Base64.encode(Array("\0alice\0pw".utf8)))"))
        _ = m.authenticationCompleted(user: "alice")
        #expect(m.lineReceived(line("ATRN a.example,b.example")) == .atrn(domains: ["a.example", "b.example"], user: "alice"))
        #expect(m.atrnCompleted(.noMail) == send(.noMail))
    }
}
