import NIOCore

/// An RFC 3464 delivery status notification (a bounce, or a delay warning): built here, pure,
/// as the complete RFC 5322 message; queued and sent by the delivery workers like any other
/// message, with the null reverse path (`MAIL FROM:<>`, RFC 5321 §4.5.5, RFC 3464 §2).
///
/// The message (RFC 6522 `multipart/report; report-type=delivery-status`):
/// 1. `text/plain; charset=utf-8`, quoted-printable — the explanation for a person. Always
///    quoted-printable, so the part is 7-bit whatever the addresses and diagnostics contain, and
///    its lines stay within 76 octets.
/// 2. `message/delivery-status` (RFC 3464 §2.1) — always 7-bit: per-message fields, a blank line,
///    then one field group per recipient. A UTF-8 address is written with the RFC 6533 §3
///    `utf-8` address type in its `utf-8-addr-xtext` form (each non-ASCII character, and `\`,
///    `+`, `=`, as `\x{HHHH}`), so the part stays ASCII and needs no `message/global-delivery-status`.
///    Text from remote servers (diagnostics) is reduced to printable ASCII (controls become
///    spaces, other octets `?`) and folded, so it can never start a field of its own.
/// 3. The original: its header section as `text/rfc822-headers` (RFC 6522 §4; the default,
///    `Return.headers`, as RFC 3461 `RET=HDRS` and common practice), or the whole message as
///    `message/rfc822` (`Return.full`, for `RET=FULL`). When those octets are not all ASCII the
///    part is `message/global-headers` / `message/global` (RFC 6533 §6.3, RFC 6532 §3.7) with
///    `Content-Transfer-Encoding: 8bit`, and `requiresSMTPUTF8` says so — such a message came by
///    SMTPUTF8 (or 8BITMIME for an 8-bit body), and its DSN goes back the same way.
///
/// Every line ends in CRLF and is at most 998 octets (RFC 5322 §2.1.1); a bare CR or LF in the
/// original is written as CRLF; an over-long line of the original (ingress refuses those) is
/// broken with CRLF SP.
public struct DeliveryStatusNotification: Sendable {
    /// RFC 3464 §2.3.3. Only the two actions MailTier reports.
    public enum Action: String, Sendable, Hashable {
        /// Permanent failure, or expiry (queue lifetime, or RFC 2852 `BY=…;R` past its deadline).
        case failed
        /// Still trying (RFC 2852 `BY=…;N` past its deadline, or a delay warning).
        case delayed
    }

    /// What of the original message to return (RFC 3461 §4.3 `RET`).
    public enum Return: Sendable, Hashable {
        /// The header section only (`RET=HDRS`, and the default when RET was not given).
        case headers
        /// The whole message (`RET=FULL`).
        case full
    }

    /// One recipient's field group (RFC 3464 §2.3).
    public struct Recipient: Sendable, Hashable {
        /// `Final-Recipient`: the address delivery was attempted to.
        public var finalRecipient: Mailbox
        /// `Original-Recipient`, when the client gave RFC 3461 `ORCPT=rfc822;…`.
        public var originalRecipient: Mailbox?
        public var action: Action
        /// `Status`: e.g. 5.1.1 (no such user), 4.4.7 (delivery time expired, still trying),
        /// 5.4.7 (expired: `BY=…;R` past its deadline, or the queue lifetime).
        public var status: EnhancedStatusCode
        /// `Remote-MTA: dns; <host>`, when a remote server was reached.
        public var remoteMTA: String?
        /// `Diagnostic-Code: smtp; <reply>`: the remote server's reply, as received (all lines;
        /// it is sanitised here).
        public var diagnostic: String?
        /// The `Diagnostic-Code` type (RFC 3464 §2.3.6): `smtp` for a server's reply; a failure
        /// found here, with no reply (a full local mailbox), uses a private `x-…` type.
        public var diagnosticType: String
        /// `Last-Attempt-Date`.
        public var lastAttempt: MailDateTime?
        /// `Will-Retry-Until`, for `delayed`.
        public var willRetryUntil: MailDateTime?

