import Foundation
import NIOPosix
import Testing

@testable import MailTier
@testable import MailTierPostgres
import PostgresNIO
@testable import MailTierS3
@testable import MailTierSQLite

/// The contract's backends that need a real service: PostgreSQL and S3 (SeaweedFS), as
/// `scripts/test-services.sh start` describes them in `.test-services/env`. Without them the
/// case is skipped, unless `MAILTIER_REQUIRE_SERVICES=1` (as `make test` sets): then it fails.
enum ExternalBackends {
    static let environment = ProcessInfo.processInfo.environment

    static func variable(_ name: String) -> String? {
        guard let value = environment[name], !value.isEmpty else {
            if environment["MAILTIER_REQUIRE_SERVICES"] == "1" {
                Issue.record("MAILTIER_REQUIRE_SERVICES=1 but \(name) is not set (scripts/test-services.sh start; set -a; . .test-services/env)")
            }
            return nil
        }
        return value
    }

    static func make(_ backend: Backend, directory: String, cleanup: @escaping @Sendable () async throws -> Void) async throws -> StoreUnderTest? {
        switch backend {
        case .postgresDatabase:
            guard let url = variable("MAILTIER_TEST_POSTGRES_URL") else { return nil }
            let schema = "contract_\(UInt32.random(in: 0...UInt32.max))"
            let database = try PostgresDatabase(url: url, schema: schema, limits: .patient)
            let runner = Task { await database.run() }
            try await database.migrate()
            return StoreUnderTest(store: PostgresMailboxStore(database: database)) {
                _ = try? await database.query("DROP SCHEMA \(unescaped: schema) CASCADE")
                runner.cancel()
                try await cleanup()
            }
        case .s3:
            guard let endpoint = variable("MAILTIER_TEST_S3_ENDPOINT"),
                let access = variable("MAILTIER_TEST_S3_ACCESS_KEY"),
                let secret = variable("MAILTIER_TEST_S3_SECRET_KEY")
            else { return nil }
            let client = S3Client(
                configuration: S3Configuration(
                    endpoint: endpoint, region: environment["MAILTIER_TEST_S3_REGION"] ?? "us-east-1", accessKey: access,
                    secretKey: secret, bucket: "contract-\(UInt32.random(in: 0...UInt32.max))"))
            try await client.createBucket()
            let index = SQLiteMailboxStore(database: try SQLiteDatabase(path: directory + "/index.db", threadPool: NIOThreadPool.singleton))
            return StoreUnderTest(store: IndexedMailboxStore(index: index, content: S3MessageContentStore(client: client))) {
                // Leave no bucket behind: empty it, then delete it.
                var token: String?
                repeat {
                    guard let page = try? await client.listObjects(prefix: "", continuationToken: token) else { break }
                    for object in page.keys { try? await client.deleteObject(key: object.key) }
                    token = page.nextToken
                } while token != nil
                try? await client.deleteBucket()
                try? await client.shutdown()
                try await cleanup()
            }
        default:
            return nil
        }
    }
}
