#if canImport(FoundationEssentials)
import FoundationEssentials
#endif
import Foundation
import NIOCore
import Testing

@testable import SMTPProtocol

@Suite("RFC 3464 delivery status notifications")
struct DeliveryStatusNotificationTests {
    static let originalHeaders =
        "Received: from client.example ([192.0.2.1])\r\n\tby mx.mailtier.example; Wed, 25 Nov 2026 08:30:00 +0000\r\n"
        + "From: Alice <alice@sender.example>\r\nTo: bob@remote.example\r\nSubject: Quarterly numbers\r\n"
        + "Message-ID: <orig.1@sender.example>\r\n\r\n"
    static let originalBody = "Hello Bob,\r\n\r\nthe numbers are attached.\r\n"
    static var original: ByteBuffer { ByteBuffer(string: originalHeaders + originalBody) }

    static let arrival = MailDateTime(secondsSince1970: 1_795_595_400)
    static let now = MailDateTime(secondsSince1970: 1_795_595_811)

    static func failed(
        _ recipient: Mailbox = Mailbox(localPart: "bob", domain: "remote.example"),
        diagnostic: String? = "550 5.1.1 <bob@remote.example>: Recipient address rejected: User unknown"
    ) -> DeliveryStatusNotification.Recipient {
        .init(
            finalRecipient: recipient, action: .failed, status: EnhancedStatusCode(5, 1, 1), remoteMTA: "mx1.remote.example",
            diagnostic: diagnostic, lastAttempt: now
        )
    }

    static func notification(
        recipients: [DeliveryStatusNotification.Recipient] = [failed()], envelopeID: String? = nil,
        returnContent: DeliveryStatusNotification.Return = .headers, original: ByteBuffer = original,
        sender: Mailbox = Mailbox(localPart: "alice", domain: "sender.example")
    ) -> DeliveryStatusNotification {
        DeliveryStatusNotification(
            reportingMTA: "mx.mailtier.example", originalEnvelopeID: envelopeID, arrivalDate: arrival, original: original,
            sender: sender, recipients: recipients, returnContent: returnContent, date: now,
            messageID: "dsn.msg_abc123.1@mx.mailtier.example"
        )
    }

    static func text(_ rendered: DeliveryStatusNotification.Rendered) -> String {
        String(decoding: rendered.message.readableBytesView, as: UTF8.self)
    }

