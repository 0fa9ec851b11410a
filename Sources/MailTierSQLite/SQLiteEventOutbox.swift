#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import MailTier

/// The webhook outbox (`events`, schema version 3) in SQLite. Claims run in `BEGIN IMMEDIATE`
/// transactions, so two senders (threads or processes on one file) never claim one event while
/// its lease lasts; each claim counts the attempt, which fences the result.
public struct SQLiteEventOutbox: EventOutbox {
    public let database: SQLiteDatabase

    public init(database: SQLiteDatabase) {
        self.database = database
    }

    /// Inserts `events` on `connection`, inside the caller's transaction: due at once.
    public static func insert(_ events: [OutboxEvent], _ connection: SQLiteConnection) throws {
        for event in events {
            try connection.execute(
                "INSERT INTO events (id, type, payload, created_at, next_attempt) VALUES (?, ?, ?, ?, ?)",
                [.text(event.id), .text(event.type), .text(event.payload), .integer(event.createdAt.unixSeconds),
                 .integer(event.createdAt.unixSeconds)])
        }
    }

    public func append(_ event: OutboxEvent) async throws {
        try await database.write { db in try Self.insert([event], db) }
    }

    private static let due = "delivered_at IS NULL AND next_attempt IS NOT NULL AND next_attempt <= ?"

    public func claim(now: Date, limit: Int, lease: Duration) async throws -> [ClaimedEvent] {
        let nowSeconds = now.unixSeconds
        // A read first: an idle poll does not take the write lock.
        guard try await database.read({ db in try !db.query("SELECT 1 AS due FROM events WHERE \(Self.due) LIMIT 1", [.integer(nowSeconds)]).isEmpty })
        else { return [] }
        let leaseUntil = nowSeconds + max(1, lease.components.seconds)
        return try await database.write { db in
            let rows = try db.query(
                "SELECT id, type, payload, created_at, attempts FROM events WHERE \(Self.due) ORDER BY next_attempt, created_at, id LIMIT ?",
                [.integer(nowSeconds), .integer(Int64(max(0, limit)))])
            var claimed: [ClaimedEvent] = []
            for row in rows {
                let id = row.string("id") ?? ""
                try db.execute("UPDATE events SET attempts = attempts + 1, next_attempt = ? WHERE id = ?", [.integer(leaseUntil), .text(id)])
                claimed.append(
                    ClaimedEvent(
                        id: id, type: row.string("type") ?? "", payload: row.string("payload") ?? "",
                        createdAt: Date(unixSeconds: row.int("created_at") ?? 0), attempt: Int(row.int("attempts") ?? 0) + 1))
            }
            return claimed
        }
    }

    public func markDelivered(_ event: ClaimedEvent, at date: Date) async throws -> Bool {
        try await database.write { db in
            try db.execute(
                "UPDATE events SET delivered_at = ?, next_attempt = NULL WHERE id = ? AND attempts = ? AND delivered_at IS NULL",
                [.integer(date.unixSeconds), .text(event.id), .integer(Int64(event.attempt))])
            return db.changes == 1
        }
    }

    public func markFailed(_ event: ClaimedEvent, error: String, retryAt: Date?) async throws -> Bool {
        try await database.write { db in
            try db.execute(
                "UPDATE events SET last_error = ?, next_attempt = ? WHERE id = ? AND attempts = ? AND delivered_at IS NULL",
                [.text(error), .optionalInteger(retryAt?.unixSeconds), .text(event.id), .integer(Int64(event.attempt))])
            return db.changes == 1
        }
    }

    public func prune(deliveredBefore: Date, failedBefore: Date) async throws -> Int {
        try await database.write { db in
            try db.execute(
                """
                DELETE FROM events WHERE (delivered_at IS NOT NULL AND delivered_at < ?)
                    OR (delivered_at IS NULL AND next_attempt IS NULL AND created_at < ?)
                """,
                [.integer(deliveredBefore.unixSeconds), .integer(failedBefore.unixSeconds)])
            return db.changes
        }
    }

    public func counts() async throws -> EventOutboxCounts {
        try await database.read { db in
            let row = try db.query(EventOutboxSQL.counts).first
            return EventOutboxCounts(
                waiting: Int(row?.int("waiting") ?? 0), failed: Int(row?.int("failed") ?? 0), delivered: Int(row?.int("delivered") ?? 0))
        }
    }

    public func failed(limit: Int) async throws -> [FailedEvent] {
        try await database.read { db in
            try db.query(
                "SELECT id, type, created_at, attempts, last_error FROM events WHERE \(EventOutboxSQL.isFailed) ORDER BY created_at, id LIMIT ?",
                [.integer(Int64(max(0, limit)))]
            ).map { row in
                FailedEvent(
                    id: row.string("id") ?? "", type: row.string("type") ?? "", createdAt: Date(unixSeconds: row.int("created_at") ?? 0),
                    attempts: Int(row.int("attempts") ?? 0), lastError: row.string("last_error"))
            }
        }
    }

    public func retryFailed(now: Date) async throws -> Int {
        try await database.write { db in
            try db.execute("UPDATE events SET next_attempt = ?, attempts = 0 WHERE \(EventOutboxSQL.isFailed)", [.integer(now.unixSeconds)])
            return db.changes
        }
    }
}