        public init(
            finalRecipient: Mailbox, originalRecipient: Mailbox? = nil, action: Action, status: EnhancedStatusCode,
            remoteMTA: String? = nil, diagnostic: String? = nil, diagnosticType: String = "smtp",
            lastAttempt: MailDateTime? = nil, willRetryUntil: MailDateTime? = nil
        ) {
            self.finalRecipient = finalRecipient
            self.originalRecipient = originalRecipient
            self.action = action
            self.status = status
            self.remoteMTA = remoteMTA
            self.diagnostic = diagnostic
            self.diagnosticType = diagnosticType
            self.lastAttempt = lastAttempt
            self.willRetryUntil = willRetryUntil
        }
    }

    /// The built message and what its transport needs.
    public struct Rendered: Sendable {
        /// The complete RFC 5322 message, CRLF line endings.
        public var message: ByteBuffer
        /// The `To:` header or the returned original holds UTF-8: send with SMTPUTF8.
        public var requiresSMTPUTF8: Bool
        /// The returned original holds 8-bit octets: send with `BODY=8BITMIME` (or SMTPUTF8).
        public var requires8BitMIME: Bool
    }

    /// Our hostname: `Reporting-MTA: dns; <host>` and `MAILER-DAEMON@<host>`.
    public var reportingMTA: String
    /// RFC 3461 `ENVID` as given by the client (decoded from xtext), for `Original-Envelope-Id`.
    public var originalEnvelopeID: String?
    /// When the original was accepted (`Arrival-Date`).
    public var arrivalDate: MailDateTime
    /// The original message as stored, or at least its header section (all that
    /// `Return.headers` uses: everything up to the first empty line).
    public var original: ByteBuffer
    /// Whom to tell: the original's reverse path (see `recipient(for:)`).
    public var sender: Mailbox
    public var recipients: [Recipient]
    public var returnContent: Return
    /// `Date:` of the notification.
    public var date: MailDateTime
    /// `Message-ID:` without angle brackets; the caller makes it unique (e.g. `dsn.msg_….<n>@host`).
    public var messageID: String

    public init(
        reportingMTA: String, originalEnvelopeID: String? = nil, arrivalDate: MailDateTime, original: ByteBuffer,
        sender: Mailbox, recipients: [Recipient], returnContent: Return = .headers, date: MailDateTime, messageID: String
    ) {
        self.reportingMTA = reportingMTA
        self.originalEnvelopeID = originalEnvelopeID
        self.arrivalDate = arrivalDate
        self.original = original
        self.sender = sender
        self.recipients = recipients
        self.returnContent = returnContent
        self.date = date
        self.messageID = messageID
    }

    /// Whom a DSN about a message with this reverse path goes to, or nil when none may be sent.
    ///
    /// Never to the null reverse path `<>` (RFC 5321 §4.5.5, §6.1; RFC 3464 §2): notifications,
    /// DSNs included, are sent with `<>`, so a DSN that itself fails produces no DSN and two
    /// servers cannot bounce a message between them forever.
    public static func recipient(for reversePath: ReversePath) -> Mailbox? {
        switch reversePath {
        case .null: return nil
        case .mailbox(let mailbox): return mailbox
        }
    }

    /// The reverse path a DSN is sent with: always `<>`.
    public static let reversePath = ReversePath.null

    /// True when every recipient is `delayed` (a warning, not a bounce).
    public var isDelayWarning: Bool { !recipients.isEmpty && recipients.allSatisfy { $0.action == .delayed } }

    public var subject: String {
        isDelayWarning ? "Delayed Mail (still being retried)" : "Undelivered Mail Returned to Sender"
    }

    // MARK: - Rendering

