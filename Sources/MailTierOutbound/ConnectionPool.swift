import NIOCore
import SMTPNIO

/// SMTP sessions kept open per destination (MX host or relay) for the next message, with at
/// most `limit` connections (busy or idle) per destination: a caller beyond it waits.
///
/// A session taken from the pool is checked with RSET first (RFC 5321 §4.1.1.5 — which also
/// clears any state the last transaction left); one that does not answer 250 is closed and
/// replaced by a new connection.
actor ConnectionPool {
    struct Lease: Sendable {
        let destination: SMTPRemoteTransport.Destination
        let session: SMTPClientSession
    }

    struct ShutDown: Error, CustomStringConvertible {
        var description: String { "outbound SMTP is shutting down" }
    }

    private struct Idle {
        var session: SMTPClientSession
        var since: ContinuousClock.Instant
    }

    private let limit: Int
    private let idleTimeout: Duration
    private var idle: [SMTPRemoteTransport.Destination: [Idle]] = [:]
    /// Open connections per destination, busy or idle (or being opened).
    private var live: [SMTPRemoteTransport.Destination: Int] = [:]
    private var waiters: [SMTPRemoteTransport.Destination: [CheckedContinuation<Void, Never>]] = [:]
    private var isShutDown = false

    init(limit: Int, idleTimeout: Duration) {
        self.limit = limit
        self.idleTimeout = idleTimeout
    }

    /// An idle session to `destination` that still answers, or a new one from `open`, once the
    /// destination has fewer than `limit` connections.
    func checkout(
        _ destination: SMTPRemoteTransport.Destination, open: @Sendable () async throws -> SMTPClientSession
    ) async throws -> Lease {
        while true {
            guard !isShutDown else { throw ShutDown() }
            if let entry = idle[destination]?.popLast() {
                if ContinuousClock.now - entry.since < idleTimeout, await entry.session.reset() {
                    return Lease(destination: destination, session: entry.session)
                }
                await entry.session.connection.close()
                release(destination)
                continue
            }
            if live[destination, default: 0] < limit {
                live[destination, default: 0] += 1
                do {
                    return Lease(destination: destination, session: try await open())
                } catch {
                    release(destination)
                    throw error
                }
            }
            await withCheckedContinuation { waiters[destination, default: []].append($0) }
        }
    }

    /// Back to the pool after a transaction (the connection works).
    func checkin(_ lease: Lease) async {
        guard !isShutDown else {
            release(lease.destination)
            await lease.session.quit()
            return
        }
        idle[lease.destination, default: []].append(Idle(session: lease.session, since: .now))
        wakeOne(lease.destination)
    }

    /// The connection failed: close it and free its place.
    func discard(_ lease: Lease) async {
        release(lease.destination)
        await lease.session.connection.close()
    }

    /// QUITs sessions idle for `age` or longer.
    func closeIdle(olderThan age: Duration) async {
        let now = ContinuousClock.now
        var stale: [SMTPClientSession] = []
        for (destination, entries) in idle {
            let (old, fresh) = (entries.filter { now - $0.since >= age }, entries.filter { now - $0.since < age })
            guard !old.isEmpty else { continue }
            idle[destination] = fresh
            for entry in old {
                stale.append(entry.session)
                release(destination)
            }
        }
        for session in stale { await session.quit() }
    }

    /// Refuses new checkouts, wakes every waiter and QUITs every idle session.
    func shutdown() async {
        isShutDown = true
        let sessions = idle.values.flatMap { $0.map(\.session) }
        idle = [:]
        live = [:]
        for continuation in waiters.values.flatMap({ $0 }) { continuation.resume() }
        waiters = [:]
        for session in sessions { await session.quit() }
    }

    /// Number of open connections to `destination` (tests, logs).
    func connectionCount(_ destination: SMTPRemoteTransport.Destination) -> Int { live[destination, default: 0] }

    private func release(_ destination: SMTPRemoteTransport.Destination) {
        live[destination, default: 0] = max(0, live[destination, default: 0] - 1)
        wakeOne(destination)
    }

    private func wakeOne(_ destination: SMTPRemoteTransport.Destination) {
        guard var queue = waiters[destination], !queue.isEmpty else { return }
        queue.removeFirst().resume()
        waiters[destination] = queue
    }
}
