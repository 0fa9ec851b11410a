import NIOCore
import Testing

@testable import SMTPProtocol

@Suite("SMTP command grammar")
struct SMTPCommandTests {
    static func mailbox(_ local: String, _ domain: String) -> Mailbox { Mailbox(localPart: local, domain: domain) }

    static let valid: [(String, SMTPCommand)] = [
        ("HELO client.example", .helo("client.example")),
        ("helo client.example", .helo("client.example")),
        ("EHLO client.example", .ehlo("client.example")),
        ("EHLO [192.0.2.1]", .ehlo("[192.0.2.1]")),
        ("EHLO 例え.jp", .ehlo("例え.jp")),
        ("MAIL FROM:<a@b.example>", .mail(.mailbox(mailbox("a", "b.example")), [])),
        ("mail from:<a@b.example>", .mail(.mailbox(mailbox("a", "b.example")), [])),
        ("MAIL FROM: <a@b.example>", .mail(.mailbox(mailbox("a", "b.example")), [])),
        ("MAIL FROM:<>", .mail(.null, [])),
        ("MAIL FROM:<@relay.example:a@b.example>", .mail(.mailbox(mailbox("a", "b.example")), [])),
        ("MAIL FROM:<\"john doe\"@b.example>", .mail(.mailbox(mailbox("\"john doe\"", "b.example")), [])),
        ("MAIL FROM:<a@[192.0.2.1]>", .mail(.mailbox(mailbox("a", "[192.0.2.1]")), [])),
        ("MAIL FROM:<用户@例え.jp> SMTPUTF8", .mail(.mailbox(mailbox("用户", "例え.jp")), [.init("SMTPUTF8")])),
        (
            "MAIL FROM:<a@b.example> SIZE=1234 BODY=8BITMIME BY=3600;R",
            .mail(.mailbox(mailbox("a", "b.example")), [.init("SIZE", "1234"), .init("BODY", "8BITMIME"), .init("BY", "3600;R")])
        ),
        ("MAIL FROM:<a@b.example> size=1", .mail(.mailbox(mailbox("a", "b.example")), [.init("SIZE", "1")])),
        ("RCPT TO:<c@d.example>", .rcpt(.mailbox(mailbox("c", "d.example")), [])),
        ("RCPT TO:<Postmaster>", .rcpt(.postmaster, [])),
        ("RCPT TO:<c@d.example> NOTIFY=NEVER", .rcpt(.mailbox(mailbox("c", "d.example")), [.init("NOTIFY", "NEVER")])),
        ("DATA", .data),
        ("BDAT 1000", .bdat(size: 1000, last: false)),
        ("BDAT 0 LAST", .bdat(size: 0, last: true)),
        ("bdat 5 last", .bdat(size: 5, last: true)),
        ("RSET", .rset),
        ("NOOP", .noop),
        ("NOOP anything", .noop),
        ("QUIT", .quit),
        ("VRFY john", .vrfy("john")),
        ("HELP", .help(nil)),
        ("HELP MAIL", .help("MAIL")),
        ("STARTTLS", .startTLS),
        ("AUTH PLAIN", .auth(mechanism: "PLAIN", initialResponse: nil)),
        ("AUTH plain AHVzZXIAcGFzcw==", .auth(mechanism: "PLAIN", initialResponse: "AHVzZXIAcGFzcw==")),
        ("AUTH LOGIN", .auth(mechanism: "LOGIN", initialResponse: nil)),
        ("ETRN example.com", .etrn("example.com")),
        ("ETRN @example.com", .etrn("@example.com")),
        ("ATRN example.com", .atrn(["example.com"])),
        ("ATRN a.example,b.example", .atrn(["a.example", "b.example"])),
        ("EXPN list", .notImplemented("EXPN")),
        ("TURN", .notImplemented("TURN")),
    ]

    @Test("valid command lines", arguments: valid)
    func parsesValid(line: String, expected: SMTPCommand) throws {
        #expect(try SMTPCommand.parse(Array(line.utf8)).get() == expected)
    }

    static let invalid: [(String, SMTPReply)] = [
        ("", .commandNotRecognized),
        ("FOO", .commandNotRecognized),
        ("MAILFROM:<a@b>", .commandNotRecognized),
        ("HELO", .heloSyntax("HELO")),
        ("EHLO", .heloSyntax("EHLO")),
        ("EHLO bad_domain!", .heloSyntax("EHLO")),
        ("MAIL", .badSenderSyntax),
        ("MAIL TO:<a@b.example>", .badSenderSyntax),
        ("MAIL FROM:a@b.example", .badSenderSyntax),
        ("MAIL FROM:<a@b.example", .badSenderSyntax),
        ("MAIL FROM:<a@>", .badSenderSyntax),
        ("MAIL FROM:<@b.example>", .badSenderSyntax),
        ("MAIL FROM:<a..b@c.example>", .badSenderSyntax),
        ("MAIL FROM:<.a@c.example>", .badSenderSyntax),
        ("MAIL FROM:<a@-c.example>", .badSenderSyntax),
        ("MAIL FROM:<a@c..example>", .badSenderSyntax),
        ("MAIL FROM:<a b@c.example>", .badSenderSyntax),
        ("MAIL FROM:<a@b.example>SIZE=1", .badSenderSyntax),
        ("MAIL FROM:<a@b.example> SIZE=", .badSenderSyntax),
        ("MAIL FROM:<a@b.example> SIZE=1 SIZE=2", .badSenderSyntax),
        ("MAIL FROM:<a@b.example> =x", .badSenderSyntax),
        ("MAIL FROM:<\(String(repeating: "a", count: 65))@b.example>", .badSenderSyntax),
        ("RCPT TO:<>", .badRecipientSyntax),
        ("RCPT TO:c@d.example", .badRecipientSyntax),
        ("RCPT FROM:<c@d.example>", .badRecipientSyntax),
        ("DATA x", .noParametersAllowed),
        ("RSET x", .noParametersAllowed),
        ("QUIT now", .noParametersAllowed),
        ("STARTTLS x", .noParametersAllowed),
        ("VRFY", .vrfySyntax),
        ("AUTH", .authSyntax),
        ("AUTH PLAIN a b", .authSyntax),
        ("ETRN", .etrnSyntax),
        ("ETRN not a domain", .etrnSyntax),
        ("ATRN", .atrnSyntax),
        ("ATRN a.example,,b.example", .atrnSyntax),
        ("NOOP \u{7f}", .invalidCharacter),
        ("MAIL FROM:<a\rb@c.example>", .invalidCharacter),
    ]

