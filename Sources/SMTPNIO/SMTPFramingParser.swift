#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import NIOCore
import SMTPProtocol

/// Strict, bounded framing of the bytes a client sends, run before any grammar parsing.
///
/// The state machine says how the next input is to be read (`SMTPServerStateMachine.FramingMode`):
/// CRLF lines, a DATA section, or a BDAT chunk of n octets. Only CRLF ends a line; a bare LF is
/// reported, never taken as a line end, and only CRLF "." CRLF ends DATA (RFC 5321 §2.3.8, §4.1.1.4 —
/// the SMTP smuggling defence). Nothing is buffered without bound: an over-long line is discarded
/// as it arrives and reported once its LF comes.
public struct SMTPFramingParser: Sendable {
    public enum Frame: Sendable {
        /// A line without its CRLF.
        case line(ByteBuffer)
        /// A line longer than the mode allowed (it was discarded).
        case lineTooLong
        /// A line that ended with LF alone (it was discarded).
        case bareLineFeed
        /// A complete DATA section, after the terminating CRLF.CRLF.
        case dataSection(DataSection)
        /// A complete BDAT chunk (empty when discarded).
        case chunk(ByteBuffer)
    }

    private struct DataProgress: Sendable {
        var section = DataSection(content: ByteBuffer())
        var size = 0
        /// Inside a text line already known to be too long: discard up to its LF.
        var discardingLine = false
        /// The previous line ended with CRLF (the DATA command line did): a "." line ends
        /// the section only then, so `LF . CRLF` is not a terminator.
        var previousEndedWithCRLF = true
        /// The last octet discarded from an over-long line was a CR (its LF may come next).
        var discardedCR = false
    }

    private var buffer = ByteBuffer()
    private var discardingLine = false
    private var data: DataProgress?
    private var chunkRemaining: Int?
    private var chunk = ByteBuffer()

    public init() {}

    /// Octets received and not yet framed.
    public var bufferedByteCount: Int { buffer.readableBytes }

    public mutating func append(_ bytes: ByteBuffer) {
        if buffer.readableBytes == 0 {
            buffer = bytes
        } else {
            var bytes = bytes
            buffer.writeBuffer(&bytes)
        }
    }

    /// The next complete frame in `mode`, or nil when more input is needed.
    public mutating func nextFrame(mode: SMTPServerStateMachine.FramingMode) -> Frame? {
        defer {
            if buffer.readerIndex > 65_536 { buffer.discardReadBytes() }
        }
        switch mode {
        case .line(let maxLength):
            return nextLine(maxLength: maxLength)
        case .data(let maxSize):
            return nextDataSection(maxSize: maxSize)
        case .chunk(let size, let discard):
            return nextChunk(size: size, discard: discard)
        case .paused, .closed:
            return nil
        }
    }

    private static let lf = UInt8(ascii: "\n")
    private static let cr = UInt8(ascii: "\r")

    private mutating func nextLine(maxLength: Int) -> Frame? {
        let view = buffer.readableBytesView
        guard let lfIndex = view.firstIndex(of: Self.lf) else {
            if discardingLine || view.count > maxLength {
                discardingLine = true
                buffer.moveReaderIndex(forwardBy: view.count)
            }
            return nil
        }
        let lineLength = lfIndex - view.startIndex + 1
        let endsWithCRLF = lineLength >= 2 && view[lfIndex - 1] == Self.cr
        if discardingLine || lineLength > maxLength {
            discardingLine = false
            buffer.moveReaderIndex(forwardBy: lineLength)
            return .lineTooLong
        }
        guard endsWithCRLF else {
            buffer.moveReaderIndex(forwardBy: lineLength)
            return .bareLineFeed
        }
        let line = buffer.readSlice(length: lineLength - 2)!
        buffer.moveReaderIndex(forwardBy: 2)
        return .line(line)
    }

