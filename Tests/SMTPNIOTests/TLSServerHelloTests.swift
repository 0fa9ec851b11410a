import NIOCore
import NIOEmbedded
import Testing

@testable import SMTPNIO

/// A ServerHello record as BoringSSL writes it: record header, handshake header, legacy_version,
/// random, a 32-octet session id, the cipher suite, compression, extensions.
private func serverHello(cipherSuite: UInt16, sessionIDLength: Int = 32) -> [UInt8] {
    var body: [UInt8] = [0x03, 0x03] + Array(repeating: 0xAB, count: 32)
    body += [UInt8(sessionIDLength)] + Array(repeating: 0xCD, count: sessionIDLength)
    body += [UInt8(cipherSuite >> 8), UInt8(cipherSuite & 0xFF), 0x00]
    body += [0x00, 0x06, 0x00, 0x2B, 0x00, 0x02, 0x03, 0x04]  // supported_versions: TLS 1.3
    let handshake: [UInt8] = [0x02, 0x00, UInt8(body.count >> 8), UInt8(body.count & 0xFF)] + body
    return [0x16, 0x03, 0x03, UInt8(handshake.count >> 8), UInt8(handshake.count & 0xFF)] + handshake
}

@Suite("TLS ServerHello: the negotiated cipher suite")
struct TLSServerHelloTests {
    @Test("the cipher suite is found once its two octets are there, whatever the session id length")
    func cipherSuite() {
        for sessionIDLength in [0, 16, 32] {
            let hello = serverHello(cipherSuite: 0x1302, sessionIDLength: sessionIDLength)
            let cipherEnd = 5 + 4 + 2 + 32 + 1 + sessionIDLength + 2
            for count in 0..<cipherEnd {
                #expect(TLSServerHello.cipherSuite(in: Array(hello.prefix(count))) == .needMoreData, "\(count) octets")
            }
            #expect(TLSServerHello.cipherSuite(in: Array(hello.prefix(cipherEnd))) == .cipherSuite(0x1302))
            #expect(TLSServerHello.cipherSuite(in: hello) == .cipherSuite(0x1302))
        }
        #expect(TLSServerHello.name(ofCipherSuite: 0x1302) == "TLS_AES_256_GCM_SHA384")
        #expect(TLSServerHello.name(ofCipherSuite: 0xC02F) == "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256")
        #expect(TLSServerHello.name(ofCipherSuite: 0x0000) == nil)
    }

    @Test("anything else is not read as a ServerHello")
    func notAServerHello() {
        var alert = serverHello(cipherSuite: 0x1301)
        alert[0] = 21
        #expect(TLSServerHello.cipherSuite(in: alert) == .unrecognised)
        var clientHello = serverHello(cipherSuite: 0x1301)
        clientHello[5] = 1
        #expect(TLSServerHello.cipherSuite(in: clientHello) == .unrecognised)
        var longSessionID = serverHello(cipherSuite: 0x1301)
        longSessionID[43] = 33
        #expect(TLSServerHello.cipherSuite(in: longSessionID) == .unrecognised)
        var shortRecord = serverHello(cipherSuite: 0x1301)
        shortRecord[3] = 0
        shortRecord[4] = 40
        #expect(TLSServerHello.cipherSuite(in: shortRecord) == .unrecognised)
    }

    @Test("the sniffer passes every write on unchanged and remembers the suite, across writes")
    func sniffer() throws {
        let sniffer = TLSServerHelloSniffer()
        let channel = EmbeddedChannel(handler: sniffer)
        let hello = serverHello(cipherSuite: 0xCCA8) + [0x17, 0x03, 0x03, 0x00, 0x01, 0x00]
        for piece in [hello.prefix(3), hello.dropFirst(3).prefix(50), hello.dropFirst(53)] {
            try channel.writeOutbound(ByteBuffer(bytes: piece))
        }
        var out: [UInt8] = []
        while let buffer = try channel.readOutbound(as: ByteBuffer.self) { out += buffer.readableBytesView }
        #expect(out == hello)
        #expect(sniffer.cipherSuite == 0xCCA8)
        _ = try channel.finish()
    }
}
