import NIOCore
import SMTPProtocol
import Testing

@testable import SMTPNIO

/// Frames `input` delivered in pieces, switching modes the way the server does: after a `DATA`
/// line to DATA mode, after `BDAT n` to an n-octet chunk. Returns one string per frame.
private func frames(_ input: [UInt8], pieces: [Int], maxSize: Int = 1 << 20) -> [String] {
    var parser = SMTPFramingParser()
    var mode = SMTPServerStateMachine.FramingMode.line(maxLength: 512)
    var output: [String] = []
    var offset = 0
    for length in pieces + [input.count] {
        let end = min(input.count, offset + length)
        if end > offset {
            parser.append(ByteBuffer(bytes: input[offset..<end]))
            offset = end
        }
        while let frame = parser.nextFrame(mode: mode) {
            switch frame {
            case .line(let line):
                let text = String(buffer: line)
                output.append("line:\(text)")
                let words = text.split(separator: " ")
                if text == "DATA" {
                    mode = .data(maxSize: maxSize)
                } else if words.first == "BDAT", words.count >= 2, let size = Int(words[1]) {
                    mode = .chunk(size: size, discard: false)
                }
            case .lineTooLong:
                output.append("too-long")
            case .bareLineFeed:
                output.append("bare-lf")
            case .dataSection(let section):
                output.append(
                    "data:\(String(buffer: section.content).debugDescription) size:\(section.exceededSize) bare:\(section.hadBareCROrLF) long:\(section.hadLongLine)")
                mode = .line(maxLength: 512)
            case .chunk(let chunk):
                output.append("chunk:\(String(buffer: chunk).debugDescription)")
                mode = .line(maxLength: 512)
            }
        }
        if offset == input.count { break }
    }
    return output
}

/// Every way of cutting the input in two gives the same frames as the whole input.
private func expectSplitInvariant(_ text: String, maxSize: Int = 1 << 20, sourceLocation: SourceLocation = #_sourceLocation) -> [String] {
    let input = Array(text.utf8)
    let whole = frames(input, pieces: [input.count], maxSize: maxSize)
    for cut in 0...input.count {
        #expect(frames(input, pieces: [cut], maxSize: maxSize) == whole, "cut at \(cut)", sourceLocation: sourceLocation)
    }
    #expect(frames(input, pieces: Array(repeating: 1, count: input.count), maxSize: maxSize) == whole, "byte by byte", sourceLocation: sourceLocation)
    return whole
}

@Suite("Framing")
struct SMTPFramingParserTests {
    @Test func commandLines() {
        #expect(expectSplitInvariant("EHLO a.example\r\nNOOP\r\n") == ["line:EHLO a.example", "line:NOOP"])
        #expect(expectSplitInvariant("NOOP\nNOOP\r\n") == ["bare-lf", "line:NOOP"])
        #expect(expectSplitInvariant("\r\n") == ["line:"])
    }

    @Test("over-long lines are discarded up to their LF; the session resyncs")
    func longLines() {
        let long = String(repeating: "x", count: 700)
        #expect(expectSplitInvariant("NOOP \(long)\r\nNOOP\r\n") == ["too-long", "line:NOOP"])
        let exact = "NOOP " + String(repeating: "x", count: 505)  // 510 + CRLF = 512
        #expect(expectSplitInvariant("\(exact)\r\n") == ["line:\(exact)"])
    }

    @Test("an endless line is not buffered")
    func endless() {
        var parser = SMTPFramingParser()
        for _ in 0..<100 {
            parser.append(ByteBuffer(repeating: UInt8(ascii: "x"), count: 10_000))
            #expect(parser.nextFrame(mode: .line(maxLength: 512)) == nil)
        }
        #expect(parser.bufferedByteCount == 0)
    }

