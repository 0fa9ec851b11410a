import SMTPNIO
import Testing

@Suite("CIDR")
struct CIDRTests {
    @Test("IPv4 networks: prefix masking, membership, bare addresses are /32")
    func ipv4() throws {
        let net = try #require(CIDR("10.1.2.3/8"))
        #expect(net.description == "10.0.0.0/8")
        #expect(net.contains("10.255.0.1"))
        #expect(!net.contains("11.0.0.1"))
        #expect(!net.contains("not an address"))
        let host = try #require(CIDR("127.0.0.1"))
        #expect(host.prefixLength == 32)
        #expect(host.contains("127.0.0.1"))
        #expect(!host.contains("127.0.0.2"))
        #expect(try #require(CIDR("0.0.0.0/0")).contains("203.0.113.7"))
        #expect(try #require(CIDR("192.168.1.128/25")).contains("192.168.1.200"))
        #expect(!(try #require(CIDR("192.168.1.128/25")).contains("192.168.1.100")))
    }

    @Test("IPv6 networks, and IPv4-mapped IPv6 clients match IPv4 networks")
    func ipv6() throws {
        let net = try #require(CIDR("fd00::/8"))
        #expect(net.contains("fd12:3456::1"))
        #expect(!net.contains("fe80::1"))
        #expect(!net.contains("10.0.0.1"))
        #expect(try #require(CIDR("10.0.0.0/8")).contains("::ffff:10.9.8.7"))
        #expect(try #require(CIDR("::1")).contains("::1"))
        #expect([CIDR("10.0.0.0/8")!, CIDR("::1")!].containsAddress("::1"))
    }

    @Test("malformed networks are refused", arguments: ["", "10.0.0.0/33", "::/129", "10.0.0/8", "10.0.0.0/", "10.0.0.0/-1", "host/8", "10.0.0.0/8/8", "10.0.0.0/٨"])
    func malformed(_ text: String) {
        #expect(CIDR(text) == nil)
    }
}