    public func render() -> Rendered {
        let host = Self.headerText(reportingMTA)
        let explanation = Self.quotedPrintable(humanText())
        let status = statusPart()
        let returned = returnedPart()
        let returnedIs8Bit = returned.contains { $0 >= 0x80 }
        let senderIsUTF8 = !sender.isASCII

        var boundary = "=_MailTier_DSN_\(Self.boundaryToken(messageID))"
        var attempt = 0
        while Self.contains(explanation, boundary) || Self.contains(status, boundary) || Self.contains(returned, boundary) {
            attempt += 1
            boundary = "=_MailTier_DSN_\(Self.boundaryToken(messageID))_\(attempt)"
        }

        var out = [UInt8]()
        out.reserveCapacity(explanation.count + status.count + returned.count + 2048)
        func line(_ text: String) {
            out.append(contentsOf: Array(text.utf8))
            out.append(contentsOf: [13, 10])
        }
        line("From: Mail Delivery System <MAILER-DAEMON@\(host)>")
        line("To: <\(Self.headerText(sender.description, keepUTF8: true))>")
        line("Subject: \(subject)")
        line("Date: \(date.rfc5322)")
        line("Message-ID: <\(Self.headerText(messageID))>")
        line("Auto-Submitted: auto-replied")
        line("MIME-Version: 1.0")
        line("Content-Type: multipart/report; report-type=delivery-status;")
        line("\tboundary=\"\(boundary)\"")
        line("Content-Transfer-Encoding: \(returnedIs8Bit ? "8bit" : "7bit")")
        line("")
        line("This is a MIME-encapsulated message (RFC 3464 delivery status notification).")
        line("")
        line("--\(boundary)")
        line("Content-Description: Notification")
        line("Content-Type: text/plain; charset=utf-8")
        line("Content-Transfer-Encoding: quoted-printable")
        line("")
        out.append(contentsOf: explanation)
        line("--\(boundary)")
        line("Content-Description: Delivery report")
        line("Content-Type: message/delivery-status")
        line("Content-Transfer-Encoding: 7bit")
        line("")
        out.append(contentsOf: status)
        line("--\(boundary)")
        switch returnContent {
        case .headers:
            line("Content-Description: Undelivered message headers")
            line("Content-Type: \(returnedIs8Bit ? "message/global-headers" : "text/rfc822-headers")")
        case .full:
            line("Content-Description: Undelivered message")
            line("Content-Type: \(returnedIs8Bit ? "message/global" : "message/rfc822")")
        }
        line("Content-Transfer-Encoding: \(returnedIs8Bit ? "8bit" : "7bit")")
        line("")
        out.append(contentsOf: returned)
        line("--\(boundary)--")

        return Rendered(
            message: ByteBuffer(bytes: out),
            requiresSMTPUTF8: senderIsUTF8 || (returnedIs8Bit && Self.headerSection(original).contains { $0 >= 0x80 }),
            requires8BitMIME: returnedIs8Bit
        )
    }

    /// Part 1's text, before quoted-printable encoding (UTF-8, LF-separated lines).
    func humanText() -> String {
        let host = Self.headerText(reportingMTA)
        var text = "This is the mail system at host \(host).\n\n"
        if isDelayWarning {
            text += "Your message has not yet been delivered to the recipients below. The mail system\n"
            text += "will keep trying; you do not need to send it again.\n"
        } else {
            text += "I'm sorry to have to inform you that your message could not be delivered to\n"
            text += "one or more recipients. "
            text += returnContent == .headers ? "Its headers are attached below.\n" : "It is attached below.\n"
        }
        text += "\nFor further assistance, please contact <postmaster@\(host)>.\n"
        for recipient in recipients {
            text += "\n<\(Self.headerText(recipient.finalRecipient.description, keepUTF8: true))>: "
            switch recipient.action {
            case .failed: text += "delivery failed (\(recipient.status))"
            case .delayed: text += "delivery delayed (\(recipient.status))"
            }
            if let remote = recipient.remoteMTA { text += ", remote host \(Self.headerText(remote))" }
            if let until = recipient.willRetryUntil { text += ", will retry until \(until.rfc5322)" }
            text += "\n"
            if let diagnostic = recipient.diagnostic {
                text += "    \(Self.headerText(diagnostic, keepUTF8: true))\n"
            }
        }
        return text
    }

