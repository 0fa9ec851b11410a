#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Testing

@testable import SMTPProtocol

@Suite("MailDateTime (pure calendar arithmetic)")
struct MailDateTimeTests {
    @Test("Known instants in every form")
    func knownInstants() {
        let instant = MailDateTime(secondsSince1970: 1_795_595_811)  // 2026-11-25 08:36:51 UTC
        #expect(instant.rfc5322 == "Wed, 25 Nov 2026 08:36:51 +0000")
        #expect(instant.asctime == "Wed Nov 25 08:36:51 2026")
        #expect(instant.isoDay == "2026-11-25")
        #expect(instant.isoDayAndTime == "2026-11-25 08:36:51")
        #expect(instant.iso8601 == "2026-11-25T08:36:51Z")
        #expect(MailDateTime(secondsSince1970: 0).rfc5322 == "Thu, 1 Jan 1970 00:00:00 +0000")
        #expect(MailDateTime(secondsSince1970: 0).asctime == "Thu Jan  1 00:00:00 1970")
        #expect(MailDateTime(secondsSince1970: -1).iso8601 == "1969-12-31T23:59:59Z")
        #expect(MailDateTime(secondsSince1970: 951_782_400).isoDay == "2000-02-29")
        #expect(MailDateTime(secondsSince1970: 4_107_542_400).rfc5322 == "Mon, 1 Mar 2100 00:00:00 +0000")
    }

    @Test("Agrees with gmtime over 200 years, both sides of the epoch")
    func agreesWithGmtime() {
        var generator = SystemRandomNumberGenerator()
        var samples: [Int64] = [0, -1, 86_399, 86_400, 951_868_799, 951_868_800, 4_102_444_800]
        for _ in 0..<5000 { samples.append(Int64.random(in: -3_155_760_000...3_155_760_000, using: &generator)) }
        for seconds in samples {
            var time = time_t(seconds)
            var parts = tm()
            gmtime_r(&time, &parts)
            let ours = MailDateTime(secondsSince1970: seconds)
            #expect(ours.year == Int64(parts.tm_year) + 1900, "\(seconds)")
            #expect(ours.month == Int(parts.tm_mon) + 1, "\(seconds)")
            #expect(ours.day == Int(parts.tm_mday), "\(seconds)")
            #expect(ours.hour == Int(parts.tm_hour), "\(seconds)")
            #expect(ours.minute == Int(parts.tm_min), "\(seconds)")
            #expect(ours.second == Int(parts.tm_sec), "\(seconds)")
            #expect(ours.weekday == Int(parts.tm_wday), "\(seconds)")
        }
    }
}
