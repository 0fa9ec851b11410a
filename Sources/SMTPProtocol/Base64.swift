/// RFC 4648 base64, as SMTP AUTH (RFC 4954 §4) uses it. NIOCore has no public codec,
/// and this module must not import Foundation.
public enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    private static let decodeTable: [Int8] = {
        var table = [Int8](repeating: -1, count: 256)
        for (index, byte) in alphabet.enumerated() { table[Int(byte)] = Int8(index) }
        return table
    }()

    public static func encode<Bytes: Collection>(_ bytes: Bytes) -> String where Bytes.Element == UInt8 {
        var output = [UInt8]()
        output.reserveCapacity((bytes.count + 2) / 3 * 4)
        var iterator = bytes.makeIterator()
        while let first = iterator.next() {
            let second = iterator.next()
            let third = iterator.next()
            output.append(alphabet[Int(first >> 2)])
            output.append(alphabet[Int((first & 0x03) << 4 | (second ?? 0) >> 4)])
            output.append(second.map { alphabet[Int(($0 & 0x0F) << 2 | (third ?? 0) >> 6)] } ?? UInt8(ascii: "="))
            output.append(third.map { alphabet[Int($0 & 0x3F)] } ?? UInt8(ascii: "="))
        }
        return String(decoding: output, as: UTF8.self)
    }

    /// Strict decoding: canonical padding required, no whitespace. Nil when the input is not base64.
    public static func decode<Bytes: Collection>(_ encoded: Bytes) -> [UInt8]? where Bytes.Element == UInt8 {
        let input = Array(encoded)
        guard input.count % 4 == 0 else { return nil }
        var output = [UInt8]()
        output.reserveCapacity(input.count / 4 * 3)
        var index = 0
        while index < input.count {
            let isLast = index + 4 == input.count
            var values = [Int](repeating: 0, count: 4)
            var padding = 0
            for offset in 0..<4 {
                let byte = input[index + offset]
                if byte == UInt8(ascii: "=") {
                    guard isLast, offset >= 2 else { return nil }
                    padding += 1
                    continue
                }
                guard padding == 0 else { return nil }
                let value = decodeTable[Int(byte)]
                guard value >= 0 else { return nil }
                values[offset] = Int(value)
            }
            let combined = values[0] << 18 | values[1] << 12 | values[2] << 6 | values[3]
            output.append(UInt8((combined >> 16) & 0xFF))
            if padding < 2 { output.append(UInt8((combined >> 8) & 0xFF)) }
            if padding < 1 { output.append(UInt8(combined & 0xFF)) }
            index += 4
        }
        return output
    }
}
