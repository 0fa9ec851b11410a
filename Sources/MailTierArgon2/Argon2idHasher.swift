// MailTierArgon2: `PasswordHasher` over the reference Argon2 library (libargon2, `CArgon2`).
// It owns the hash parameters and the bound on concurrent hashes; it must not import
// database, NIO channel or SMTP code.

import CArgon2
import MailTier
import NIOPosix
import Synchronization

/// Argon2id password hashing, PHC string format, run on a `NIOThreadPool`.
///
/// Each hash costs `parameters.memoryKiB` of memory (64 MiB by default), so at most
/// `maxConcurrent` hashes or verifications run at once; the others wait (asynchronously).
public struct Argon2idHasher: PasswordHasher {
    public struct Parameters: Sendable, Equatable {
        /// Iterations (`t`).
        public var timeCost: UInt32
        /// Memory in KiB (`m`).
        public var memoryKiB: UInt32
        /// Lanes and threads (`p`).
        public var parallelism: UInt32
        public var saltLength: Int
        public var hashLength: Int

        public init(timeCost: UInt32, memoryKiB: UInt32, parallelism: UInt32, saltLength: Int = 16, hashLength: Int = 32) {
            self.timeCost = timeCost
            self.memoryKiB = memoryKiB
            self.parallelism = parallelism
            self.saltLength = saltLength
            self.hashLength = hashLength
        }

        /// The document's parameters: t=3, m=65536 KiB, p=4, 16-byte salt, 32-byte hash.
        public static let `default` = Parameters(timeCost: 3, memoryKiB: 65536, parallelism: 4)
    }

    /// Limits on the parameters of a hash given to `verify`, so that a corrupt or hostile
    /// stored hash cannot make one verification take gigabytes or minutes.
    public static let maxVerifyMemoryKiB: UInt32 = 1_048_576
    public static let maxVerifyTimeCost: UInt32 = 64
    public static let maxVerifyParallelism: UInt32 = 64

    public let parameters: Parameters
    private let threadPool: NIOThreadPool
    private let limiter: AsyncSemaphore

    public init(threadPool: NIOThreadPool, maxConcurrent: Int = 2, parameters: Parameters = .default) {
        precondition(maxConcurrent >= 1, "maxConcurrent must be at least 1")
        self.threadPool = threadPool
        self.parameters = parameters
        self.limiter = AsyncSemaphore(permits: maxConcurrent)
    }

    public func hash(_ password: String) async throws -> String {
        var generator = SystemRandomNumberGenerator()
        let salt = (0..<parameters.saltLength).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
        let parameters = self.parameters
        return try await limited {
            try Self.encode(password: password, salt: salt, parameters: parameters)
        }
    }

    public func verify(_ password: String, against encodedHash: String) async throws -> Bool {
        guard Self.isAcceptable(encodedHash) else { return false }
        return try await limited {
            try Self.verifySync(password, against: encodedHash)
        }
    }

    // MARK: - Synchronous primitives (block the calling thread; no concurrency bound)

