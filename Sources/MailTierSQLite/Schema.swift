/// The database schema, versioned with `PRAGMA user_version`.
///
/// The same tables, with the same columns, exist in PostgreSQL (`PostgresDatabase.migrations`,
/// where the versions are numbered on their own): keep the SQL portable (INTEGER, TEXT, no
/// SQLite-only types; times are integer Unix seconds; booleans are INTEGER 0/1). A new version is
/// a new element appended to `migrations`; never edit a migration that has shipped.
public enum SQLiteSchema {
    /// `migrations[i]` brings the database from version `i` to version `i + 1`.
    static let migrations: [[String]] = [
        // Version 1: users and the queue.
        [
            """
            CREATE TABLE users (
                id INTEGER PRIMARY KEY,
                username TEXT NOT NULL UNIQUE,
                email TEXT NOT NULL UNIQUE COLLATE NOCASE,
                password_hash TEXT NOT NULL,
                quota_mb INTEGER NOT NULL DEFAULT 1000,
                is_admin INTEGER NOT NULL DEFAULT 0,
                enabled INTEGER NOT NULL DEFAULT 1,
                created_at INTEGER NOT NULL,
                last_login INTEGER
            )
            """,
            """
            CREATE TABLE queue_messages (
                id TEXT PRIMARY KEY,
                blob_key TEXT NOT NULL,
                sha256 TEXT NOT NULL,
                size_bytes INTEGER NOT NULL,
                mail_from TEXT NOT NULL,
                subject TEXT,
                smtputf8 INTEGER NOT NULL DEFAULT 0,
                body_type TEXT,
                ret TEXT,
                envid TEXT,
                deliver_by INTEGER,
                by_mode TEXT,
                client_ip TEXT,
                helo TEXT,
                auth_user TEXT,
                created_at INTEGER NOT NULL
            )
            """,
            """
            CREATE TABLE queue_recipients (
                id INTEGER PRIMARY KEY,
                message_id TEXT NOT NULL REFERENCES queue_messages(id) ON DELETE CASCADE,
                recipient TEXT NOT NULL,
                domain TEXT NOT NULL,
                is_local INTEGER NOT NULL,
                status TEXT NOT NULL DEFAULT 'pending',
                attempts INTEGER NOT NULL DEFAULT 0,
                max_attempts INTEGER NOT NULL DEFAULT 5,
                next_retry INTEGER NOT NULL,
                deliver_by INTEGER,
                last_error TEXT,
                lease_token TEXT,
                lease_until INTEGER,
                delivery_key TEXT,
                UNIQUE(message_id, recipient)
            )
            """,
            "CREATE INDEX idx_queue_recipients_due ON queue_recipients(status, next_retry)",
            "CREATE INDEX idx_queue_recipients_domain ON queue_recipients(domain)",
        ],
        // Version 2: the database mailbox store, which is also the index of the timeseries and
        // S3 stores (see `SQLiteMailboxStore` for how this differs from API.md's `messages`).
        [
            """
            CREATE TABLE messages (
                id INTEGER PRIMARY KEY,
                message_id TEXT NOT NULL,
                "user" TEXT NOT NULL,
                folder TEXT NOT NULL,
                from_addr TEXT,
                to_addrs TEXT,
                subject TEXT,
                date INTEGER NOT NULL,
                size INTEGER NOT NULL,
                flags TEXT NOT NULL DEFAULT '',
                body BLOB,
                headers TEXT,
                location TEXT,
                UNIQUE("user", folder, message_id)
            )
            """,
            #"CREATE INDEX idx_messages_user ON messages("user")"#,
            #"CREATE INDEX idx_messages_folder ON messages("user", folder, date)"#,
            "CREATE INDEX idx_messages_date ON messages(date)",
            "CREATE INDEX idx_messages_location ON messages(location) WHERE location IS NOT NULL",
            // Keeps its own copy of the indexed text: SQLite 3.40 (Debian 12) has no
            // `contentless_delete` (3.43), and a contentless table can only forget a row when
            // given the exact text it indexed.
            "CREATE VIRTUAL TABLE messages_fts USING fts5(subject, body, tokenize = 'unicode61 remove_diacritics 2')",
            """
            CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
                DELETE FROM messages_fts WHERE rowid = old.id;
            END
            """,
        ],
        // Version 3: the webhook outbox (DESIGN.md `events`). An event is inserted in the
        // transaction of the change it reports; a sender posts it and sets `delivered_at`, or
        // counts the attempt, keeps `last_error` and schedules `next_attempt`.
        [
            """
            CREATE TABLE events (
                id TEXT PRIMARY KEY,
                type TEXT NOT NULL,
                payload TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt INTEGER,
                delivered_at INTEGER,
                last_error TEXT
            )
            """,
            "CREATE INDEX idx_events_undelivered ON events(next_attempt) WHERE delivered_at IS NULL",
        ],
        // Version 4: embedded mode's spool for small messages (`SQLiteBlobStore`): SQLite only,
        // as cluster mode spools to S3. `data` last: listing keys and times reads no blob.
        [
            """
            CREATE TABLE spool_blobs (
                key TEXT PRIMARY KEY,
                created_at INTEGER NOT NULL,
                data BLOB NOT NULL
            )
            """
        ],
    ]

    /// The version this build writes.
    public static var currentVersion: Int { migrations.count }

    /// Applies every missing migration, each in its own IMMEDIATE transaction (so two
    /// processes opening a fresh file at once do not both migrate it), and returns the versions
    /// it applied. Throws when the file was written by a newer version.
    @discardableResult
    static func migrate(_ connection: SQLiteConnection) throws -> [Int] {
        var applied: [Int] = []
        for (index, statements) in migrations.enumerated() {
            let target = index + 1
            try connection.execute("BEGIN IMMEDIATE")
            do {
                let version = try userVersion(connection)
                if version > currentVersion {
                    throw SQLiteError(
                        code: 1,  // SQLITE_ERROR
                        message: "database schema version \(version) is newer than this program's (\(currentVersion))")
                }
                if version < target {
                    for statement in statements {
                        try connection.execute(statement)
                    }
                    // PRAGMA takes no bound parameters; `target` is an Int, not user input.
                    try connection.execute("PRAGMA user_version = \(target)")
                    applied.append(target)
                }
                try connection.execute("COMMIT")
            } catch {
                if connection.isInTransaction { try? connection.execute("ROLLBACK") }
                throw error
            }
        }
        return applied
    }

    static func userVersion(_ connection: SQLiteConnection) throws -> Int {
        Int(try connection.query("PRAGMA user_version").first?.int("user_version") ?? 0)
    }
}
