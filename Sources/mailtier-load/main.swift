// mailtier-load: an SMTP load generator on SwiftNIO that records per-message latency.
//
// What it owns: sending many SMTP transactions at once and timing each one, for the benchmarks
// (bench/run.py). It imports NIO only — no project module — so it measures any SMTP server the
// same way. Its output is the JSON object bench/smtp_load.py prints (the Python first version).
//
// Latency is the time from writing MAIL FROM to reading the final reply to the end of data (the
// 250 after the dot). With one connection per message, connect, greeting and EHLO are outside it.
//
// Closed loop (default): --sessions sessions send --messages messages in all, each starting its
// next message when the last one is answered; --reuse keeps one connection per session,
// otherwise each message has its own (QUIT after it).
// Open loop (--rate R): message n is due at start + n/R; a session takes the next message when
// it is free, waits until it is due, and its latency counts from when it was due — so a message
// that waited for a free session has the wait in its latency (no coordinated omission).

import NIOCore
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

struct Options: Sendable {
    var host = "127.0.0.1"
    var port = 25
    var sessions = 50
    var messages = 5000
    var size = 1024
    var reuse = false
    var rate: Double = 0
    var sender = "load@load.invalid"
    var recipient = "bench@bench.test"

    static let usage = """
        usage: mailtier-load --port P [--host H] [--sessions N] [--messages N] [--size OCTETS]
                             [--reuse] [--rate MSG_PER_S] [--from ADDR] [--to ADDR]
        """

    init(_ arguments: [String]) throws {
        var rest = arguments[...]
        func value(_ name: String) throws -> String {
            guard let next = rest.popFirst() else { throw LoadError("\(name) needs a value") }
            return next
        }
        func number<T: LosslessStringConvertible>(_ name: String) throws -> T {
            let text = try value(name)
            guard let parsed = T(text) else { throw LoadError("\(name): not a number: \(text)") }
            return parsed
        }
        while let argument = rest.popFirst() {
            switch argument {
            case "--host": host = try value(argument)
            case "--port": port = try number(argument)
            case "--sessions": sessions = try number(argument)
            case "--messages": messages = try number(argument)
            case "--size": size = try number(argument)
            case "--reuse": reuse = true
            case "--rate": rate = try number(argument)
            case "--from": sender = try value(argument)
            case "--to": recipient = try value(argument)
            case "-h", "--help":
                print(Self.usage)
                exit(0)
            default: throw LoadError("unknown argument \(argument)\n\(Self.usage)")
            }
        }
        for address in [sender, recipient] where address.contains(where: { $0 == "\r" || $0 == "\n" || $0 == ">" }) {
            throw LoadError("addresses must not contain CR, LF or '>'")
        }
        guard sessions > 0, messages > 0, size > 0, rate >= 0 else {
            throw LoadError("--sessions, --messages and --size must be positive, --rate not negative")
        }
    }
}

struct LoadError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The message: a header section and 78-octet lines, `size` octets in all, then the end of
/// data. No line starts with a dot, so no dot-stuffing is needed.
func makeMessage(size: Int, sender: String, recipient: String) -> ByteBuffer {
    var buffer = ByteBuffer()
    buffer.writeString(
        "From: <\(sender)>\r\nTo: <\(recipient)>\r\nSubject: mailtier bench\r\nMessage-ID: <bench@load.invalid>\r\n\r\n")
    let line = String(repeating: "x", count: 76) + "\r\n"
    while buffer.readableBytes + 78 <= size { buffer.writeString(line) }
    if buffer.readableBytes + 2 < size {
        buffer.writeString(String(repeating: "x", count: size - buffer.readableBytes - 2) + "\r\n")
    }
    buffer.writeString(".\r\n")
    return buffer
}

/// Reads SMTP replies (RFC 5321 §4.2: `ddd-text` lines, then `ddd text`) from the channel.
struct ReplyReader {
    var iterator: NIOAsyncChannelInboundStream<ByteBuffer>.AsyncIterator
    var pending = ByteBuffer()

