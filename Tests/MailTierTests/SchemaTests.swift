import Foundation
import PostgresNIO
import Testing

@testable import MailTierPostgres
@testable import MailTierSQLite

/// DESIGN.md: the same tables in PostgreSQL and SQLite. Both schemas, migrated from empty, have
/// the same tables with the same columns; only PostgreSQL's `messages.search` (its full-text
/// vector; SQLite keeps FTS5's `messages_fts` beside the table), embedded mode's `spool_blobs` and
/// the bookkeeping tables differ.
@Suite struct SchemaTests {
    static let sharedTables = ["events", "messages", "queue_messages", "queue_recipients", "users"]

    @Test func bothSchemasHaveTheSameTablesAndColumns() async throws {
        let sqlite = try await withTemporaryDirectory("mailtier-schema") { directory in
            let database = try SQLiteDatabase(path: directory + "/smtp.db", threadPool: .singleton)
            return try await database.read { connection in
                var tables: [String: [String]] = [:]
                for name in try connection.query("SELECT name FROM sqlite_master WHERE type = 'table'").compactMap({ $0.string("name") })
                where !name.hasPrefix("messages_fts") && !name.hasPrefix("sqlite_") && name != "spool_blobs" {
                    tables[name] = try connection.query("SELECT name FROM pragma_table_info(?) ORDER BY name", [.text(name)])
                        .compactMap { $0.string("name") }
                }
                return tables
            }
        }
        #expect(sqlite.keys.sorted() == Self.sharedTables)

        guard let url = ExternalBackends.variable("MAILTIER_TEST_POSTGRES_URL") else { return }
        try await withPostgresSchema(url: url) { database in
            let schema = try #require(database.schema)
            var postgres: [String: [String]] = [:]
            for row in try await database.query(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = \(schema)")
            {
                let (table, column) = try row.decode((String, String).self)
                postgres[table, default: []].append(column)
            }
            postgres["schema_migrations"] = nil
            #expect(postgres.keys.sorted() == Self.sharedTables)
            for table in Self.sharedTables {
                var columns = Set(postgres[table] ?? [])
                if table == "messages" { #expect(columns.remove("search") != nil) }
                #expect(columns == Set(sqlite[table] ?? []), "table \(table)")
            }
        }
    }
}
