import Logging
import NIOCore
import NIOEmbedded
import SMTPProtocol
import Synchronization
import Testing

@testable import SMTPNIO

/// Accepts content holding "accept", refuses the rest (451), and records every receipt.
private final class CountingDelegate: SMTPServerDelegate {
    let receipts = Mutex<[SMTPMessageReceipt]>([])

    func authenticate(login: String, password: String, session: SMTPSessionInfo) async throws -> String? { nil }
    func checkRecipient(_ recipient: ForwardPath, envelope: Envelope, session: SMTPSessionInfo) async -> SMTPReply? { nil }
    func deliver(_ envelope: Envelope, content: ByteBuffer, session: SMTPSessionInfo) async -> SMTPDeliveryOutcome {
        String(buffer: content).contains("accept") ? .queued("msg_1") : .rejected(.storageFailure)
    }
    func etrn(domain: String, session: SMTPSessionInfo) async -> SMTPReply { .tlsNotAvailable }
    func atrn(domains: [String], user: String, session: SMTPSessionInfo) async -> SMTPATRNDecision { .reply(.tlsNotAvailable) }
    func messageReceived(_ receipt: SMTPMessageReceipt) { receipts.withLock { $0.append(receipt) } }
}

@Suite("SMTP session: message receipts for the metrics", .timeLimit(.minutes(1)))
struct MessageReceiptTests {
    /// A session on a testing channel; `send` writes input and reads until `reply` arrives.
    private struct Session {
        let channel = NIOAsyncTestingChannel()
        let delegate = CountingDelegate()

        init() async throws {
            let delegate = self.delegate
            try await channel.testingEventLoop.executeInContext { [channel] in
                let configuration = SMTPServerConfiguration(
                    hostname: "mx.example.test", maxMessageSize: 1024, maxRecipients: 10, tlsAvailable: false,
                    authRequired: false, deliverByMinimum: 86_400)
                try channel.pipeline.syncOperations.addHandler(
                    SMTPServerHandler(configuration: configuration, delegate: delegate, tlsContext: nil, logger: Logger(label: "receipts")))
            }
            try await channel.connect(to: SocketAddress(ipAddress: "198.51.100.9", port: 1025))
            _ = try await read(until: "220 ")
        }

        func read(until reply: String) async throws -> String {
            var text = ""
            while !text.contains(reply) {
                text += String(buffer: try await channel.waitForOutboundWrite(as: ByteBuffer.self))
            }
            return text
        }

        @discardableResult
        func send(_ input: String, until reply: String) async throws -> String {
            try await channel.writeInbound(ByteBuffer(string: input))
            return try await read(until: reply)
        }

        var receipts: [SMTPMessageReceipt] { delegate.receipts.withLock { $0 } }
    }

    private let envelope = "MAIL FROM:<a@example.test>\r\nRCPT TO:<b@example.test>\r\n"

    @Test("DATA: accepted and refused by the delegate with their size; refused by the server itself without one")
    func data() async throws {
        let session = try await Session()
        try await session.send("EHLO client.test\r\n", until: "250 ")
        let accepted = "Subject: a\r\n\r\naccept\r\n"
        try await session.send(envelope + "DATA\r\n", until: "354 ")
        try await session.send(accepted + ".\r\n", until: "250 2.0.0 Ok: queued as msg_1")
        try await session.send(envelope + "DATA\r\n", until: "354 ")
        try await session.send("Subject: b\r\n\r\nrefuse\r\n.\r\n", until: "451 4.3.0")
        try await session.send(envelope + "DATA\r\n", until: "354 ")
        try await session.send("Subject: c\r\n\r\nbare\nfeed\r\n.\r\n", until: "554 5.6.0")
        try await session.send(envelope + "DATA\r\n", until: "354 ")
        try await session.send(String(repeating: "x", count: 2000) + "\r\n.\r\n", until: "552 ")

        let receipts = session.receipts
        #expect(receipts.map(\.accepted) == [true, false, false, false])
        #expect(receipts.map(\.sizeBytes) == [accepted.utf8.count, "Subject: b\r\n\r\nrefuse\r\n".utf8.count, nil, nil])
        #expect(receipts.allSatisfy { $0.processing >= .zero && $0.processing < .seconds(30) })
        _ = try await session.channel.finish()
    }

    @Test("BDAT: one receipt for the whole message at LAST, none for the chunks before it")
    func bdat() async throws {
        let session = try await Session()
        try await session.send("EHLO client.test\r\n", until: "250 ")
        try await session.send(envelope, until: "250 2.1.5")
        try await session.send("BDAT 7\r\naccept ", until: "250 2.0.0 7 octets")
        #expect(session.receipts.isEmpty)
        try await session.send("BDAT 6 LAST\r\nagain!", until: "250 2.0.0 Ok: queued as msg_1")
        // Over SIZE: refused at its chunk, without a size.
        try await session.send(envelope, until: "250 2.1.5")
        try await session.send("BDAT 2000 LAST\r\n" + String(repeating: "y", count: 2000), until: "552 ")

        #expect(session.receipts.map(\.accepted) == [true, false])
        #expect(session.receipts.map(\.sizeBytes) == [13, nil])
        _ = try await session.channel.finish()
    }
}
