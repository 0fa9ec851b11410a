import MailTier
import NIOCore
import Testing

/// `MessageHeaders`: the header section only (up to the first empty line), unfolded.
@Suite struct MessageHeadersTests {
    @Test(arguments: ["\r\n", "\n"])
    func headerSectionEndsAtTheFirstEmptyLine(newline: String) {
        let message = [
            "Subject: first", "To: <a@example.com>,", "\t<b@example.com>", "X-Empty:", "not a field", "",
            "Subject: in the body", "From: nobody",
        ].joined(separator: newline)
        let headers = MessageHeaders(ByteBuffer(string: message))
        #expect(headers.fields.map(\.name) == ["Subject", "To", "X-Empty"])
        #expect(headers.subject == "first")
        #expect(headers["to"] == "<a@example.com>, <b@example.com>")
        #expect(headers["From"] == nil)
    }

    @Test func noEmptyLineMeansAllHeadersAndALeadingEmptyLineNone() {
        #expect(MessageHeaders(ByteBuffer(string: "Subject: only\r\nFrom: x")).fields.map(\.value) == ["only", "x"])
        #expect(MessageHeaders(ByteBuffer(string: "\r\nSubject: body")).fields.isEmpty)
        #expect(MessageHeaders(ByteBuffer(string: "")).fields.isEmpty)
        let large = "Subject: big\r\n\r\n" + String(repeating: "body line\r\n", count: 20_000)
        #expect(MessageHeaders(ByteBuffer(string: large)).subject == "big")
    }
}