    /// The next reply's code and last line.
    mutating func reply() async throws -> (code: Int, line: String) {
        while true {
            if let line = nextLine() {
                let bytes = Array(line.utf8)
                guard bytes.count >= 3, let code = Int(String(decoding: bytes[0..<3], as: UTF8.self)) else {
                    throw LoadError("malformed reply: \(line.prefix(80))")
                }
                if bytes.count > 3 && bytes[3] == UInt8(ascii: "-") { continue }
                return (code, line)
            }
            guard let more = try await iterator.next() else { throw LoadError("connection closed by the server") }
            pending.writeImmutableBuffer(more)
        }
    }

    private mutating func nextLine() -> String? {
        guard let newline = pending.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) else { return nil }
        let line = pending.readString(length: newline - pending.readerIndex + 1) ?? ""
        if pending.readerIndex > 4096 { pending.discardReadBytes() }
        return String(line.dropLast(line.hasSuffix("\r\n") ? 2 : 1))
    }

    mutating func expect(_ codes: Set<Int>, _ what: String) async throws {
        let (code, line) = try await reply()
        guard codes.contains(code) else { throw LoadError("\(what): \(line)") }
    }
}

/// One SMTP connection, after the greeting and EHLO.
struct Session {
    var reader: ReplyReader
    let outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>

    static func greet(_ reader: inout ReplyReader, _ outbound: NIOAsyncChannelOutboundWriter<ByteBuffer>) async throws {
        try await reader.expect([220], "greeting")
        try await outbound.write(ByteBuffer(string: "EHLO load.invalid\r\n"))
        try await reader.expect([250], "EHLO")
    }

    /// One transaction without pipelining.
    mutating func send(_ message: ByteBuffer, options: Options) async throws {
        try await outbound.write(ByteBuffer(string: "MAIL FROM:<\(options.sender)>\r\n"))
        try await reader.expect([250], "MAIL")
        try await outbound.write(ByteBuffer(string: "RCPT TO:<\(options.recipient)>\r\n"))
        try await reader.expect([250, 251], "RCPT")
        try await outbound.write(ByteBuffer(string: "DATA\r\n"))
        try await reader.expect([354], "DATA")
        try await outbound.write(message)
        try await reader.expect([250], "end of data")
    }

    mutating func quit() async {
        try? await outbound.write(ByteBuffer(string: "QUIT\r\n"))
        _ = try? await reader.reply()
    }
}

/// What one session did.
struct Tally: Sendable {
    var latencies: [Double] = []  // milliseconds
    var errors: [String] = []
}

final class Shared: Sendable {
    let next = Atomic<Int>(0)
    let options: Options
    let message: ByteBuffer
    let start: ContinuousClock.Instant
    init(options: Options, start: ContinuousClock.Instant) {
        self.options = options
        self.start = start
        message = makeMessage(size: options.size, sender: options.sender, recipient: options.recipient)
    }

    /// The next message number, or nil when all are taken.
    func take() -> Int? {
        let n = next.wrappingAdd(1, ordering: .relaxed).oldValue
        return n < options.messages ? n : nil
    }

    /// Open loop: waits until message n is due and returns that instant; closed loop: now.
    func due(_ n: Int) async throws -> ContinuousClock.Instant {
        guard options.rate > 0 else { return .now }
        let due = start.advanced(by: .nanoseconds(Int64(Double(n) / options.rate * 1e9)))
        if due > .now { try await Task.sleep(until: due, clock: .continuous) }
        return due
    }
}

func milliseconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) * 1000 + Double(duration.components.attoseconds) / 1e15
}

func connect(_ options: Options, group: any EventLoopGroup) async throws -> NIOAsyncChannel<ByteBuffer, ByteBuffer> {
    try await ClientBootstrap(group: group)
        .channelOption(ChannelOptions.tcpOption(.tcp_nodelay), value: 1)
        .connect(host: options.host, port: options.port) { channel in
            channel.eventLoop.makeCompletedFuture {
                try NIOAsyncChannel<ByteBuffer, ByteBuffer>(wrappingChannelSynchronously: channel)
            }
        }
}

