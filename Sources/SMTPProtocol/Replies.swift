/// The server's replies, as `docs/SMTP.md` lists them. Texts live here and nowhere else.
extension SMTPReply {
    // Connection.
    public static func greeting(_ hostname: String) -> SMTPReply { .init(220, nil, "\(hostname) ESMTP MailTier") }
    public static func tooManyConnections(_ hostname: String) -> SMTPReply {
        .init(421, .init(4, 7, 0), "\(hostname) Too many connections, try again later")
    }
    public static func timeout(_ hostname: String) -> SMTPReply {
        .init(421, .init(4, 4, 2), "\(hostname) Timeout exceeded, closing connection")
    }
    public static func shuttingDown(_ hostname: String) -> SMTPReply { .init(421, .init(4, 3, 2), "\(hostname) Service shutting down") }
    public static let bye = SMTPReply(221, .init(2, 0, 0), "Bye")

    // Per-client-address rate limits.
    public static func connectionRateExceeded(_ hostname: String) -> SMTPReply {
        .init(421, .init(4, 7, 0), "\(hostname) Too many connections from your address, try again later")
    }
    public static func commandRateExceeded(_ hostname: String) -> SMTPReply {
        .init(421, .init(4, 7, 0), "\(hostname) Too many commands from your address, closing connection")
    }
    public static let messageRateExceeded = SMTPReply(450, .init(4, 7, 1), "Too many messages from your address, try again later")
    public static let authRateExceeded = SMTPReply(454, .init(4, 7, 0), "Too many authentication failures, try again later")
    public static func rateLimiterUnavailable(_ hostname: String) -> SMTPReply {
        .init(421, .init(4, 3, 0), "\(hostname) Service temporarily unavailable, try again later")
    }
    public static let rateLimiterUnavailableForMessage = SMTPReply(451, .init(4, 3, 0), "Temporary local problem, try again later")

    // Generic.
    public static let ok = SMTPReply(250, .init(2, 0, 0), "Ok")
    public static let vrfy = SMTPReply(252, .init(2, 5, 2), "Cannot VRFY user, but will accept message and attempt delivery")
    public static let help = SMTPReply(
        214, .init(2, 0, 0), "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH ETRN ATRN")
    public static let commandNotRecognized = SMTPReply(500, .init(5, 5, 2), "Command not recognized")
    public static let lineTooLong = SMTPReply(500, .init(5, 5, 2), "Line too long")
    public static let bareLineFeed = SMTPReply(500, .init(5, 5, 2), "Bare LF received, lines must end with CRLF")
    public static let invalidCharacter = SMTPReply(501, .init(5, 5, 2), "Invalid character in command")
    public static let noParametersAllowed = SMTPReply(501, .init(5, 5, 4), "Syntax error, no parameters allowed")
    public static let vrfySyntax = SMTPReply(501, .init(5, 5, 4), "Syntax: VRFY <address>")
    public static let notImplemented = SMTPReply(502, .init(5, 5, 1), "Command not implemented")
    public static func heloSyntax(_ verb: String) -> SMTPReply { .init(501, .init(5, 5, 4), "Syntax: \(verb) <domain>") }

    // STARTTLS.
    public static let tlsNotAvailable = SMTPReply(502, .init(5, 5, 1), "STARTTLS not available")
    public static let tlsAlreadyActive = SMTPReply(503, .init(5, 5, 1), "TLS already active")
    public static let readyToStartTLS = SMTPReply(220, .init(2, 0, 0), "Ready to start TLS")

    // AUTH.
    public static let sendEHLOFirst = SMTPReply(503, .init(5, 5, 1), "Send EHLO first")
    public static let encryptionRequired = SMTPReply(538, .init(5, 7, 11), "Encryption required for requested authentication mechanism")
    public static let alreadyAuthenticated = SMTPReply(503, .init(5, 5, 1), "Already authenticated")
    public static let authDuringTransaction = SMTPReply(503, .init(5, 5, 1), "AUTH not allowed during a mail transaction")
    public static let unknownMechanism = SMTPReply(504, .init(5, 5, 4), "Unrecognized authentication mechanism")
    public static let authSyntax = SMTPReply(501, .init(5, 5, 4), "Syntax: AUTH <mechanism> [initial-response]")
    public static func authChallenge(_ challenge: String) -> SMTPReply { .init(334, nil, challenge) }
    public static let authCancelled = SMTPReply(501, .init(5, 0, 0), "Authentication cancelled")
    public static let invalidAuthData = SMTPReply(501, .init(5, 5, 2), "Invalid authentication data")
    public static let authFailed = SMTPReply(535, .init(5, 7, 8), "Authentication credentials invalid")
    public static let authSucceeded = SMTPReply(235, .init(2, 7, 0), "Authentication successful")
    public static let authTemporaryFailure = SMTPReply(454, .init(4, 7, 0), "Temporary authentication failure")

