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

    /// The DATA framing copies kept octets in runs of lines; this checks it against the plain
    /// line-by-line rules on random sections (dot-stuffed lines, bare CR and LF, lines of every
    /// length up to 1000 octets, sizes around the limit) cut into random pieces.
    @Test("DATA: random sections in random pieces frame as the line-by-line rules say")
    func dataMatchesLineByLineRules() {
        var random = SystemRandomNumberGenerator()
        for round in 0..<300 {
            var body: [UInt8] = []
            for _ in 0..<Int.random(in: 0...40, using: &random) {
                var line: [UInt8] = []
                switch Int.random(in: 0..<10, using: &random) {
                case 0: line = Array("..".utf8)
                // (Not "." alone: that is the end of the section.)
                case 1: line = Array(".".utf8) + Array(repeating: UInt8(ascii: "d"), count: Int.random(in: 1...5, using: &random))
                case 2: line = Array(repeating: UInt8(ascii: "w"), count: Int.random(in: 900...998, using: &random))
                default: line = Array(repeating: UInt8(ascii: "a") + UInt8(round % 26), count: Int.random(in: 0...80, using: &random))
                }
                if round % 5 == 0, Int.random(in: 0..<15, using: &random) == 0 { line.insert(13, at: line.count / 2) }  // bare CR
                body += line + (round % 7 == 0 && Int.random(in: 0..<20, using: &random) == 0 ? [10] : [13, 10])  // bare LF
            }
            let maxSize = round % 3 == 0 ? Int.random(in: 0...2000, using: &random) : 1 << 20
            let input = Array("DATA\r\n".utf8) + body + Array(".\r\nNOOP\r\n".utf8)

            // The rules, one line at a time.
            var expected: [String] = ["line:DATA"]
            var position = 0
            var previousCRLF = true
            var content: [UInt8] = []
            var size = 0
            var (bare, long, exceeded) = (false, false, false)
            let section = Array(input.dropFirst(6))
            while let lf = section[position...].firstIndex(of: 10) {
                let line = Array(section[position...lf])
                position = lf + 1
                let crlf = line.count >= 2 && line[line.count - 2] == 13
                let text = crlf ? line.dropLast(2) : line.dropLast(1)
                if crlf && previousCRLF && Array(text) == [UInt8(ascii: ".")] {
                    let kept = exceeded || long || bare ? "" : String(decoding: content, as: UTF8.self)
                    expected.append("data:\(kept.debugDescription) size:\(exceeded) bare:\(bare) long:\(long)")
                    break
                }
                previousCRLF = crlf
                if !crlf || text.contains(13) { bare = true }
                if line.count > 1000 { long = true }
                let stuffed = text.first == UInt8(ascii: ".") ? 1 : 0
                size += line.count - stuffed
                if size > maxSize {
                    exceeded = true
                } else {
                    content += line.dropFirst(stuffed)
                }
            }
            let rest = String(decoding: section[position...], as: UTF8.self)
            for line in rest.split(separator: "\r\n") { expected.append("line:\(line)") }

            var pieces: [Int] = []
            var total = 0
            while total < input.count {
                let piece = Int.random(in: 1...(round % 2 == 0 ? 64 : 4096), using: &random)
                pieces.append(piece)
                total += piece
            }
            #expect(frames(input, pieces: pieces, maxSize: maxSize) == expected, "round \(round), pieces \(pieces)")
        }
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
