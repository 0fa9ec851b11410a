/// An ESMTP parameter of MAIL or RCPT (RFC 5321 §4.1.2 `esmtp-param`): `keyword ["=" value]`.
/// The keyword is kept in upper case.
public struct ESMTPParameter: Sendable, Hashable {
    public var keyword: String
    public var value: String?

    public init(_ keyword: String, _ value: String? = nil) {
        self.keyword = keyword
        self.value = value
    }
}

/// A command line, parsed (RFC 5321 §4.1.1 and the extensions the server offers).
/// Verbs are case-insensitive. Which commands are valid in which state is the job of
/// `SMTPServerStateMachine`, not of this type.
public enum SMTPCommand: Sendable, Hashable {
    /// RFC 5321 §4.1.1.1.
    case helo(String)
    case ehlo(String)
    /// RFC 5321 §4.1.1.2, with ESMTP parameters (SIZE, BODY, SMTPUTF8, BY, AUTH, …).
    case mail(ReversePath, [ESMTPParameter])
    /// RFC 5321 §4.1.1.3.
    case rcpt(ForwardPath, [ESMTPParameter])
    /// RFC 5321 §4.1.1.4.
    case data
    /// RFC 3030 §2: `BDAT <chunk-size> [LAST]`.
    case bdat(size: Int, last: Bool)
    case rset
    case noop
    case quit
    /// RFC 5321 §4.1.1.6.
    case vrfy(String)
    case help(String?)
    /// RFC 3207.
    case startTLS
    /// RFC 4954 §4: mechanism (upper case) and the optional initial response, still base64.
    case auth(mechanism: String, initialResponse: String?)
    /// RFC 1985: `ETRN <node>`; a leading `@` is kept.
    case etrn(String)
    /// RFC 2645: `ATRN [domain *("," domain)]`.
    case atrn([String])
    /// A known verb the server does not implement (EXPN, TURN, SEND, SAML, SOML).
    case notImplemented(String)
}

/// Why a command line could not be parsed; each carries the reply to send.
public struct SMTPCommandError: Error, Sendable, Hashable {
    public var reply: SMTPReply
    /// BDAT with a malformed size: the length of the chunk that follows is unknown, so the
    /// stream cannot be resynchronised and the connection must close (RFC 3030 §2).
    public var mustClose: Bool

    init(_ reply: SMTPReply, mustClose: Bool = false) {
        self.reply = reply
        self.mustClose = mustClose
    }
}

extension SMTPCommand {
    /// Parses one command line, without its CRLF.
    public static func parse<Bytes: Collection>(_ line: Bytes) -> Result<SMTPCommand, SMTPCommandError> where Bytes.Element == UInt8 {
        let bytes = Array(line)[...]
        guard !bytes.contains(where: { $0 < 32 || $0 == 127 }) else {
            return .failure(.init(.invalidCharacter))
        }
        let verbEnd = bytes.firstIndex(of: UInt8(ascii: " ")) ?? bytes.endIndex
        let verb = String(decoding: bytes[..<verbEnd], as: UTF8.self).uppercased()
        var argument = bytes[verbEnd...]
        if argument.first == UInt8(ascii: " ") { argument = argument.dropFirst() }
        let argumentString = String(decoding: argument, as: UTF8.self).trimmingSpaces()

        switch verb {
        case "HELO", "EHLO":
            let words = argumentString.split(separator: " ")
            guard let domain = words.first, isHeloArgument(domain) else {
                return .failure(.init(.heloSyntax(verb)))
            }
            return .success(verb == "HELO" ? .helo(String(domain)) : .ehlo(String(domain)))
        case "MAIL":
            return parseMail(argument)
        case "RCPT":
            return parseRcpt(argument)
        case "DATA":
            return argumentString.isEmpty ? .success(.data) : .failure(.init(.noParametersAllowed))
        case "BDAT":
            return parseBDAT(argumentString)
        case "RSET":
            return argumentString.isEmpty ? .success(.rset) : .failure(.init(.noParametersAllowed))
        case "NOOP":
            return .success(.noop)
        case "QUIT":
            return argumentString.isEmpty ? .success(.quit) : .failure(.init(.noParametersAllowed))
        case "VRFY":
            return argumentString.isEmpty ? .failure(.init(.vrfySyntax)) : .success(.vrfy(argumentString))
        case "HELP":
            return .success(.help(argumentString.isEmpty ? nil : argumentString))
        case "STARTTLS":
            return argumentString.isEmpty ? .success(.startTLS) : .failure(.init(.noParametersAllowed))
        case "AUTH":
            let words = argumentString.split(separator: " ", omittingEmptySubsequences: true)
            guard (1...2).contains(words.count) else { return .failure(.init(.authSyntax)) }
            return .success(.auth(mechanism: words[0].uppercased(), initialResponse: words.count == 2 ? String(words[1]) : nil))
        case "ETRN":
            var node = Substring(argumentString)
            if node.first == "@" { node = node.dropFirst() }
            guard !node.isEmpty, !argumentString.contains(" "), AddressParser.isValidDomain(node.utf8) else {
                return .failure(.init(.etrnSyntax))
            }
            return .success(.etrn(argumentString))
        case "ATRN":
            let domains = argumentString.split(separator: ",", omittingEmptySubsequences: false).map { $0.trimmingSpaces() }
            guard !argumentString.isEmpty, domains.allSatisfy({ AddressParser.isValidDomain($0.utf8) }) else {
                return .failure(.init(.atrnSyntax))
            }
            return .success(.atrn(domains))
        case "EXPN", "TURN", "SEND", "SAML", "SOML":
            return .success(.notImplemented(verb))
        default:
            return .failure(.init(.commandNotRecognized))
        }
    }

