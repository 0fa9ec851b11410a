#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Testing

/// Where the test S3 server is (SeaweedFS, started by `scripts/test-services.sh start`, which
/// writes `.test-services/env`).
struct S3TestSettings: Sendable {
    var endpoint: String
    var region: String
    var accessKey: String
    var secretKey: String
}

/// The one place that decides whether a test needing a real service runs, is skipped, or fails.
///
/// - Settings present: the test runs.
/// - Missing, and `MAILTIER_REQUIRE_SERVICES=1` (as `make test` sets): the test runs and fails
///   with an issue naming what is missing.
/// - Missing otherwise: the test is skipped, with the note below in the test output.
enum TestServices {
    static let s3Variables = [
        "MAILTIER_TEST_S3_ENDPOINT", "MAILTIER_TEST_S3_REGION", "MAILTIER_TEST_S3_ACCESS_KEY", "MAILTIER_TEST_S3_SECRET_KEY",
    ]

    static let s3SkipNote: Comment =
        "S3 tests skipped: MAILTIER_TEST_S3_* not set (run scripts/test-services.sh start, then `set -a; . .test-services/env; set +a`)"

    static var servicesRequired: Bool { ProcessInfo.processInfo.environment["MAILTIER_REQUIRE_SERVICES"] == "1" }

    static var s3: S3TestSettings? {
        let environment = ProcessInfo.processInfo.environment
        let values = s3Variables.map { environment[$0] ?? "" }
        guard !values.contains(where: \.isEmpty) else { return nil }
        return S3TestSettings(endpoint: values[0], region: values[1], accessKey: values[2], secretKey: values[3])
    }

    /// For `.enabled(if:)`: false only when the test should be skipped.
    static var shouldRunS3Tests: Bool { s3 != nil || servicesRequired }

    /// The settings; nil (after recording a failing issue) when they are missing although required.
    static func requireS3(sourceLocation: SourceLocation = #_sourceLocation) -> S3TestSettings? {
        if let s3 { return s3 }
        let environment = ProcessInfo.processInfo.environment
        let missing = s3Variables.filter { (environment[$0] ?? "").isEmpty }
        if servicesRequired {
            Issue.record(
                "MAILTIER_REQUIRE_SERVICES=1 but \(missing.joined(separator: ", ")) not set: start the services with scripts/test-services.sh start and load .test-services/env",
                sourceLocation: sourceLocation)
        }
        return nil
    }
}