    /// The complete lines in the buffer are framed in one pass over its bytes (memchr for each
    /// LF), and the octets kept — everything but the terminator and the dots of dot-stuffed
    /// lines — are copied into the content in runs, one copy per run of lines rather than one
    /// slice and one copy per line.
    private mutating func nextDataSection(maxSize: Int) -> Frame? {
        var progress = data ?? DataProgress()
        defer { data = progress }
        var ended = false
        let consumed = buffer.withUnsafeReadableBytes { raw -> Int in
            guard let base = raw.baseAddress, raw.count > 0 else { return 0 }
            var position = 0
            // Kept octets [runStart, runEnd) not yet copied into the content.
            var runStart = 0
            var runEnd = 0
            func keep(_ start: Int, _ end: Int) {
                if start != runEnd {
                    copyRun()
                    runStart = start
                }
                runEnd = end
            }
            func copyRun() {
                if runEnd > runStart {
                    progress.section.content.writeBytes(UnsafeRawBufferPointer(rebasing: raw[runStart..<runEnd]))
                }
                runStart = runEnd
            }
            while position < raw.count, let found = memchr(base + position, Int32(Self.lf), raw.count - position) {
                let lfIndex = base.distance(to: UnsafeRawPointer(found))
                let lineLength = lfIndex - position + 1
                defer { position += lineLength }
                if progress.discardingLine {
                    progress.discardingLine = false
                    progress.previousEndedWithCRLF = lineLength >= 2 ? raw[lfIndex - 1] == Self.cr : progress.discardedCR
                    continue
                }
                let endsWithCRLF = lineLength >= 2 && raw[lfIndex - 1] == Self.cr
                let textLength = endsWithCRLF ? lineLength - 2 : lineLength - 1
                let startsWithDot = textLength > 0 && raw[position] == UInt8(ascii: ".")
                if endsWithCRLF && progress.previousEndedWithCRLF && textLength == 1 && startsWithDot {
                    copyRun()
                    ended = true
                    return position + lineLength
                }
                progress.previousEndedWithCRLF = endsWithCRLF
                if !endsWithCRLF || (textLength > 0 && memchr(base + position, Int32(Self.cr), textLength) != nil) {
                    progress.section.hadBareCROrLF = true
                }
                if lineLength > SMTPDefaults.maxTextLineLength { progress.section.hadLongLine = true }
                // RFC 5321 §4.5.2: a leading dot was doubled by the client.
                let stuffed = startsWithDot ? 1 : 0
                progress.size += lineLength - stuffed
                if progress.size > maxSize {
                    if !progress.section.exceededSize {
                        progress.section.exceededSize = true
                        progress.section.content = ByteBuffer()
                        runStart = runEnd  // nothing more is kept
                    }
                } else {
                    keep(position + stuffed, position + lineLength)
                }
            }
            copyRun()
            return position
        }
        buffer.moveReaderIndex(forwardBy: consumed)
        if ended {
            // A refused message keeps no content: it is never stored.
            if progress.section.exceededSize || progress.section.hadLongLine || progress.section.hadBareCROrLF {
                progress.section.content = ByteBuffer()
            }
            let section = progress.section
            progress = DataProgress()
            return .dataSection(section)
        }
        // A partial line: keep it until its end arrives, unless it is already too long.
        let view = buffer.readableBytesView
        if progress.discardingLine || view.count > SMTPDefaults.maxTextLineLength {
            progress.section.hadLongLine = true
            progress.discardingLine = true
            if let last = view.last { progress.discardedCR = last == Self.cr }
            buffer.moveReaderIndex(forwardBy: view.count)
        }
        return nil
    }

    private mutating func nextChunk(size: Int, discard: Bool) -> Frame? {
        var remaining = chunkRemaining ?? size
        if chunkRemaining == nil && !discard { chunk = ByteBuffer() }
        let take = min(remaining, buffer.readableBytes)
        if discard {
            buffer.moveReaderIndex(forwardBy: take)
        } else if take > 0 {
            var slice = buffer.readSlice(length: take)!
            chunk.writeBuffer(&slice)
        }
        remaining -= take
        guard remaining == 0 else {
            chunkRemaining = remaining
            return nil
        }
        chunkRemaining = nil
        let complete = discard ? ByteBuffer() : chunk
        chunk = ByteBuffer()
        return .chunk(complete)
    }
}
