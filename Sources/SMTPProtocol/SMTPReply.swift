import NIOCore

/// An RFC 3463 enhanced status code, `class.subject.detail` (RFC 2034 puts it after the basic code).
public struct EnhancedStatusCode: Sendable, Hashable, CustomStringConvertible {
    public var klass: UInt8
    public var subject: UInt16
    public var detail: UInt16

    public init(_ klass: UInt8, _ subject: UInt16, _ detail: UInt16) {
        self.klass = klass
        self.subject = subject
        self.detail = detail
    }

    public var description: String { "\(klass).\(subject).\(detail)" }
}

/// One SMTP reply (RFC 5321 §4.2): a three-digit code, an optional enhanced status code,
/// and one or more lines of text. Multi-line replies use `code-text` for all lines but the last.
public struct SMTPReply: Sendable, Hashable, CustomStringConvertible {
    public var code: Int
    public var enhancedCode: EnhancedStatusCode?
    public var lines: [String]

    public init(_ code: Int, _ enhancedCode: EnhancedStatusCode?, _ lines: [String]) {
        precondition((200...599).contains(code) || code == 334 || code == 354)
        self.code = code
        self.enhancedCode = enhancedCode
        self.lines = lines.isEmpty ? [""] : lines
    }

    public init(_ code: Int, _ enhancedCode: EnhancedStatusCode?, _ text: String) {
        self.init(code, enhancedCode, [text])
    }

    /// 2yz, 3yz: the command (or step) succeeded.
    public var isPositive: Bool { code < 400 }
    /// 4yz: try again later.
    public var isTransient: Bool { (400..<500).contains(code) }
    /// 5yz: do not try again.
    public var isPermanent: Bool { code >= 500 }

    /// The reply as sent on the wire, CRLF after each line.
    public func write(into buffer: inout ByteBuffer) {
        for (index, line) in lines.enumerated() {
            buffer.writeString(String(code))
            buffer.writeInteger(index == lines.count - 1 ? UInt8(ascii: " ") : UInt8(ascii: "-"))
            if let enhancedCode {
                buffer.writeString(enhancedCode.description)
                if !line.isEmpty { buffer.writeInteger(UInt8(ascii: " ")) }
            }
            buffer.writeString(line)
            buffer.writeStaticString("\r\n")
        }
    }

    public var description: String {
        var buffer = ByteBuffer()
        write(into: &buffer)
        return String(buffer: buffer)
    }
}
