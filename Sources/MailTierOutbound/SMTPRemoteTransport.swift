// MailTierOutbound: remote delivery over SMTP (DESIGN.md layer 4, adapter for `RemoteTransport`).
// Owns the route (relay host or MX through `MailExchangeResolver`), the per-destination
// connection pool and the mapping of SMTP outcomes to `DeliveryProblem`s. Imports MailTier (the
// ports), SMTPNIO (the client) and SMTPProtocol; never a storage adapter.

import Logging
import MailTier
import NIOCore
import NIOPosix
import NIOSSL
import SMTPNIO
import SMTPProtocol
import ServiceLifecycle

/// Sends remote recipients' mail: to `relay` when set, else to the recipient domain's MX hosts
/// in preference order (each host's addresses in turn until one answers), one transaction per
/// message and domain, over connections kept for reuse.
///
/// As a `Service` it closes idle connections after `idleTimeout` and all of them on shutdown.
public final class SMTPRemoteTransport: RemoteTransport, Service {
    public struct Settings: Sendable {
        /// Our EHLO name.
        public var hostname: String
        /// The port of MX hosts (and of the relay when it names none).
        public var port: Int
        public var relay: RelayHost?
        /// No mail without STARTTLS (encryption only: certificates are not verified either way).
        public var requireTLS: Bool
        /// At most this many connections to one destination (MX host or relay) at a time.
        public var concurrency: Int
        public var timeouts: SMTPClientTimeouts
        /// An unused pooled connection is closed (QUIT) after this long.
        public var idleTimeout: Duration

        public init(
            hostname: String, port: Int = 25, relay: RelayHost? = nil, requireTLS: Bool = false, concurrency: Int = 10,
            timeouts: SMTPClientTimeouts = SMTPClientTimeouts(), idleTimeout: Duration = .seconds(30)
        ) {
            self.hostname = hostname
            self.port = port
            self.relay = relay
            self.requireTLS = requireTLS
            self.concurrency = max(1, concurrency)
            self.timeouts = timeouts
            self.idleTimeout = idleTimeout
        }

        public init(configuration: Configuration) {
            self.init(
                hostname: configuration.hostname, port: configuration.outboundPort, relay: configuration.relayHost,
                requireTLS: configuration.outboundRequireTLS, concurrency: configuration.outboundConcurrency)
        }
    }

    private let settings: Settings
    private let resolver: any MailExchangeResolver
    private let pool: ConnectionPool
    private let tlsContext: NIOSSLContext?
    private let group: any EventLoopGroup
    private let logger: Logger

    public init(settings: Settings, resolver: any MailExchangeResolver, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, logger: Logger) {
        self.settings = settings
        self.resolver = resolver
        self.logger = logger
        // RFC 7435 opportunistic security: encrypt whatever the certificate says (most MX
        // certificates would not verify against the MX name anyway).
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.certificateVerification = .none
        self.tlsContext = try? NIOSSLContext(configuration: tls)
        self.group = group
        self.pool = ConnectionPool(limit: settings.concurrency, idleTimeout: settings.idleTimeout)
    }

