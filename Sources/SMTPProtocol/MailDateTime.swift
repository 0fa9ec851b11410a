/// A UTC instant broken into calendar fields, and the forms mail headers (RFC 5322 §3.3), mbox
/// `From ` lines and logs write it in. Pure arithmetic on seconds since 1970-01-01T00:00:00Z
/// (proleptic Gregorian calendar, no leap seconds, like POSIX `gmtime`), so that this module
/// needs no Foundation and no clock: the caller passes the time in.
public struct MailDateTime: Sendable, Hashable {
    public var secondsSince1970: Int64
    public let year: Int64
    /// 1…12.
    public let month: Int
    /// 1…31.
    public let day: Int
    public let hour: Int
    public let minute: Int
    public let second: Int
    /// 0 = Sunday … 6 = Saturday.
    public let weekday: Int

    private static let days = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"]
    private static let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]

    public init(secondsSince1970 seconds: Int64) {
        self.secondsSince1970 = seconds
        let (days, secondOfDay) = Self.floorDivide(seconds, 86_400)
        hour = Int(secondOfDay / 3600)
        minute = Int(secondOfDay % 3600 / 60)
        second = Int(secondOfDay % 60)
        weekday = Int(Self.floorDivide(days + 4, 7).remainder)  // 1970-01-01 was a Thursday.
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468
        let era = Self.floorDivide(z, 146_097).quotient
        let dayOfEra = z - era * 146_097
        let yearOfEra = (dayOfEra - dayOfEra / 1460 + dayOfEra / 36_524 - dayOfEra / 146_096) / 365
        let dayOfYear = dayOfEra - (365 * yearOfEra + yearOfEra / 4 - yearOfEra / 100)
        let shiftedMonth = (5 * dayOfYear + 2) / 153
        day = Int(dayOfYear - (153 * shiftedMonth + 2) / 5 + 1)
        month = Int(shiftedMonth < 10 ? shiftedMonth + 3 : shiftedMonth - 9)
        year = yearOfEra + era * 400 + (month <= 2 ? 1 : 0)
    }

    private static func floorDivide(_ value: Int64, _ divisor: Int64) -> (quotient: Int64, remainder: Int64) {
        let quotient = value >= 0 ? value / divisor : -((-value + divisor - 1) / divisor)
        return (quotient, value - quotient * divisor)
    }

    private static func two(_ value: Int) -> String { value < 10 ? "0\(value)" : "\(value)" }

    private var time: String { "\(Self.two(hour)):\(Self.two(minute)):\(Self.two(second))" }

    /// `Wed, 25 Nov 2026 08:36:51 +0000` (RFC 5322 §3.3 `date-time`).
    public var rfc5322: String {
        "\(Self.days[weekday]), \(day) \(Self.months[month - 1]) \(year) \(time) +0000"
    }

    /// `Wed Nov 25 08:36:51 2026` (asctime, for mbox `From ` lines).
    public var asctime: String {
        let paddedDay = day < 10 ? " \(day)" : "\(day)"
        return "\(Self.days[weekday]) \(Self.months[month - 1]) \(paddedDay) \(time) \(year)"
    }

    /// `2025-10-20`.
    public var isoDay: String { "\(year)-\(Self.two(month))-\(Self.two(day))" }

    /// `2025-10-20 10:30:00`.
    public var isoDayAndTime: String { "\(isoDay) \(time)" }

    /// `2025-10-20T10:30:00Z`.
    public var iso8601: String { "\(isoDay)T\(time)Z" }
}