/// Sends messages on one connection until there are none left (or, without --reuse, one).
/// Returns false when the connection failed and should not be used again.
func runConnection(_ shared: Shared, group: any EventLoopGroup) async -> (ok: Bool, tally: Tally) {
    let options = shared.options
    do {
        let channel = try await connect(options, group: group)
        return try await channel.executeThenClose { inbound, outbound in
            var tally = Tally()
            var reader = ReplyReader(iterator: inbound.makeAsyncIterator())
            try await Session.greet(&reader, outbound)
            var session = Session(reader: reader, outbound: outbound)
            while let n = shared.take() {
                let started = try await shared.due(n)
                do {
                    try await session.send(shared.message, options: options)
                    tally.latencies.append(milliseconds(started.duration(to: .now)))
                } catch {
                    tally.errors.append("message \(n): \(error)")
                    return (false, tally)
                }
                if !options.reuse { break }
            }
            await session.quit()
            return (true, tally)
        }
    } catch {
        return (false, Tally(errors: ["session: \(error)"]))
    }
}

func runSession(_ shared: Shared, group: any EventLoopGroup) async -> Tally {
    var tally = Tally()
    while shared.next.load(ordering: .relaxed) < shared.options.messages {
        let (ok, more) = await runConnection(shared, group: group)
        tally.latencies += more.latencies
        tally.errors += more.errors
        if !ok && tally.errors.count > 100 { break }
    }
    return tally
}

func percentile(_ sorted: [Double], _ p: Double) -> Double? {
    guard !sorted.isEmpty else { return nil }
    // Nearest rank: the smallest value with at least p % of the values at or below it.
    let k = Int((p / 100 * Double(sorted.count)).rounded(.up)) - 1
    return sorted[max(0, min(sorted.count - 1, k))]
}

func json(_ value: Double?) -> String {
    guard let value else { return "null" }
    return "\((value * 1000).rounded() / 1000)"
}

func jsonString(_ text: String) -> String {
    var out = "\""
    for scalar in text.unicodeScalars {
        switch scalar {
        case "\"": out += "\\\""
        case "\\": out += "\\\\"
        case _ where scalar.value < 0x20: out += "\\u" + String(repeating: "0", count: 4 - String(scalar.value, radix: 16).count) + String(scalar.value, radix: 16)
        default: out.unicodeScalars.append(scalar)
        }
    }
    return out + "\""
}

/// Runs the load and prints the summary; the exit status.
func runLoad(_ options: Options) async -> Int32 {
    let start = ContinuousClock.now
    let shared = Shared(options: options, start: start)
    let group = MultiThreadedEventLoopGroup.singleton
    let tallies = await withTaskGroup(of: Tally.self) { tasks in
        for _ in 0..<options.sessions {
            tasks.addTask { await runSession(shared, group: group) }
        }
        var all: [Tally] = []
        for await tally in tasks { all.append(tally) }
        return all
    }
    let elapsed = milliseconds(start.duration(to: .now)) / 1000
    let latencies = tallies.flatMap(\.latencies).sorted()
    let errors = tallies.flatMap(\.errors)
    let mean = latencies.isEmpty ? nil : latencies.reduce(0, +) / Double(latencies.count)
    let rate = elapsed > 0 ? (Double(latencies.count) / elapsed * 10).rounded() / 10 : 0
    print(
        """
        {"messages": \(latencies.count), "errors": \(errors.count), "first_error": \(errors.first.map(jsonString) ?? "null"), \
        "elapsed_s": \(json(elapsed)), "msgs_per_s": \(rate), "generator": "mailtier-load", \
        "latency_ms": {"p50": \(json(percentile(latencies, 50))), "p95": \(json(percentile(latencies, 95))), \
        "p99": \(json(percentile(latencies, 99))), "max": \(json(latencies.last)), "mean": \(json(mean))}}
        """)
    return errors.isEmpty ? 0 : 1
}

do {
    let options = try Options(Array(CommandLine.arguments.dropFirst()))
    exit(await runLoad(options))
} catch {
    var text = "mailtier-load: \(error)\n"
    text.withUTF8 { _ = write(2, $0.baseAddress, $0.count) }
    exit(2)
}