    /// The PHC string of `password` with the given salt: `argon2id_hash_encoded`.
    public static func encode(password: String, salt: [UInt8], parameters: Parameters) throws -> String {
        let length = argon2_encodedlen(
            parameters.timeCost, parameters.memoryKiB, parameters.parallelism, UInt32(salt.count),
            UInt32(parameters.hashLength), Argon2_id)
        var encoded = [CChar](repeating: 0, count: length)
        let password = Array(password.utf8)
        let rc = password.withUnsafeBytes { pwd in
            salt.withUnsafeBytes { saltBytes in
                encoded.withUnsafeMutableBufferPointer { out in
                    argon2id_hash_encoded(
                        parameters.timeCost, parameters.memoryKiB, parameters.parallelism,
                        pwd.baseAddress, pwd.count, saltBytes.baseAddress, saltBytes.count,
                        parameters.hashLength, out.baseAddress, out.count)
                }
            }
        }
        guard rc == ARGON2_OK.rawValue else { throw Argon2Error(code: rc) }
        return String(decoding: encoded.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// `argon2id_verify` (constant-time comparison). False for a wrong password and for a
    /// malformed hash; throws only when the library could not run (memory, threads).
    public static func verifySync(_ password: String, against encodedHash: String) throws -> Bool {
        guard isAcceptable(encodedHash) else { return false }
        let password = Array(password.utf8)
        let rc = password.withUnsafeBytes { pwd in
            encodedHash.withCString { encoded in
                argon2id_verify(encoded, pwd.baseAddress, pwd.count)
            }
        }
        switch rc {
        case ARGON2_OK.rawValue:
            return true
        case ARGON2_MEMORY_ALLOCATION_ERROR.rawValue, ARGON2_THREAD_FAIL.rawValue:
            throw Argon2Error(code: rc)
        default:
            // ARGON2_VERIFY_MISMATCH, and every decoding error of a malformed string.
            return false
        }
    }

    // MARK: - Internals

    private func limited<T: Sendable>(_ work: @escaping @Sendable () throws -> T) async throws -> T {
        try await limiter.acquire()
        defer { limiter.release() }
        return try await threadPool.runIfActive(work)
    }

    /// A quick syntactic check before libargon2 sees the string: `$argon2id$v=19$m=…,t=…,p=…$`
    /// with the cost parameters within the `maxVerify…` limits, and no NUL.
    static func isAcceptable(_ encoded: String) -> Bool {
        guard encoded.utf8.count <= 512, !encoded.utf8.contains(0) else { return false }
        let fields = encoded.split(separator: "$", omittingEmptySubsequences: false)
        // "", "argon2id", "v=19", "m=…,t=…,p=…", salt, hash
        guard fields.count == 6, fields[0].isEmpty, fields[1] == "argon2id", fields[2] == "v=19" else { return false }
        var m: UInt32?
        var t: UInt32?
        var p: UInt32?
        for pair in fields[3].split(separator: ",", omittingEmptySubsequences: false) {
            let parts = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            guard parts.count == 2, let value = UInt32(parts[1]) else { return false }
            switch parts[0] {
            case "m": m = value
            case "t": t = value
            case "p": p = value
            default: return false
            }
        }
        guard let m, let t, let p else { return false }
        return m <= maxVerifyMemoryKiB && t <= maxVerifyTimeCost && p <= maxVerifyParallelism
    }
}

/// A libargon2 failure (not a wrong password: that is `false`).
public struct Argon2Error: Error, CustomStringConvertible, Sendable {
    public var code: Int32

    public var description: String {
        guard let message = argon2_error_message(code) else { return "argon2 error \(code)" }
        return "argon2 error \(code): \(String(cString: message))"
    }
}

/// A counting semaphore for async code: `acquire` suspends (without blocking a thread) until a
/// permit is free; waiters are served in order; a cancelled waiter throws `CancellationError`.
final class AsyncSemaphore: Sendable {
    private struct Waiter {
        var id: UInt64
        var continuation: CheckedContinuation<Void, any Error>
    }

    private struct State {
        var permits: Int
        var nextID: UInt64 = 0
        var waiters: [Waiter] = []
        /// Waiters whose cancellation handler ran before they were queued.
        var cancelled: Set<UInt64> = []
    }

    private let state: Mutex<State>

    init(permits: Int) {
        self.state = Mutex(State(permits: permits))
    }

    func acquire() async throws {
        let id = state.withLock { state in
            defer { state.nextID &+= 1 }
            return state.nextID
        }
        defer { _ = state.withLock { $0.cancelled.remove(id) } }
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                enum Outcome { case acquired, cancelled, queued }
                let outcome = state.withLock { state -> Outcome in
                    if state.cancelled.remove(id) != nil { return .cancelled }
                    if state.permits > 0 {
                        state.permits -= 1
                        return .acquired
                    }
                    state.waiters.append(Waiter(id: id, continuation: continuation))
                    return .queued
                }
                switch outcome {
                case .acquired: continuation.resume()
                case .cancelled: continuation.resume(throwing: CancellationError())
                case .queued: break
                }
            }
        } onCancel: {
            let waiter = state.withLock { state -> Waiter? in
                if let index = state.waiters.firstIndex(where: { $0.id == id }) {
                    return state.waiters.remove(at: index)
                }
                state.cancelled.insert(id)
                return nil
            }
            waiter?.continuation.resume(throwing: CancellationError())
        }
    }

    func release() {
        let next = state.withLock { state -> Waiter? in
            if state.waiters.isEmpty {
                state.permits += 1
                return nil
            }
            return state.waiters.removeFirst()
        }
        next?.continuation.resume()
    }
}