    private static func isHeloArgument(_ word: Substring) -> Bool {
        if word.first == "[" { return AddressParser.isValidAddressLiteral(Array(word.utf8)[...]) }
        return AddressParser.isValidDomain(word.utf8)
    }

    /// Splits `<path> *( SP esmtp-param )` after the `FROM:`/`TO:` keyword. Spaces between the
    /// colon and the path are tolerated (common, though RFC 5321 has none).
    private static func splitPathAndParameters(_ rest: ArraySlice<UInt8>) -> (path: ArraySlice<UInt8>, parameters: [ESMTPParameter])? {
        var rest = rest
        while rest.first == UInt8(ascii: " ") { rest = rest.dropFirst() }
        guard rest.first == UInt8(ascii: "<"), let close = rest.firstIndex(of: UInt8(ascii: ">")) else { return nil }
        let path = rest[rest.startIndex...close]
        let tail = rest[(close + 1)...]
        guard tail.isEmpty || tail.first == UInt8(ascii: " ") else { return nil }
        var parameters: [ESMTPParameter] = []
        for word in tail.split(separator: UInt8(ascii: " ")) {
            guard let parameter = parseParameter(word) else { return nil }
            parameters.append(parameter)
        }
        return (path, parameters)
    }

    /// `esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")`; `esmtp-value = 1*(%d33-60 / %d62-126)`,
    /// and UTF-8 in values (RFC 6531 §3.3).
    private static func parseParameter(_ word: ArraySlice<UInt8>) -> ESMTPParameter? {
        let equals = word.firstIndex(of: UInt8(ascii: "="))
        let keyword = word[word.startIndex..<(equals ?? word.endIndex)]
        guard let first = keyword.first, isAlphaDigit(first),
            keyword.allSatisfy({ isAlphaDigit($0) || $0 == UInt8(ascii: "-") })
        else { return nil }
        let keywordString = String(decoding: keyword, as: UTF8.self).uppercased()
        guard let equals else { return ESMTPParameter(keywordString) }
        let value = word[(equals + 1)...]
        guard !value.isEmpty, value.allSatisfy({ $0 >= 0x80 || ((33...126).contains($0) && $0 != UInt8(ascii: "=")) }),
            let valueString = String(validating: value, as: UTF8.self)
        else { return nil }
        return ESMTPParameter(keywordString, valueString)
    }

    private static func isAlphaDigit(_ byte: UInt8) -> Bool {
        (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(byte) || (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte)
            || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(byte)
    }

    private static func hasPrefixCaseInsensitive(_ bytes: ArraySlice<UInt8>, _ prefix: String) -> Bool {
        let prefixBytes = Array(prefix.utf8)
        guard bytes.count >= prefixBytes.count else { return false }
        return zip(bytes, prefixBytes).allSatisfy { lowercase($0) == lowercase($1) }
    }

    private static func lowercase(_ byte: UInt8) -> UInt8 {
        (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(byte) ? byte + 32 : byte
    }

    private static func parseMail(_ argument: ArraySlice<UInt8>) -> Result<SMTPCommand, SMTPCommandError> {
        guard hasPrefixCaseInsensitive(argument, "FROM:"),
            let (pathBytes, parameters) = splitPathAndParameters(argument.dropFirst(5)),
            let path = AddressParser.parsePath(pathBytes, allowNull: true)
        else { return .failure(.init(.badSenderSyntax)) }
        guard Set(parameters.map(\.keyword)).count == parameters.count else { return .failure(.init(.badSenderSyntax)) }
        return .success(.mail(path.map(ReversePath.mailbox) ?? .null, parameters))
    }

    private static func parseRcpt(_ argument: ArraySlice<UInt8>) -> Result<SMTPCommand, SMTPCommandError> {
        guard hasPrefixCaseInsensitive(argument, "TO:"),
            let (pathBytes, parameters) = splitPathAndParameters(argument.dropFirst(3))
        else { return .failure(.init(.badRecipientSyntax)) }
        if hasPrefixCaseInsensitive(pathBytes, "<postmaster>"), pathBytes.count == 12 {
            return .success(.rcpt(.postmaster, parameters))
        }
        guard let path = AddressParser.parsePath(pathBytes, allowNull: false), let mailbox = path else {
            return .failure(.init(.badRecipientSyntax))
        }
        return .success(.rcpt(.mailbox(mailbox), parameters))
    }

    private static func parseBDAT(_ argument: String) -> Result<SMTPCommand, SMTPCommandError> {
        let words = argument.split(separator: " ")
        guard (1...2).contains(words.count), words[0].allSatisfy(\.isASCIIDigit), words[0].count <= 10,
            let size = Int(words[0]),
            words.count == 1 || words[1].uppercased() == "LAST"
        else { return .failure(.init(.bdatSyntax, mustClose: true)) }
        return .success(.bdat(size: size, last: words.count == 2))
    }
}

extension Character {
    var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}

extension StringProtocol {
    func trimmingSpaces() -> String {
        var slice = Substring(self)
        while slice.first == " " { slice = slice.dropFirst() }
        while slice.last == " " { slice = slice.dropLast() }
        return String(slice)
    }
}
