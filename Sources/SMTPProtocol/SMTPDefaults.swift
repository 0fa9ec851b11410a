/// Every protocol limit in one place, with the section of the RFC that sets it.
public enum SMTPDefaults {
    /// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets including CRLF.
    public static let maxCommandLineLength = 512
    /// RFC 4954 §4: an AUTH command with initial response, and an AUTH continuation line,
    /// may be up to 12288 octets including CRLF.
    public static let maxAuthLineLength = 12_288
    /// RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets including CRLF.
    public static let maxTextLineLength = 1000
    /// RFC 5321 §4.5.3.1.8: at least 100 recipients must be accepted.
    public static let minimumRecipientBuffer = 100
    /// RFC 5321 §4.5.3.1.1/2: local part ≤ 64 octets, domain ≤ 255 octets.
    public static let maxLocalPartLength = 64
    public static let maxDomainLength = 255
    /// RFC 5321 §4.5.3.1.3: a path is at most 256 octets including the angle brackets.
    public static let maxPathLength = 256
}