    /// The top-level header section, unfolded, as name → value (first occurrence).
    static func topHeaders(_ message: String) -> [String: String] {
        let head = message.components(separatedBy: "\r\n\r\n")[0].replacingOccurrences(of: "\r\n\t", with: " ")
            .replacingOccurrences(of: "\r\n ", with: " ")
        var headers = [String: String]()
        for line in head.components(separatedBy: "\r\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = line[..<colon].lowercased()
            if headers[name] == nil { headers[name] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces) }
        }
        return headers
    }

    static func boundary(_ message: String) throws -> String {
        let contentType = try #require(topHeaders(message)["content-type"])
        let range = try #require(contentType.range(of: "boundary=\""))
        let rest = contentType[range.upperBound...]
        return String(rest[..<(try #require(rest.firstIndex(of: "\"")))])
    }

    /// The body parts between the boundaries: each part's header section and body.
    static func parts(_ message: String) throws -> [(headers: [String: String], body: String)] {
        let boundary = try boundary(message)
        var chunks = message.components(separatedBy: "--\(boundary)")
        #expect(chunks.last == "--\r\n", "the close delimiter ends the message")
        chunks.removeFirst()  // preamble
        chunks.removeLast()  // after the close delimiter
        return chunks.map { chunk in
            var chunk = chunk
            if chunk.hasPrefix("\r\n") { chunk.removeFirst() }  // "\r\n" is one Character
            let split = chunk.components(separatedBy: "\r\n\r\n")
            let headerText = split[0]
            let body = split.dropFirst().joined(separator: "\r\n\r\n")
            return (topHeaders(headerText + "\r\n\r\n"), body)
        }
    }

    /// Every line ends in CRLF, no bare CR or LF, none over 998 octets.
    static func checkLines(_ rendered: DeliveryStatusNotification.Rendered, sourceLocation: SourceLocation = #_sourceLocation) {
        let bytes = Array(rendered.message.readableBytesView)
        #expect(bytes.suffix(2) == [13, 10], sourceLocation: sourceLocation)
        var lineLength = 0
        var maxLength = 0
        for (index, byte) in bytes.enumerated() {
            if byte == 13 {
                #expect(index + 1 < bytes.count && bytes[index + 1] == 10, "bare CR at \(index)", sourceLocation: sourceLocation)
            } else if byte == 10 {
                #expect(index > 0 && bytes[index - 1] == 13, "bare LF at \(index)", sourceLocation: sourceLocation)
                maxLength = max(maxLength, lineLength)
                lineLength = 0
            } else {
                lineLength += 1
            }
        }
        #expect(maxLength <= 998, "longest line \(maxLength)", sourceLocation: sourceLocation)
    }

    @Test("Top-level headers of a bounce")
    func topLevelHeaders() throws {
        let rendered = Self.notification().render()
        let message = Self.text(rendered)
        let headers = Self.topHeaders(message)
        #expect(headers["from"] == "Mail Delivery System <MAILER-DAEMON@mx.mailtier.example>")
        #expect(headers["to"] == "<alice@sender.example>")
        #expect(headers["subject"] == "Undelivered Mail Returned to Sender")
        #expect(headers["date"] == "Wed, 25 Nov 2026 08:36:51 +0000")
        #expect(headers["message-id"] == "<dsn.msg_abc123.1@mx.mailtier.example>")
        #expect(headers["auto-submitted"] == "auto-replied")
        #expect(headers["mime-version"] == "1.0")
        let contentType = try #require(headers["content-type"])
        #expect(contentType.hasPrefix("multipart/report; report-type=delivery-status;"))
        #expect(!rendered.requiresSMTPUTF8)
        #expect(!rendered.requires8BitMIME)
        #expect(rendered.message.readableBytesView.allSatisfy { $0 < 0x80 })
        #expect(DeliveryStatusNotification.reversePath == .null)
        Self.checkLines(rendered)
    }

    @Test("Three parts: explanation, delivery-status fields, original headers only by default")
    func partsAndFields() throws {
        let message = Self.text(Self.notification().render())
        let parts = try Self.parts(message)
        try #require(parts.count == 3)
        #expect(parts[0].headers["content-type"] == "text/plain; charset=utf-8")
        #expect(parts[0].headers["content-transfer-encoding"] == "quoted-printable")
        #expect(parts[0].body.contains("<bob@remote.example>: delivery failed (5.1.1)"))
        #expect(parts[1].headers["content-type"] == "message/delivery-status")
        let status = parts[1].body
        #expect(
            status == """
                Reporting-MTA: dns; mx.mailtier.example\r
                Arrival-Date: Wed, 25 Nov 2026 08:30:00 +0000\r
                \r
                Final-Recipient: rfc822; bob@remote.example\r
                Action: failed\r
                Status: 5.1.1\r
                Remote-MTA: dns; mx1.remote.example\r
                Diagnostic-Code: smtp; 550 5.1.1 <bob@remote.example>: Recipient address\r
                 rejected: User unknown\r
                Last-Attempt-Date: Wed, 25 Nov 2026 08:36:51 +0000\r

                """)
        #expect(!status.contains("Original-Envelope-Id"))
        #expect(parts[2].headers["content-type"] == "text/rfc822-headers")
        #expect(parts[2].body.hasPrefix("Received: from client.example ([192.0.2.1])\r\n\tby mx.mailtier.example;"))
        #expect(parts[2].body.contains("Subject: Quarterly numbers\r\n"))
        #expect(!message.contains("the numbers are attached"), "headers only by default")
    }

    @Test("Original-Envelope-Id when ENVID was given")
    func envelopeID() throws {
        let parts = try Self.parts(Self.text(Self.notification(envelopeID: "QQ314159").render()))
        #expect(parts[1].body.hasPrefix("Reporting-MTA: dns; mx.mailtier.example\r\nOriginal-Envelope-Id: QQ314159\r\nArrival-Date: "))
    }

    @Test("RET=FULL returns the whole message as message/rfc822")
    func fullMessage() throws {
        let rendered = Self.notification(returnContent: .full).render()
        let parts = try Self.parts(Self.text(rendered))
        #expect(parts[2].headers["content-type"] == "message/rfc822")
        #expect(parts[2].body == Self.originalHeaders.components(separatedBy: "\r\n\r\n")[0] + "\r\n\r\n" + Self.originalBody)
        #expect(parts[0].body.contains("It is attached below."))
        Self.checkLines(rendered)
    }

    @Test("A delayed notification: its own subject, Will-Retry-Until, no failure wording")
    func delayed() throws {
        let until = MailDateTime(secondsSince1970: 1_796_000_000)
        let recipient = DeliveryStatusNotification.Recipient(
            finalRecipient: Mailbox(localPart: "carol", domain: "slow.example"), action: .delayed,
            status: EnhancedStatusCode(4, 4, 7), remoteMTA: "mx.slow.example", diagnostic: "451 4.4.7 Try later",
            lastAttempt: Self.now, willRetryUntil: until)
        let notification = Self.notification(recipients: [recipient])
        #expect(notification.isDelayWarning)
        let message = Self.text(notification.render())
        #expect(Self.topHeaders(message)["subject"] == "Delayed Mail (still being retried)")
        let parts = try Self.parts(message)
        #expect(parts[1].body.contains("Action: delayed\r\nStatus: 4.4.7\r\n"))
        #expect(parts[1].body.contains("Will-Retry-Until: \(until.rfc5322)\r\n"))
        #expect(parts[0].body.contains("will keep trying"))
        #expect(!parts[0].body.contains("could not be delivered"))

        // A failed and a delayed recipient together: a bounce; Will-Retry-Until only for delayed.
        var failed = Self.failed()
        failed.willRetryUntil = until
        let mixed = Self.notification(recipients: [failed, recipient])
        #expect(!mixed.isDelayWarning)
        let mixedMessage = Self.text(mixed.render())
        #expect(Self.topHeaders(mixedMessage)["subject"] == "Undelivered Mail Returned to Sender")
        #expect(mixedMessage.components(separatedBy: "Will-Retry-Until:").count == 2)
    }

    @Test("DELIVERBY expiry (BY=…;R): status 5.4.7 without a remote MTA")
    func deliverByExpiry() throws {
        let recipient = DeliveryStatusNotification.Recipient(
            finalRecipient: Mailbox(localPart: "dave", domain: "remote.example"), action: .failed,
            status: EnhancedStatusCode(5, 4, 7))
        let parts = try Self.parts(Self.text(Self.notification(recipients: [recipient]).render()))
        #expect(parts[1].body.hasSuffix("\r\n\r\nFinal-Recipient: rfc822; dave@remote.example\r\nAction: failed\r\nStatus: 5.4.7\r\n"))
    }

    @Test("A hostile diagnostic cannot inject header fields or parts")
    func hostileDiagnostic() throws {
        let hostile = "550 5.1.1 no\r\nBcc: victim@example.com\r\n\r\n--=_MailTier_DSN_x\rX-Evil: 1\nContent-Type: text/html\u{0}\u{7F}"
        let rendered = Self.notification(recipients: [Self.failed(diagnostic: hostile)]).render()
        let message = Self.text(rendered)
        Self.checkLines(rendered)
        for line in message.components(separatedBy: "\r\n") {
            #expect(!line.hasPrefix("Bcc:"))
            #expect(!line.hasPrefix("X-Evil:"))
            #expect(line != "Content-Type: text/html")
        }
        let parts = try Self.parts(message)
        #expect(parts.count == 3)
        #expect(parts[1].body.contains("Diagnostic-Code: smtp; 550 5.1.1 no Bcc: victim@example.com --=_MailTier_DSN_x\r\n X-Evil: 1 Content-Type: text/html\r\n"))
        #expect(!message.unicodeScalars.contains { $0.value == 0 || $0.value == 0x7F })
    }

    @Test("A hostile host name or envelope id cannot inject either")
    func hostileHeaderValues() throws {
        var notification = Self.notification(envelopeID: "id\r\nBcc: x@y.example")
        notification.reportingMTA = "mx.example\r\nBcc: x@y.example"
        notification.messageID = "a@b\r\nBcc: x@y.example"
        let message = Self.text(notification.render())
        #expect(!message.components(separatedBy: "\r\n").contains { $0.hasPrefix("Bcc:") })
        #expect(Self.topHeaders(message)["from"] == "Mail Delivery System <MAILER-DAEMON@mx.example Bcc: x@y.example>")
    }

    @Test("A diagnostic longer than a line is folded; a 2000-octet word is cut under 998")
    func longDiagnostic() throws {
        let long = "550 5.7.1 " + Array(repeating: "blocked", count: 300).joined(separator: " ")
        let rendered = Self.notification(recipients: [Self.failed(diagnostic: long), Self.failed(diagnostic: String(repeating: "x", count: 2000))]).render()
        Self.checkLines(rendered)
        let parts = try Self.parts(Self.text(rendered))
        let lines = parts[1].body.components(separatedBy: "\r\n")
        #expect(lines.filter { $0.hasPrefix("Diagnostic-Code:") }.count == 2)
        let unfolded = parts[1].body.replacingOccurrences(of: "\r\n ", with: " ")
        #expect(unfolded.contains("Diagnostic-Code: smtp; \(long)\r\n"))
        #expect(lines.filter { !$0.hasPrefix("Diagnostic-Code:") && !$0.hasPrefix(" ") && $0.count > 78 }.isEmpty)
    }

    @Test("A UTF-8 recipient: RFC 6533 utf-8 address type in xtext form; the explanation keeps it, quoted-printable")
    func utf8Recipient() throws {
        let recipient = Self.failed(Mailbox(localPart: "用户", domain: "例え.jp"), diagnostic: "550 5.1.1 用户 unknown")
        let rendered = Self.notification(recipients: [recipient]).render()
        let message = Self.text(rendered)
        let allASCII = message.unicodeScalars.allSatisfy { $0.isASCII }
        #expect(allASCII, "the whole DSN stays 7-bit")
        #expect(!rendered.requiresSMTPUTF8)
        let parts = try Self.parts(message)
        #expect(parts[1].body.contains("Final-Recipient: utf-8; \\x{7528}\\x{6237}@\\x{4F8B}\\x{3048}.jp\r\n"))
        #expect(parts[1].body.contains("Diagnostic-Code: smtp; 550 5.1.1 ?? unknown\r\n"))
        #expect(parts[0].body.contains("<=E7=94=A8=E6=88=B7@=E4=BE=8B=E3=81=88.jp>"))
        #expect(DeliveryStatusNotification.addressField(Mailbox(localPart: "a+b=c\\d", domain: "é.example")) == "utf-8; a\\x{2B}b\\x{3D}c\\x{5C}d@\\x{E9}.example")
    }

    @Test("A UTF-8 original and sender: message/global-headers, and the transport needs SMTPUTF8")
    func utf8Original() throws {
        let original = ByteBuffer(string: "From: José <josé@sender.example>\r\nSubject: Grüße\r\n\r\nHallo\r\n")
        let rendered = Self.notification(original: original, sender: Mailbox(localPart: "josé", domain: "sender.example")).render()
        #expect(rendered.requiresSMTPUTF8)
        #expect(rendered.requires8BitMIME)
        let message = Self.text(rendered)
        #expect(Self.topHeaders(message)["to"] == "<josé@sender.example>")
        #expect(Self.topHeaders(message)["content-transfer-encoding"] == "8bit")
        let parts = try Self.parts(message)
        #expect(parts[2].headers["content-type"] == "message/global-headers")
        #expect(parts[2].headers["content-transfer-encoding"] == "8bit")
        #expect(parts[2].body == "From: José <josé@sender.example>\r\nSubject: Grüße\r\n\r\n")

        let full = Self.notification(returnContent: .full, original: ByteBuffer(string: "Subject: hi\r\n\r\nGrüße\r\n")).render()
        #expect(!full.requiresSMTPUTF8, "8-bit body, ASCII headers: 8BITMIME is enough")
        #expect(full.requires8BitMIME)
        #expect(try Self.parts(Self.text(full))[2].headers["content-type"] == "message/global")
    }

    @Test("The original is CRLF-normalised and its over-long lines broken")
    func originalNormalised() throws {
        let original = ByteBuffer(string: "Subject: a\nX-Bare: b\rX-Long: " + String(repeating: "y", count: 1500) + "\r\n\r\nbody")
        let rendered = Self.notification(original: original).render()
        Self.checkLines(rendered)
        let parts = try Self.parts(Self.text(rendered))
        #expect(parts[2].body.hasPrefix("Subject: a\r\nX-Bare: b\r\nX-Long: "))
        #expect(parts[2].body.contains("\r\n y"))
        #expect(DeliveryStatusNotification.headerSection(ByteBuffer(string: "A: b\r\nC: d")) == Array("A: b\r\nC: d".utf8))
        #expect(DeliveryStatusNotification.headerSection(ByteBuffer(string: "A: b\n\nbody")) == Array("A: b\n\n".utf8))
    }

    @Test("The boundary never occurs in the content, even when the original quotes it")
    func boundaryAvoidsContent() throws {
        let first = try Self.boundary(Self.text(Self.notification().render()))
        let original = ByteBuffer(string: "Subject: \(first) and \(first)_1\r\n\r\n")
        let message = Self.text(Self.notification(original: original).render())
        let boundary = try Self.boundary(message)
        #expect(boundary != first && boundary != first + "_1")
        #expect(!String(buffer: original).contains(boundary))
        #expect(message.components(separatedBy: boundary).count == 6, "1 in Content-Type, 4 delimiters")
        #expect(try Self.parts(message).count == 3)
    }

    @Test("Quoted-printable: = and trailing spaces encoded, lines at most 76 octets")
    func quotedPrintable() {
        let encoded = String(decoding: DeliveryStatusNotification.quotedPrintable("a=b \n" + String(repeating: "é", count: 40) + "\n"), as: UTF8.self)
        #expect(encoded.hasPrefix("a=3Db=20\r\n"))
        #expect(encoded.components(separatedBy: "\r\n").allSatisfy { $0.utf8.count <= 76 })
        #expect(encoded.hasSuffix("\r\n") && !encoded.hasSuffix("\r\n\r\n"))
    }

    @Test("Never to the null reverse path")
    func whomToTell() {
        #expect(DeliveryStatusNotification.recipient(for: .null) == nil)
        let alice = Mailbox(localPart: "alice", domain: "sender.example")
        #expect(DeliveryStatusNotification.recipient(for: .mailbox(alice)) == alice)
    }

    // MARK: - A real MIME parser

    static let pythonCheck = #"""
        import email, email.policy, sys
        data = open(sys.argv[1], 'rb').read()
        expected = int(sys.argv[2])
        third = sys.argv[3]
        msg = email.message_from_bytes(data)
        assert msg.get_content_type() == 'multipart/report', msg.get_content_type()
        assert msg.get_param('report-type') == 'delivery-status', msg.get_param('report-type')
        assert msg['Auto-Submitted'] == 'auto-replied'
        parts = msg.get_payload()
        assert len(parts) == 3, len(parts)
        types = [p.get_content_type() for p in parts]
        assert types == ['text/plain', 'message/delivery-status', third], types
        text = parts[0].get_payload(decode=True).decode('utf-8')
        assert 'could not be delivered' in text, text
        blocks = parts[1].get_payload()
        assert len(blocks) == 1 + expected, len(blocks)
        assert blocks[0]['Reporting-MTA'] == 'dns; mx.mailtier.example', blocks[0]['Reporting-MTA']
        assert blocks[0]['Original-Envelope-Id'] == 'QQ314159'
        assert blocks[1]['Final-Recipient'] == 'rfc822; bob@remote.example', blocks[1]['Final-Recipient']
        assert blocks[1]['Action'] == 'failed' and blocks[1]['Status'] == '5.1.1'
        assert blocks[1]['Remote-MTA'] == 'dns; mx1.remote.example'
        assert blocks[1]['Bcc'] is None and blocks[1]['X-Evil'] is None, 'injected field'
        diagnostic = ' '.join(blocks[1]['Diagnostic-Code'].split())
        assert diagnostic.startswith('smtp; 550 5.1.1 <bob@remote.example>: Recipient'), diagnostic
        for block in blocks[2:]:
            assert block['Action'] in ('failed', 'delayed'), block['Action']
            assert block['Final-Recipient'].startswith(('rfc822; ', 'utf-8; ')), block['Final-Recipient']
        if third == 'message/rfc822':
            inner = parts[2].get_payload()[0]
            assert inner['Subject'] == 'Quarterly numbers', inner['Subject']
            assert 'the numbers are attached' in inner.get_payload()
        else:
            assert 'Subject: Quarterly numbers' in parts[2].get_payload()
        for part in msg.walk():
            assert not part.defects, (part.get_content_type(), part.defects)
        modern = email.message_from_bytes(data, policy=email.policy.default)
        for part in modern.walk():
            assert not part.defects, (part.get_content_type(), part.defects)
        print('ok')
        """#

    /// Runs Python's `email` package on the DSN. Fails (never skips) when python3 is missing.
    static func parseWithPython(_ rendered: DeliveryStatusNotification.Rendered, recipients: Int, thirdPart: String) throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("dsn-\(UUID().uuidString).eml").path
        try Data(rendered.message.readableBytesView).write(to: URL(fileURLWithPath: path))
        defer { try? FileManager.default.removeItem(atPath: path) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["python3", "-c", pythonCheck, path, String(recipients), thirdPart]
        // Output to a file, not a pipe: a pipe's end inherited by a process another test starts
        // at the same moment would keep it open.
        let outputPath = path + ".out"
        FileManager.default.createFile(atPath: outputPath, contents: nil)
        defer { try? FileManager.default.removeItem(atPath: outputPath) }
        let output = try FileHandle(forWritingTo: URL(fileURLWithPath: outputPath))
        process.standardOutput = output
        process.standardError = output
        try process.run()
        process.waitUntilExit()
        try output.close()
        let text = (try? String(contentsOfFile: outputPath, encoding: .utf8)) ?? ""
        #expect(process.terminationStatus == 0, "python3 (must be on PATH) said: \(text)")
        #expect(text.hasPrefix("ok"), "\(text)")
    }

    @Test("Python's email package parses the bounce: multipart/report, three parts, the status fields")
    func pythonParsesHeadersOnly() throws {
        let recipients = [
            Self.failed(diagnostic: "550 5.1.1 <bob@remote.example>: Recipient address rejected\r\nBcc: x@y.example\r\nX-Evil: 1"),
            Self.failed(Mailbox(localPart: "用户", domain: "例え.jp")),
            .init(
                finalRecipient: Mailbox(localPart: "carol", domain: "slow.example"), action: .delayed,
                status: EnhancedStatusCode(4, 4, 7), willRetryUntil: Self.now),
        ]
        let rendered = Self.notification(recipients: recipients, envelopeID: "QQ314159").render()
        try Self.parseWithPython(rendered, recipients: 3, thirdPart: "text/rfc822-headers")
    }

    @Test("Python's email package parses a RET=FULL bounce with the message inside")
    func pythonParsesFull() throws {
        let rendered = Self.notification(envelopeID: "QQ314159", returnContent: .full).render()
        try Self.parseWithPython(rendered, recipients: 1, thirdPart: "message/rfc822")
    }
}
