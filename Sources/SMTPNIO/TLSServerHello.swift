import NIOCore

/// The cipher suite the server chose, read from its ServerHello on the wire.
///
/// swift-nio-ssl gives the negotiated TLS version through public API (`nioSSL_tlsVersion()`) but
/// not the cipher suite. The ServerHello is sent in the clear in every TLS version (RFC 8446 §4.1.3,
/// RFC 5246 §7.4.1.3) and is the first handshake message the server writes, so it is read from the
/// server's first outbound TLS record: record header (5 octets: type 22, version, length),
/// handshake header (4 octets: type 2, length), legacy_version (2), random (32),
/// legacy_session_id (1 + ≤ 32), cipher_suite (2).
enum TLSServerHello {
    enum Outcome: Sendable, Hashable {
        case needMoreData
        case cipherSuite(UInt16)
        /// The bytes are not a ServerHello record: give up (no cipher is reported).
        case unrecognised
    }

    /// Looks for the cipher suite in the first octets the server sent after STARTTLS.
    static func cipherSuite(in bytes: [UInt8]) -> Outcome {
        let check: [(offset: Int, valid: (UInt8) -> Bool)] = [
            (0, { $0 == 22 }),  // ContentType.handshake
            (1, { $0 == 3 }),  // record version 3.x
            (5, { $0 == 2 }),  // HandshakeType.server_hello
        ]
        for (offset, valid) in check where offset < bytes.count {
            if !valid(bytes[offset]) { return .unrecognised }
        }
        let sessionIDLengthOffset = 5 + 4 + 2 + 32
        guard bytes.count > sessionIDLengthOffset else { return .needMoreData }
        let sessionIDLength = Int(bytes[sessionIDLengthOffset])
        guard sessionIDLength <= 32 else { return .unrecognised }
        let cipherOffset = sessionIDLengthOffset + 1 + sessionIDLength
        let recordLength = Int(bytes[3]) << 8 | Int(bytes[4])
        guard cipherOffset + 2 <= 5 + recordLength else { return .unrecognised }
        guard bytes.count >= cipherOffset + 2 else { return .needMoreData }
        return .cipherSuite(UInt16(bytes[cipherOffset]) << 8 | UInt16(bytes[cipherOffset + 1]))
    }

    /// The IANA name of the suites BoringSSL can negotiate (those `NIOTLSCipher` lists); nil for others.
    static func name(ofCipherSuite code: UInt16) -> String? {
        switch code {
        case 0x1301: "TLS_AES_128_GCM_SHA256"
        case 0x1302: "TLS_AES_256_GCM_SHA384"
        case 0x1303: "TLS_CHACHA20_POLY1305_SHA256"
        case 0x002F: "TLS_RSA_WITH_AES_128_CBC_SHA"
        case 0x0035: "TLS_RSA_WITH_AES_256_CBC_SHA"
        case 0x009C: "TLS_RSA_WITH_AES_128_GCM_SHA256"
        case 0x009D: "TLS_RSA_WITH_AES_256_GCM_SHA384"
        case 0xC009: "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA"
        case 0xC00A: "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA"
        case 0xC013: "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA"
        case 0xC014: "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA"
        case 0xC02B: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
        case 0xC02C: "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"
        case 0xC02F: "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"
        case 0xC030: "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384"
        case 0xCCA8: "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256"
        case 0xCCA9: "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"
        default: nil
        }
    }
}

/// Sits between the socket and the `NIOSSLHandler` while the handshake runs and reads the cipher
/// suite from the server's ServerHello (`TLSServerHello`). It only looks: every write passes on
/// unchanged. The session handler reads `cipherSuite` when the handshake completes and removes it.
final class TLSServerHelloSniffer: ChannelOutboundHandler, RemovableChannelHandler {
    typealias OutboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var seen: [UInt8] = []
    private var done = false
    /// The negotiated suite's IANA code, once seen.
    private(set) var cipherSuite: UInt16?

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        if !done {
            let buffer = unwrapOutboundIn(data)
            seen += buffer.readableBytesView.prefix(80 - seen.count)
            switch TLSServerHello.cipherSuite(in: seen) {
            case .needMoreData:
                if seen.count >= 80 { done = true }
            case .cipherSuite(let code):
                cipherSuite = code
                done = true
            case .unrecognised:
                done = true
            }
            if done { seen = [] }
        }
        context.write(data, promise: promise)
    }
}
