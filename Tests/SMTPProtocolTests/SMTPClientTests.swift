import NIOCore
import Testing

@testable import SMTPProtocol

@Suite("SMTP client: replies, capabilities, commands, dot-stuffing, transaction plans")
struct SMTPClientTests {
    /// Feeds `lines` and returns every reply completed on the way.
    static func parse(_ lines: [String]) throws -> [SMTPReply] {
        var parser = SMTPReplyParser()
        var replies: [SMTPReply] = []
        for line in lines {
            if let reply = try parser.feed(line: line) { replies.append(reply) }
        }
        #expect(!parser.isInsideReply)
        return replies
    }

    static let replyFixtures: [([String], SMTPReply)] = [
        (["220 mx.example ESMTP"], SMTPReply(220, nil, "mx.example ESMTP")),
        (["250 2.1.0 Ok"], SMTPReply(250, .init(2, 1, 0), "Ok")),
        (["250"], SMTPReply(250, nil, "")),
        (["354 End data with <CR><LF>.<CR><LF>"], SMTPReply(354, nil, "End data with <CR><LF>.<CR><LF>")),
        (["550 5.1.1 <a@b>: no such user"], SMTPReply(550, .init(5, 1, 1), "<a@b>: no such user")),
        // An enhanced code of another class is text, not a status (RFC 3463 §2).
        (["451 5.1.1 odd"], SMTPReply(451, nil, "5.1.1 odd")),
        (["421 4.4.2 mx Timeout"], SMTPReply(421, .init(4, 4, 2), "mx Timeout")),
        (
            ["250-mx.example", "250-PIPELINING", "250-SIZE 10240000", "250 SMTPUTF8"],
            SMTPReply(250, nil, ["mx.example", "PIPELINING", "SIZE 10240000", "SMTPUTF8"])
        ),
        (
            ["550-5.7.1 first line", "550-5.7.1 second", "550 5.7.1 third"],
            SMTPReply(550, .init(5, 7, 1), ["first line", "second", "third"])
        ),
    ]

    @Test("replies parse, one or many lines", arguments: replyFixtures)
    func replies(lines: [String], expected: SMTPReply) throws {
        #expect(try Self.parse(lines) == [expected])
    }

    @Test("pipelined replies come out one by one, in order")
    func pipelinedReplies() throws {
        let replies = try Self.parse(["250 2.1.0 Ok", "250 2.1.5 Ok", "550 5.1.1 unknown", "354 go ahead"])
        #expect(replies.map(\.code) == [250, 250, 550, 354])
        #expect(replies[2].summary == "550 5.1.1 unknown")
    }

    @Test(
        "malformed replies are errors",
        arguments: [["hello"], ["25"], ["2500 x"], ["250x"], ["199 too low"], ["600 too high"], ["250-a", "251 b"], ["abc ok"]])
    func malformed(lines: [String]) {
        #expect(throws: SMTPReplyError.self) { _ = try Self.parse(lines) }
    }