    public func run() async throws {
        // Sweeps idle connections until shutdown, then closes every pooled one.
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(1))
                await self.pool.closeIdle(olderThan: self.settings.idleTimeout)
            }
        }
        await pool.shutdown()
    }

    /// Closes every pooled connection (without waiting for `run` to end).
    public func shutdown() async { await pool.shutdown() }

    public func deliver(_ message: ByteBuffer, jobs: [DeliveryJob]) async -> [DeliveryProblem?] {
        guard let first = jobs.first else { return [] }
        let destinations: [Destination]
        switch await route(for: first.domain) {
        case .failure(let problem): return jobs.map { _ in problem }
        case .success(let found): destinations = found
        }
        let transaction = SMTPClientTransaction(
            mailFrom: first.mailFrom, recipients: jobs.map(\.recipient), content: message, smtputf8: first.smtputf8,
            bodyType: first.bodyType)
        var lastProblem = DeliveryProblem.temporary("4.4.1", "no host of \(first.domain) answered")
        for destination in destinations {
            let lease: ConnectionPool.Lease
            do {
                lease = try await pool.checkout(destination, open: { try await self.open(destination) })
            } catch let error as SMTPClientError {
                lastProblem = DeliveryProblem(error, peer: destination.name)
                logger.info("cannot use mail host", metadata: ["host": "\(destination.name)", "error": "\(error)"])
                // RFC 5321 §5.1: try the next host (a 5xx greeting too: another MX may take it).
                continue
            } catch {
                lastProblem = .temporary("4.4.1", "\(destination.name): \(error)")
                continue
            }
            let result: SMTPTransactionResult
            do {
                result = try await lease.session.send(transaction)
            } catch {
                await pool.discard(lease)
                // Nothing is delivered when the connection breaks mid-transaction: all retry.
                return jobs.map { _ in DeliveryProblem(error, peer: destination.name) }
            }
            await pool.checkin(lease)
            if case .replies(let replies) = result {
                for (job, reply) in zip(jobs, replies) where reply.isPositive {
                    logger.debug("accepted", metadata: ["to": "<\(job.recipient)>", "host": "\(destination.name)", "reply": "\(reply.summary)"])
                }
            }
            return result.problems(count: jobs.count, peer: destination.name)
        }
        return jobs.map { _ in lastProblem }
    }

    /// One host to try: its name (for the pool, logs and `Remote-MTA`) and how to reach it.
    struct Destination: Hashable, Sendable {
        var name: String
        var port: Int
        /// The addresses to try in order; empty: connect by name (the relay).
        var addresses: [String]
    }

    /// The relay, or the domain's MX hosts. A failure is the problem every recipient gets.
    func route(for domain: String) async -> Result<[Destination], DeliveryProblem> {
        if let relay = settings.relay {
            return .success([Destination(name: relay.host, port: relay.port ?? settings.port, addresses: [])])
        }
        let route: MailRoute
        do {
            route = try await resolver.mailExchangers(for: domain)
        } catch {
            return .failure(Self.problem(for: error))
        }
        if case .nullMX = route {
            // RFC 7505 §4.1: do not try; RFC 7504's 556 5.1.10.
            return .failure(.permanent("5.1.10", "\(domain) accepts no mail (null MX, RFC 7505)"))
        }
        return .success(route.hosts.map { Destination(name: $0.host, port: settings.port, addresses: $0.addresses) })
    }

    static func problem(for error: DNSError) -> DeliveryProblem {
        switch error.code {
        case .noSuchDomain, .invalidName: .permanent("5.1.2", "\(error)")
        case .noAddresses: .permanent("5.4.4", "\(error)")
        case .timeout, .serverFailure, .network, .resolverFailure: .temporary("4.4.3", "\(error)")
        }
    }

    private func open(_ destination: Destination) async throws -> SMTPClientSession {
        let connection: SMTPClientConnection
        if destination.addresses.isEmpty {
            connection = try await SMTPClientConnection.connect(
                host: destination.name, port: destination.port, timeout: settings.timeouts.connect, group: group)
        } else {
            var lastError = SMTPClientError(.connect, "\(destination.name) has no address")
            var opened: SMTPClientConnection?
            for address in destination.addresses {
                do {
                    let socketAddress = try SocketAddress(ipAddress: address, port: destination.port)
                    opened = try await SMTPClientConnection.connect(to: socketAddress, timeout: settings.timeouts.connect, group: group)
                    break
                } catch let error as SMTPClientError {
                    lastError = error
                } catch {
                    lastError = SMTPClientError(.connect, "bad address \(address): \(error)")
                }
            }
            guard let opened else { throw lastError }
            connection = opened
        }
        let tls: SMTPClientTLSPolicy
        if let tlsContext {
            tls = settings.requireTLS ? .required(tlsContext) : .opportunistic(tlsContext)
        } else {
            guard !settings.requireTLS else {
                await connection.close()
                throw SMTPClientError(.tlsRequired, "TLS is required and no TLS client could be set up")
            }
            tls = .none
        }
        let session = try await SMTPClientSession.start(
            on: connection, hostname: settings.hostname, serverName: destination.name, tls: tls, timeouts: settings.timeouts)
        logger.debug(
            "connected",
            metadata: [
                "host": "\(destination.name)", "tls": "\(session.isTLS)",
                "extensions": "\(session.capabilities.map { $0.extensions.keys.sorted().joined(separator: ",") } ?? "none (HELO)")",
            ])
        return session
    }
}