    @Test("DATA: dot-unstuffing and the terminator")
    func data() {
        let frames = expectSplitInvariant("DATA\r\nSubject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n")
        #expect(frames == ["line:DATA", "data:\"Subject: x\\r\\n\\r\\n.leading dot\\r\\n\" size:false bare:false long:false", "line:QUIT"])
        #expect(expectSplitInvariant("DATA\r\n.\r\n") == ["line:DATA", "data:\"\" size:false bare:false long:false"])
        #expect(expectSplitInvariant("DATA\r\n..\r\n.\r\n") == ["line:DATA", "data:\".\\r\\n\" size:false bare:false long:false"])
    }

    static let smuggling: [String] = [
        "DATA\r\nhi\n.\nMAIL FROM:<x@y.example>\r\n.\r\n",
        "DATA\r\nhi\r.\rMAIL FROM:<x@y.example>\r\n.\r\n",
        "DATA\r\nhi\n.\r\nMAIL FROM:<x@y.example>\r\n.\r\n",
        "DATA\r\nhi\r\n.\nMAIL FROM:<x@y.example>\r\n.\r\n",
        "DATA\r\nhi\r\n.\r\rMAIL FROM:<x@y.example>\r\n.\r\n",
        "DATA\r\nbare\nlf\r\n.\r\n",
    ]

    @Test("SMTP smuggling: only CRLF.CRLF ends DATA, and bare CR/LF are flagged", arguments: smuggling)
    func smugglingInputs(text: String) {
        let result = expectSplitInvariant(text)
        #expect(result.count == 2, "one DATA section, nothing after: \(result)")
        #expect(result.last?.contains("bare:true") == true)
    }

    @Test("DATA: text lines over 1000 octets are flagged, and do not stop the search for the end")
    func dataLongLine() {
        let line = String(repeating: "y", count: 999)
        let result = expectSplitInvariant("DATA\r\n\(line)\r\nok\r\n.\r\n")
        #expect(result.last?.hasSuffix("long:true") == true)
        let fine = String(repeating: "y", count: 998)
        #expect(expectSplitInvariant("DATA\r\n\(fine)\r\n.\r\n").last?.hasSuffix("long:false") == true)
        let huge = String(repeating: "z", count: 5000)
        #expect(expectSplitInvariant("DATA\r\n\(huge)\r\n.\r\nNOOP\r\n").suffix(2) == [
            "data:\"\" size:false bare:false long:true", "line:NOOP",
        ])
    }

    @Test("DATA: the size limit is counted as content arrives")
    func dataSize() {
        let result = expectSplitInvariant("DATA\r\n12345678\r\n12345678\r\n.\r\nNOOP\r\n", maxSize: 15)
        #expect(result == ["line:DATA", "data:\"\" size:true bare:false long:false", "line:NOOP"])
        let fits = expectSplitInvariant("DATA\r\n12345678\r\n.\r\n", maxSize: 10)
        #expect(fits == ["line:DATA", "data:\"12345678\\r\\n\" size:false bare:false long:false"])
    }

    @Test("BDAT chunks are binary and exact")
    func chunks() {
        let exact = expectSplitInvariant("BDAT 6\r\nab\r\n.\nBDAT 0 LAST\r\nNOOP\r\n")
        #expect(exact == ["line:BDAT 6", "chunk:\"ab\\r\\n.\\n\"", "line:BDAT 0 LAST", "chunk:\"\"", "line:NOOP"])
    }

    @Test("a discarded chunk is consumed, not kept")
    func discardedChunk() {
        var parser = SMTPFramingParser()
        parser.append(ByteBuffer(string: "0123456789NOOP\r\n"))
        guard case .chunk(let chunk) = parser.nextFrame(mode: .chunk(size: 10, discard: true)) else { Issue.record(); return }
        #expect(chunk.readableBytes == 0)
        guard case .line(let line) = parser.nextFrame(mode: .line(maxLength: 512)) else { Issue.record(); return }
        #expect(String(buffer: line) == "NOOP")
    }
}