    @Test("an endless reply line or multiline reply is refused")
    func bounded() {
        #expect(throws: SMTPReplyError.self) {
            var parser = SMTPReplyParser()
            _ = try parser.feed(line: "250 " + String(repeating: "x", count: SMTPReplyParser.maxLineLength))
        }
        #expect(throws: SMTPReplyError.self) {
            var parser = SMTPReplyParser()
            for _ in 0...SMTPReplyParser.maxLines { _ = try parser.feed(line: "250-X") }
        }
    }

    @Test("summary: one line, no control characters")
    func summary() {
        #expect(SMTPReply(550, .init(5, 1, 1), ["no such", "user"]).summary == "550 5.1.1 no such user")
        #expect(SMTPReply(421, nil, "bye\u{1}").summary == "421 bye?")
        #expect(SMTPReply(451, nil, "").summary == "451")
        #expect(SMTPReply(451, nil, "x").status == EnhancedStatusCode(4, 0, 0))
        #expect(SMTPReply(552, .init(5, 3, 4), "big").status == EnhancedStatusCode(5, 3, 4))
    }

    @Test("EHLO capabilities")
    func capabilities() {
        let reply = SMTPReply(
            250, nil,
            ["mx.example greets you", "PIPELINING", "size 1000", "STARTTLS", "8BITMIME", "SMTPUTF8", "CHUNKING", "AUTH PLAIN LOGIN"])
        let capabilities = SMTPCapabilities(ehloReply: reply)
        #expect(capabilities.pipelining && capabilities.startTLS && capabilities.eightBitMIME)
        #expect(capabilities.smtputf8 && capabilities.chunking && !capabilities.binaryMIME)
        #expect(capabilities.size.offered && capabilities.size.limit == 1000)
        #expect(capabilities.extensions["AUTH"] == ["PLAIN", "LOGIN"])
        // The greeting line is not an extension.
        #expect(!capabilities.offers("MX.EXAMPLE"))
        let bare = SMTPCapabilities(ehloReply: SMTPReply(250, nil, ["mx.example", "SIZE"]))
        #expect(bare.size.offered && bare.size.limit == nil)
        #expect(SMTPCapabilities(ehloReply: SMTPReply(250, nil, ["mx", "SIZE 0"])).size.limit == nil)
        #expect(!SMTPCapabilities(ehloReply: SMTPReply(250, nil, "mx")).size.offered)
    }

    @Test("commands as written, with CRLF")
    func commands() throws {
        let table: [(SMTPClientCommand, String)] = [
            (.ehlo("mail.example"), "EHLO mail.example\r\n"),
            (.helo("mail.example"), "HELO mail.example\r\n"),
            (.mail(from: "a@b.example", parameters: ["SIZE=10", "SMTPUTF8"]), "MAIL FROM:<a@b.example> SIZE=10 SMTPUTF8\r\n"),
            (.mail(from: "", parameters: []), "MAIL FROM:<>\r\n"),
            (.rcpt(to: "c@d.example"), "RCPT TO:<c@d.example>\r\n"),
            (.bdat(size: 42, last: true), "BDAT 42 LAST\r\n"),
            (.bdat(size: 7, last: false), "BDAT 7\r\n"),
            (.data, "DATA\r\n"), (.rset, "RSET\r\n"), (.noop, "NOOP\r\n"), (.quit, "QUIT\r\n"), (.startTLS, "STARTTLS\r\n"),
        ]
        for (command, wire) in table {
            try command.validate()
            var buffer = ByteBuffer()
            command.write(into: &buffer)
            #expect(String(buffer: buffer) == wire)
        }
    }

    @Test("CR, LF or NUL in a value, or an over-long line, is refused before it is sent")
    func injection() {
        #expect(throws: SMTPReplyError.self) { try SMTPClientCommand.rcpt(to: "a@b\r\nRCPT TO:<evil@x>").validate() }
        #expect(throws: SMTPReplyError.self) { try SMTPClientCommand.mail(from: "a@b\n", parameters: []).validate() }
        #expect(throws: SMTPReplyError.self) { try SMTPClientCommand.ehlo("x\u{0}y").validate() }
        #expect(throws: SMTPReplyError.self) {
            try SMTPClientCommand.rcpt(to: String(repeating: "a", count: 600) + "@b.example").validate()
        }
    }

    static let stuffing: [(String, String)] = [
        ("Hello\r\n", "Hello\r\n.\r\n"),
        (".\r\n", "..\r\n.\r\n"),
        ("a\r\n.\r\nb\r\n", "a\r\n..\r\nb\r\n.\r\n"),
        ("..x\r\n.y\r\n", "...x\r\n..y\r\n.\r\n"),
        // No CRLF at the end: one is added before the terminator.
        ("no end", "no end\r\n.\r\n"),
        (".", "..\r\n.\r\n"),
        // A dot after a bare LF is not at a line start (only CRLF ends a line).
        ("a\n.b\r\n", "a\n.b\r\n.\r\n"),
        ("a\r.b\r\n", "a\r.b\r\n.\r\n"),
        ("", ".\r\n"),
        ("x\r\n\r\n.\r\n", "x\r\n\r\n..\r\n.\r\n"),
    ]

    @Test("dot-stuffing (RFC 5321 §4.5.2)", arguments: stuffing)
    func dotStuffing(content: String, wire: String) {
        #expect(String(buffer: DotStuffing.encode(ByteBuffer(string: content))) == wire)
    }

    @Test("dot-stuffing then the server's unstuffing gives back every octet")
    func dotStuffingRoundTrip() {
        var content = ""
        for i in 0..<200 { content += (i % 3 == 0 ? "." : "") + String(repeating: ".", count: i % 4) + "line \(i)\r\n" }
        let wire = String(buffer: DotStuffing.encode(ByteBuffer(string: content)))
        #expect(wire.hasSuffix("\r\n.\r\n"))
        var lines = wire.components(separatedBy: "\r\n")
        lines.removeLast(2)  // "." and the empty string after the last CRLF
        let unstuffed = lines.map { $0.hasPrefix(".") ? String($0.dropFirst()) : $0 }.joined(separator: "\r\n") + "\r\n"
        #expect(unstuffed == content)
    }

    static func capabilities(_ lines: String...) -> SMTPCapabilities {
        SMTPCapabilities(ehloReply: SMTPReply(250, nil, ["mx"] + lines))
    }

    @Test("plan: parameters from what the server offers")
    func plans() throws {
        let full = Self.capabilities("PIPELINING", "SIZE 1000", "8BITMIME", "SMTPUTF8", "CHUNKING")
        let plan = try SMTPTransactionPlan.make(capabilities: full, size: 500, smtputf8: true, body: "8BITMIME").get()
        #expect(plan.mailParameters == ["SIZE=500", "BODY=8BITMIME", "SMTPUTF8"])
        #expect(plan.pipelining && plan.chunking)
        let plain = try SMTPTransactionPlan.make(capabilities: Self.capabilities(), size: 500, smtputf8: false, body: "8BITMIME").get()
        #expect(plain.mailParameters == [] && !plain.pipelining && !plain.chunking)
        let helo = try SMTPTransactionPlan.make(capabilities: nil, size: 5, smtputf8: false, body: nil).get()
        #expect(helo.mailParameters == [])
    }

    @Test("plan: refusals that make the message undeliverable at this server")
    func refusals() {
        let small = Self.capabilities("SIZE 100", "SMTPUTF8")
        guard case .failure(let tooBig) = SMTPTransactionPlan.make(capabilities: small, size: 101, smtputf8: false, body: nil) else {
            Issue.record("SIZE over the limit was not refused")
            return
        }
        #expect(tooBig.status == EnhancedStatusCode(5, 3, 4))
        guard case .failure(let noUTF8) = SMTPTransactionPlan.make(capabilities: Self.capabilities("8BITMIME"), size: 1, smtputf8: true, body: nil)
        else {
            Issue.record("SMTPUTF8 without support was not refused")
            return
        }
        #expect(noUTF8.status == EnhancedStatusCode(5, 6, 7))
        guard case .failure = SMTPTransactionPlan.make(capabilities: nil, size: 1, smtputf8: true, body: nil) else {
            Issue.record("SMTPUTF8 after HELO was not refused")
            return
        }
        guard case .failure(let binary) = SMTPTransactionPlan.make(capabilities: Self.capabilities("BINARYMIME"), size: 1, smtputf8: false, body: "BINARYMIME")
        else {
            Issue.record("BINARYMIME without CHUNKING was not refused")
            return
        }
        #expect(binary.status == EnhancedStatusCode(5, 6, 3))
    }
}