    /// Part 2's content: RFC 3464 §2.2 per-message fields, then §2.3 per-recipient groups.
    func statusPart() -> [UInt8] {
        var fields = [String]()
        fields += Self.field("Reporting-MTA", "dns; \(Self.headerText(reportingMTA))")
        if let envelopeID = originalEnvelopeID {
            fields += Self.field("Original-Envelope-Id", Self.headerText(envelopeID))
        }
        fields += Self.field("Arrival-Date", arrivalDate.rfc5322)
        for recipient in recipients {
            fields.append("")
            if let original = recipient.originalRecipient {
                fields += Self.field("Original-Recipient", Self.addressField(original))
            }
            fields += Self.field("Final-Recipient", Self.addressField(recipient.finalRecipient))
            fields += Self.field("Action", recipient.action.rawValue)
            fields += Self.field("Status", recipient.status.description)
            if let remote = recipient.remoteMTA {
                fields += Self.field("Remote-MTA", "dns; \(Self.headerText(remote))")
            }
            if let diagnostic = recipient.diagnostic {
                fields += Self.field("Diagnostic-Code", "\(Self.headerText(recipient.diagnosticType)); \(Self.headerText(diagnostic))")
            }
            if let last = recipient.lastAttempt {
                fields += Self.field("Last-Attempt-Date", last.rfc5322)
            }
            if let until = recipient.willRetryUntil, recipient.action == .delayed {
                fields += Self.field("Will-Retry-Until", until.rfc5322)
            }
        }
        var out = [UInt8]()
        for field in fields {
            out.append(contentsOf: Array(field.utf8))
            out.append(contentsOf: [13, 10])
        }
        return out
    }

    /// Part 3's content, CRLF-normalised, ending in CRLF.
    func returnedPart() -> [UInt8] {
        let bytes = returnContent == .headers ? Self.headerSection(original) : Array(original.readableBytesView)
        return Self.normalizedLines(bytes)
    }

    // MARK: - Pieces

    /// The original's header section: up to and including the first empty line (or all of it).
    static func headerSection(_ message: ByteBuffer) -> [UInt8] {
        let bytes = Array(message.readableBytesView)
        var index = 0
        var lineStart = 0
        while index < bytes.count {
            if bytes[index] == 10 {
                let lineLength = index - lineStart
                if lineLength == 0 || (lineLength == 1 && bytes[lineStart] == 13) {
                    return Array(bytes[..<(index + 1)])
                }
                lineStart = index + 1
            }
            index += 1
        }
        return bytes
    }

    /// Every line ends in CRLF (a bare CR or LF counts as a line end), no line is over 998
    /// octets (longer ones are continued after CRLF SP), and the whole ends in CRLF.
    static func normalizedLines(_ bytes: [UInt8]) -> [UInt8] {
        var out = [UInt8]()
        out.reserveCapacity(bytes.count + 2)
        var lineLength = 0
        var index = 0
        while index < bytes.count {
            let byte = bytes[index]
            if byte == 13 || byte == 10 {
                out.append(contentsOf: [13, 10])
                lineLength = 0
                if byte == 13, index + 1 < bytes.count, bytes[index + 1] == 10 { index += 1 }
            } else {
                if lineLength == maxLineLength {
                    out.append(contentsOf: [13, 10, 32])
                    lineLength = 1
                }
                out.append(byte)
                lineLength += 1
            }
            index += 1
        }
        if lineLength > 0 { out.append(contentsOf: [13, 10]) }
        return out
    }

    /// RFC 5322 §2.1.1: at most 998 octets before CRLF.
    static let maxLineLength = 998
    /// RFC 5322 §2.1.1: lines should be at most 78 octets; fields are folded to this.
    static let foldLength = 78

    /// `Name: value`, folded at spaces to 78 octets where it can be, never over 998. The value
    /// is already sanitised (no CR, LF or other controls).
    static func field(_ name: String, _ value: String) -> [String] {
        var lines = [String]()
        var current = "\(name):"
        for word in value.split(separator: " ", omittingEmptySubsequences: true) {
            var word = Substring(word)
            if current.utf8.count + 1 + word.utf8.count > foldLength, !current.isEmpty, current != "\(name):" {
                lines.append(current)
                current = ""
            }
            // A word that alone would exceed the hard limit is cut (it is text from elsewhere).
            while current.utf8.count + 1 + word.utf8.count > maxLineLength {
                let room = maxLineLength - current.utf8.count - 1
                var cut = word.startIndex
                var used = 0
                while cut < word.endIndex, used + word[cut].utf8.count <= room {
                    used += word[cut].utf8.count
                    cut = word.index(after: cut)
                }
                lines.append(current + " " + word[..<cut])
                current = ""
                word = word[cut...]
            }
            current += " " + word
        }
        lines.append(current)
        return lines
    }

