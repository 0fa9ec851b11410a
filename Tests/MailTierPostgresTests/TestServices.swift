import Foundation
import Testing

/// The real services the tests talk to, as `scripts/test-services.sh start` describes them in
/// `.test-services/env` (`set -a; . .test-services/env; set +a` before `swift test`).
///
/// A suite that needs PostgreSQL carries `TestServices.postgres`: without
/// `MAILTIER_TEST_POSTGRES_URL` it is skipped with a note saying how to start the services —
/// unless `MAILTIER_REQUIRE_SERVICES=1` (as `make test` sets), in which case it runs and each
/// test fails in `requirePostgresURL()`.
enum TestServices {
    static var postgresURL: String? {
        guard let url = ProcessInfo.processInfo.environment["MAILTIER_TEST_POSTGRES_URL"], !url.isEmpty else { return nil }
        return url
    }

    static var servicesRequired: Bool { ProcessInfo.processInfo.environment["MAILTIER_REQUIRE_SERVICES"] == "1" }

    static let howToStart = "run scripts/test-services.sh start, then: set -a; . .test-services/env; set +a"

    /// Runs the suite when PostgreSQL is configured or required; skips it with a visible note otherwise.
    static var postgres: ConditionTrait {
        .enabled(
            if: postgresURL != nil || servicesRequired,
            "MAILTIER_TEST_POSTGRES_URL is not set (\(howToStart))")
    }

    /// The URL; when it is missing, records a failure (services are required) and returns nil.
    static func requirePostgresURL(sourceLocation: SourceLocation = #_sourceLocation) -> String? {
        if let url = postgresURL { return url }
        Issue.record(
            "MAILTIER_REQUIRE_SERVICES=1 but MAILTIER_TEST_POSTGRES_URL is not set: PostgreSQL tests cannot run (\(howToStart))",
            sourceLocation: sourceLocation)
        return nil
    }
}
