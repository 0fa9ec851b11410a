#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
#if canImport(Glibc)
import Glibc
#endif
import NIOConcurrencyHelpers
import SMTPProtocol

/// Queue ids: `msg_` and 20 random base32 characters (100 bits).
public enum MessageID {
    private static let alphabet = Array("abcdefghijklmnopqrstuvwxyz234567".utf8)

    /// 20 characters of 5 random bits each, from two draws of the system generator (one
    /// `getrandom` each; drawing every character on its own cost 20 system calls per id).
    public static func make() -> String {
        var generator = SystemRandomNumberGenerator()
        var bits = (generator.next() as UInt64, generator.next() as UInt64)
        var bytes = [UInt8](repeating: 0, count: 20)
        for index in bytes.indices {
            if index == 12 { bits.0 = bits.1 }  // 12 × 5 = 60 bits from the first draw, 40 from the second
            bytes[index] = alphabet[Int(bits.0 & 31)]
            bits.0 >>= 5
        }
        return "msg_" + String(decoding: bytes, as: UTF8.self)
    }
}

/// Dates as mail headers (RFC 5322 §3.3) and logs want them, without DateFormatter. The
/// arithmetic lives in `SMTPProtocol.MailDateTime` (pure, so the DSN builder can use it);
/// this keeps the `Date`-taking API for the rest of the tier.
public enum MailDate {
    private static func components(_ date: Date) -> MailDateTime {
        MailDateTime(secondsSince1970: Int64(date.timeIntervalSince1970.rounded(.down)))
    }

    /// `Wed, 25 Nov 2026 08:36:51 +0000`.
    public static func rfc5322(_ date: Date) -> String { components(date).rfc5322 }

    /// `Wed Nov 25 08:36:51 2026` (asctime, for mbox `From ` lines).
    public static func asctime(_ date: Date) -> String { components(date).asctime }

    /// `2025-10-20`.
    public static func day(_ date: Date) -> String { components(date).isoDay }

    /// `2025-10-20 10:30:00`.
    public static func dayAndTime(_ date: Date) -> String { components(date).isoDayAndTime }

    /// `2025-10-20T10:30:00Z`.
    public static func iso8601(_ date: Date) -> String { components(date).iso8601 }
}

/// Wakes a waiting loop; a ring with nobody waiting is remembered once.
public final class Doorbell: Sendable {
    private struct State {
        var rung = false
        var waiter: CheckedContinuation<Void, Never>?
    }

    private let state = NIOLockedValueBox(State())

    public init() {}

    public func ring() {
        let waiter = state.withLockedValue { state -> CheckedContinuation<Void, Never>? in
            if let waiter = state.waiter {
                state.waiter = nil
                return waiter
            }
            state.rung = true
            return nil
        }
        waiter?.resume()
    }

    /// Returns when rung, when `timeout` has passed, or when the task is cancelled.
    public func wait(timeout: Duration) async {
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.waitForRing() }
            group.addTask { try? await Task.sleep(for: timeout) }
            await group.next()
            group.cancelAll()
        }
    }

    private func waitForRing() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLockedValue { state -> Bool in
                    if state.rung || Task.isCancelled {
                        state.rung = false
                        return true
                    }
                    state.waiter = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            let waiter = state.withLockedValue { state -> CheckedContinuation<Void, Never>? in
                defer { state.waiter = nil }
                return state.waiter
            }
            waiter?.resume()
        }
    }
}

/// The first of several values offered from different tasks; later offers are dropped.
public final class FirstOffer<Value: Sendable>: Sendable {
    private struct State {
        var value: Value?
        var waiter: CheckedContinuation<Value, Never>?
    }

    private let state = NIOLockedValueBox(State())

    public init() {}

    public func offer(_ value: Value) {
        let waiter = state.withLockedValue { state -> CheckedContinuation<Value, Never>? in
            guard state.value == nil else { return nil }
            state.value = value
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: value)
    }

    /// Waits for the first offer (one caller only).
    public func value() async -> Value {
        await withCheckedContinuation { continuation in
            let ready = state.withLockedValue { state -> Value? in
                if let value = state.value { return value }
                state.waiter = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }
}