    /// `rfc822; local@domain`, or RFC 6533 `utf-8; …` in `utf-8-addr-xtext` form for a UTF-8 address.
    static func addressField(_ mailbox: Mailbox) -> String {
        let address = mailbox.description
        if mailbox.isASCII { return "rfc822; \(headerText(address))" }
        var text = ""
        for scalar in address.unicodeScalars {
            // QCHAR = %x21-2a / %x2c-3c / %x3e-5b / %x5d-7e (RFC 6533 §3).
            let value = scalar.value
            if (0x21...0x7E).contains(value), value != 0x2B, value != 0x3D, value != 0x5C {
                text.unicodeScalars.append(scalar)
            } else {
                text += "\\x{\(String(value, radix: 16, uppercase: true))}"
            }
        }
        return "utf-8; \(text)"
    }

    /// Text safe inside a header field: CR, LF, tab and other controls become single spaces,
    /// runs of spaces are collapsed, and (unless `keepUTF8`) every non-ASCII character is `?`.
    static func headerText(_ text: String, keepUTF8: Bool = false) -> String {
        var out = ""
        var lastWasSpace = true
        for scalar in text.unicodeScalars {
            let value = scalar.value
            if value < 0x20 || value == 0x7F || (0x80...0x9F).contains(value) || value == 0x2028 || value == 0x2029 || value == 0x20 {
                if !lastWasSpace { out.append(" ") }
                lastWasSpace = true
            } else if value >= 0x80, !keepUTF8 {
                out.append("?")
                lastWasSpace = false
            } else {
                out.unicodeScalars.append(scalar)
                lastWasSpace = false
            }
        }
        if out.hasSuffix(" ") { out.removeLast() }
        return out
    }

    /// RFC 2045 §6.7 quoted-printable of UTF-8 text; `\n` becomes CRLF, output lines ≤ 76 octets,
    /// ending in CRLF. `=` is always `=3D`, so the output never contains `=_` (the boundary's start).
    static func quotedPrintable(_ text: String) -> [UInt8] {
        let hex = Array("0123456789ABCDEF".utf8)
        var out = [UInt8]()
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            let bytes = Array(line.utf8).filter { $0 != 13 }
            var lineLength = 0
            for (index, byte) in bytes.enumerated() {
                let isLast = index == bytes.count - 1
                var encoded: [UInt8]
                if (byte == 32 || byte == 9) && !isLast {
                    encoded = [byte]
                } else if (33...126).contains(byte) && byte != UInt8(ascii: "=") {
                    encoded = [byte]
                } else {
                    encoded = [UInt8(ascii: "="), hex[Int(byte >> 4)], hex[Int(byte & 0x0F)]]
                }
                // Leave room for a soft break "=" (76 including it).
                if lineLength + encoded.count > 75 {
                    out.append(contentsOf: [UInt8(ascii: "="), 13, 10])
                    lineLength = 0
                }
                out.append(contentsOf: encoded)
                lineLength += encoded.count
            }
            out.append(contentsOf: [13, 10])
        }
        // `split` gives a trailing empty line for text ending in "\n": drop its CRLF.
        if text.hasSuffix("\n"), out.count >= 2 { out.removeLast(2) }
        return out
    }

    /// Letters and digits of the message id (for a readable, per-message boundary).
    static func boundaryToken(_ messageID: String) -> String {
        let alphanumerics = messageID.unicodeScalars.filter {
            (48...57).contains($0.value) || (65...90).contains($0.value) || (97...122).contains($0.value)
        }
        let token = String(String.UnicodeScalarView(alphanumerics.prefix(40)))
        return token.isEmpty ? "x" : token
    }

    static func contains(_ haystack: [UInt8], _ needle: String) -> Bool {
        let needle = Array(needle.utf8)
        guard !needle.isEmpty, haystack.count >= needle.count else { return false }
        for start in 0...(haystack.count - needle.count) where haystack[start] == needle[0] {
            if haystack[start..<(start + needle.count)].elementsEqual(needle) { return true }
        }
        return false
    }
}