    // Mail transaction.
    public static let sendHELOFirst = SMTPReply(503, .init(5, 5, 1), "Send HELO/EHLO first")
    public static let authenticationRequired = SMTPReply(530, .init(5, 7, 0), "Authentication required")
    public static let senderAlreadySpecified = SMTPReply(503, .init(5, 5, 1), "Sender already specified")
    public static let badSenderSyntax = SMTPReply(501, .init(5, 1, 7), "Bad sender address syntax")
    public static let messageTooBig = SMTPReply(552, .init(5, 3, 4), "Message size exceeds fixed maximum message size")
    public static func invalidParameter(_ name: String) -> SMTPReply { .init(501, .init(5, 5, 4), "Invalid \(name) parameter") }
    public static func deliverByBelowMinimum(_ minimum: Int) -> SMTPReply {
        .init(501, .init(5, 5, 4), "BY time is below the minimum of \(minimum) seconds")
    }
    public static func unsupportedParameter(_ name: String) -> SMTPReply { .init(555, .init(5, 5, 4), "Unsupported parameter \(name)") }
    public static let smtputf8Required = SMTPReply(553, .init(5, 6, 7), "SMTPUTF8 is required for a non-ASCII address")
    public static let senderOk = SMTPReply(250, .init(2, 1, 0), "Ok")
    public static let needMail = SMTPReply(503, .init(5, 5, 1), "Need MAIL command first")
    public static let badRecipientSyntax = SMTPReply(501, .init(5, 1, 3), "Bad recipient address syntax")
    public static func userUnknown(_ address: String) -> SMTPReply {
        .init(550, .init(5, 1, 1), "<\(address)>: Recipient address rejected: User unknown")
    }
    public static func relayDenied(_ address: String) -> SMTPReply { .init(554, .init(5, 7, 1), "<\(address)>: Relay access denied") }
    public static func mailboxFull(_ address: String) -> SMTPReply {
        .init(452, .init(4, 2, 2), "<\(address)>: Mailbox full, try again later")
    }
    public static let tooManyRecipients = SMTPReply(452, .init(4, 5, 3), "Too many recipients")
    public static let recipientOk = SMTPReply(250, .init(2, 1, 5), "Ok")
    public static let noValidRecipients = SMTPReply(554, .init(5, 5, 1), "No valid recipients")
    public static let startMailInput = SMTPReply(354, nil, "End data with <CR><LF>.<CR><LF>")
    public static func queued(_ id: String) -> SMTPReply { .init(250, .init(2, 0, 0), "Ok: queued as \(id)") }
    public static let bareCROrLF = SMTPReply(554, .init(5, 6, 0), "Message contains bare CR or LF, lines must end with CRLF")
    public static let storageFailure = SMTPReply(451, .init(4, 3, 0), "Error: queue file write error, try again later")
    public static func chunkReceived(_ size: Int) -> SMTPReply { .init(250, .init(2, 0, 0), "\(size) octets received") }
    public static let bdatSyntax = SMTPReply(501, .init(5, 5, 4), "Syntax: BDAT <size> [LAST]")
    public static let dataAfterBDAT = SMTPReply(503, .init(5, 5, 1), "DATA not allowed after BDAT")

    // ETRN and ATRN.
    public static func queuingStarted(_ domain: String) -> SMTPReply { .init(250, .init(2, 0, 0), "Queuing started for \(domain)") }
    public static let etrnSyntax = SMTPReply(501, .init(5, 5, 4), "Syntax: ETRN <domain>")
    public static let etrnDuringTransaction = SMTPReply(503, .init(5, 5, 1), "ETRN not allowed during a mail transaction")
    public static let atrnSyntax = SMTPReply(501, .init(5, 5, 4), "Syntax: ATRN <domain>[,<domain>...]")
    public static func atrnRefused(_ domain: String) -> SMTPReply { .init(450, .init(4, 7, 1), "ATRN request refused for \(domain)") }
    public static let noMail = SMTPReply(453, .init(4, 3, 0), "You have no mail")
    public static let atrnUnavailable = SMTPReply(451, .init(4, 3, 0), "Unable to process ATRN request now")
    /// RFC 2645 §4: the server accepts, then the roles reverse.
    public static let atrnAccepted = SMTPReply(250, .init(2, 0, 0), "OK now reversing the connection")
    public static let atrnDuringTransaction = SMTPReply(503, .init(5, 5, 1), "ATRN not allowed during a mail transaction")
}
