#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import MailTier
import PostgresNIO

/// The webhook outbox (`events` of `PostgresDatabase.migrations`, version 2) in PostgreSQL, for
/// many sender processes at once: a claim locks due rows with `FOR UPDATE SKIP LOCKED` and moves
/// their `next_attempt` to the lease's end in the same statement, so two nodes never post one
/// event at the same time and never wait for each other; each claim counts the attempt, which
/// fences the result (`WHERE id = $1 AND attempts = $2`).
public struct PostgresEventOutbox: EventOutbox {
    public let database: PostgresDatabase

    public init(database: PostgresDatabase) {
        self.database = database
    }

    /// Inserts `events` inside the caller's transaction: due at once.
    public static func insert(_ events: [OutboxEvent], _ transaction: PostgresTransaction) async throws {
        guard !events.isEmpty else { return }
        try await transaction.query(insertQuery(events))
    }

    static func insertQuery(_ events: [OutboxEvent]) -> PostgresQuery {
        let clean = PostgresSearchText.withoutNUL
        return """
            INSERT INTO events (id, type, payload, created_at, next_attempt)
            SELECT e.id, e.type, e.payload, e.created_at, e.created_at
            FROM unnest(\(events.map(\.id))::text[], \(events.map(\.type))::text[], \(events.map { clean($0.payload) })::text[],
                \(events.map(\.createdAt.unixSeconds))::bigint[]) AS e(id, type, payload, created_at)
            """
    }

    public func append(_ event: OutboxEvent) async throws {
        try await database.query(Self.insertQuery([event]))
    }

    public func claim(now: Date, limit: Int, lease: Duration) async throws -> [ClaimedEvent] {
        let nowSeconds = now.unixSeconds
        let leaseUntil = nowSeconds + max(1, lease.components.seconds)
        let rows = try await database.query(
            """
            WITH due AS (
                SELECT id FROM events
                WHERE delivered_at IS NULL AND next_attempt IS NOT NULL AND next_attempt <= \(nowSeconds)
                ORDER BY next_attempt, created_at, id
                LIMIT \(max(0, limit))
                FOR UPDATE SKIP LOCKED
            )
            UPDATE events AS e SET attempts = e.attempts + 1, next_attempt = \(leaseUntil)
            FROM due WHERE e.id = due.id
            RETURNING e.id, e.type, e.payload, e.created_at, e.attempts
            """)
        var claimed: [ClaimedEvent] = []
        for row in rows {
            let (id, type, payload, createdAt, attempt) = try row.decode((String, String, String, Int64, Int).self)
            claimed.append(ClaimedEvent(id: id, type: type, payload: payload, createdAt: Date(unixSeconds: createdAt), attempt: attempt))
        }
        // RETURNING keeps no order: oldest first.
        return claimed.sorted { ($0.createdAt, $0.id) < ($1.createdAt, $1.id) }
    }

    public func markDelivered(_ event: ClaimedEvent, at date: Date) async throws -> Bool {
        try await !database.query(
            """
            UPDATE events SET delivered_at = \(date.unixSeconds), next_attempt = NULL
            WHERE id = \(event.id) AND attempts = \(event.attempt) AND delivered_at IS NULL RETURNING id
            """
        ).isEmpty
    }

    public func markFailed(_ event: ClaimedEvent, error: String, retryAt: Date?) async throws -> Bool {
        try await !database.query(
            """
            UPDATE events SET last_error = \(PostgresSearchText.withoutNUL(error)), next_attempt = \(retryAt?.unixSeconds)
            WHERE id = \(event.id) AND attempts = \(event.attempt) AND delivered_at IS NULL RETURNING id
            """
        ).isEmpty
    }

    public func prune(deliveredBefore: Date, failedBefore: Date) async throws -> Int {
        try await database.query(
            """
            DELETE FROM events WHERE (delivered_at IS NOT NULL AND delivered_at < \(deliveredBefore.unixSeconds))
                OR (delivered_at IS NULL AND next_attempt IS NULL AND created_at < \(failedBefore.unixSeconds))
            RETURNING id
            """
        ).count
    }

    public func counts() async throws -> EventOutboxCounts {
        guard let row = try await database.query(PostgresQuery(unsafeSQL: EventOutboxSQL.counts)).first else {
            return EventOutboxCounts(waiting: 0, failed: 0, delivered: 0)
        }
        let (waiting, failed, delivered) = try row.decode((Int64, Int64, Int64).self)
        return EventOutboxCounts(waiting: Int(waiting), failed: Int(failed), delivered: Int(delivered))
    }

    public func failed(limit: Int) async throws -> [FailedEvent] {
        try await database.query(
            """
            SELECT id, type, created_at, attempts, last_error FROM events WHERE \(unescaped: EventOutboxSQL.isFailed)
            ORDER BY created_at, id LIMIT \(max(0, limit))
            """
        ).map { row in
            let (id, type, createdAt, attempts, lastError) = try row.decode((String, String, Int64, Int, String?).self)
            return FailedEvent(id: id, type: type, createdAt: Date(unixSeconds: createdAt), attempts: attempts, lastError: lastError)
        }
    }

    public func retryFailed(now: Date) async throws -> Int {
        try await database.query(
            "UPDATE events SET next_attempt = \(now.unixSeconds), attempts = 0 WHERE \(unescaped: EventOutboxSQL.isFailed) RETURNING id"
        ).count
    }
}