    @Test("invalid command lines get the documented reply", arguments: invalid)
    func rejectsInvalid(line: String, reply: SMTPReply) {
        guard case .failure(let error) = SMTPCommand.parse(Array(line.utf8)) else {
            Issue.record("accepted \(line)")
            return
        }
        #expect(error.reply == reply)
        #expect(!error.mustClose)
    }

    @Test("a malformed BDAT closes the connection", arguments: ["BDAT", "BDAT x", "BDAT -1", "BDAT 1 FIRST", "BDAT 99999999999", "BDAT 1 LAST x"])
    func malformedBDAT(line: String) {
        guard case .failure(let error) = SMTPCommand.parse(Array(line.utf8)) else {
            Issue.record("accepted \(line)")
            return
        }
        #expect(error.reply == .bdatSyntax)
        #expect(error.mustClose)
    }

    @Test("non-ASCII addresses are parsed and flagged")
    func utf8Flag() throws {
        guard case .mail(.mailbox(let mailbox), _) = try SMTPCommand.parse(Array("MAIL FROM:<用户@例え.jp>".utf8)).get() else {
            Issue.record("not parsed")
            return
        }
        #expect(!mailbox.isASCII)
        #expect(Self.mailbox("a", "b.example").isASCII)
    }

    @Test("invalid UTF-8 in an address is refused")
    func invalidUTF8() {
        var line = Array("MAIL FROM:<".utf8)
        line += [0xC3, 0x28]
        line += Array("@b.example>".utf8)
        guard case .failure(let error) = SMTPCommand.parse(line) else {
            Issue.record("accepted invalid UTF-8")
            return
        }
        #expect(error.reply == .badSenderSyntax)
    }
}

@Suite("Replies and base64")
struct SMTPReplyTests {
    @Test func singleLine() {
        #expect(SMTPReply.senderOk.description == "250 2.1.0 Ok\r\n")
        #expect(SMTPReply.startMailInput.description == "354 End data with <CR><LF>.<CR><LF>\r\n")
        #expect(SMTPReply.authChallenge("").description == "334 \r\n")
        #expect(SMTPReply.greeting("mx.example").description == "220 mx.example ESMTP MailTier\r\n")
    }

    @Test func multiLine() {
        let reply = SMTPReply(250, nil, ["mx.example", "PIPELINING", "SIZE 10"])
        #expect(reply.description == "250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
        let enhanced = SMTPReply(550, .init(5, 1, 1), ["one", "two"])
        #expect(enhanced.description == "550-5.1.1 one\r\n550 5.1.1 two\r\n")
    }

    @Test("base64 round trip and strictness", arguments: ["", "f", "fo", "foo", "foob", "fooba", "foobar", "\0user\0pass"])
    func base64(text: String) {
        let encoded = Base64.encode(Array(text.utf8))
        #expect(Base64.decode(Array(encoded.utf8)) == Array(text.utf8))
    }

    @Test func base64Vectors() {
        #expect(Base64.encode(Array("foobar".utf8)) == "Zm9vYmFy")
        #expect(Base64.encode(Array("fo".utf8)) == "Zm8=")
        for bad in ["Zm9", "Zm9v YmFy", "Zm=v", "Zm9v====", "Z===", "Zm9*"] {
            #expect(Base64.decode(Array(bad.utf8)) == nil, "\(bad)")
        }
    }

    @Test("BY parameter", arguments: [
        ("3600;R", DeliverBy(seconds: 3600, mode: .returnMessage)),
        ("-10;N", DeliverBy(seconds: -10, mode: .notify)),
        ("60;rt", DeliverBy(seconds: 60, mode: .returnMessage, trace: true)),
    ])
    func deliverBy(value: String, expected: DeliverBy) {
        #expect(DeliverBy(parameterValue: value) == expected)
    }

    @Test("bad BY values", arguments: ["", "3600", "x;R", "3600;X", "3600;R;N", ";R", "9999999999;R"])
    func badDeliverBy(value: String) {
        #expect(DeliverBy(parameterValue: value) == nil)
    }
}
