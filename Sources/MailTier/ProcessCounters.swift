import NIOConcurrencyHelpers

/// What this process has counted since it started, for `GET /stats` (Prometheus gets the same
/// events through swift-metrics). Cheap to update from any task.
public final class ProcessCounters: Sendable {
    public struct Snapshot: Sendable, Equatable {
        public var received = 0
        public var sent = 0
        public var rejectedConnections = 0
        public var authSuccesses = 0
        public var authFailures = 0
        public var spam = 0
        public var viruses = 0
        /// The most recent processing times (end of data to the reply), at most `sampleLimit`.
        public var processingMilliseconds: [Double] = []

        public init() {}
    }

    /// How many processing times are kept for the percentiles.
    public static let sampleLimit = 1000

    private struct State {
        var snapshot = Snapshot()
        var next = 0
    }

    private let state = NIOLockedValueBox(State())

    public init() {}

    public var snapshot: Snapshot { state.withLockedValue { $0.snapshot } }

    public func update(_ change: (inout Snapshot) -> Void) {
        state.withLockedValue { change(&$0.snapshot) }
    }

    public func recordProcessing(milliseconds: Double) {
        state.withLockedValue { state in
            if state.snapshot.processingMilliseconds.count < Self.sampleLimit {
                state.snapshot.processingMilliseconds.append(milliseconds)
            } else {
                state.snapshot.processingMilliseconds[state.next] = milliseconds
            }
            state.next = (state.next + 1) % Self.sampleLimit
        }
    }
}
