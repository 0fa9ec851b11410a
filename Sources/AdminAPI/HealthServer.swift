import Hummingbird
import Logging
import MailTier
import NIOCore
import ServiceLifecycle

/// `GET /health`: what this process reports and how it answers.
public struct HealthEndpoint: Sendable {
    public let checks: HealthChecks
    /// Open and accepted SMTP connections of this process's listener; (0, 0) without one.
    public let connections: @Sendable () -> (active: Int, total: Int)
    public let memory: @Sendable () -> MemoryUsage
    public let started: ContinuousClock.Instant

    public init(
        checks: HealthChecks, connections: @escaping @Sendable () -> (active: Int, total: Int) = { (0, 0) },
        memory: @escaping @Sendable () -> MemoryUsage = MemoryUsage.current, started: ContinuousClock.Instant = .now
    ) {
        self.checks = checks
        self.connections = connections
        self.memory = memory
        self.started = started
    }

    public func report() async -> HealthReport {
        let results = await checks.results()
        let (active, total) = connections()
        return HealthReport(
            uptimeSeconds: Int((ContinuousClock.now - started).components.seconds),
            activeConnections: active, totalConnections: total, memory: memory(), checks: results)
    }
}

/// The HTTP application every role runs on `SMTP_HOST`:`SMTP_HEALTH_PORT`.
public enum AdminAPI {
    /// `X-API-Version`, on every response.
    public static let version = "1.0"

    /// `GET /health` always; with `services` (the admin role), the authenticated REST API too.
    public static func router(health: HealthEndpoint, services: AdminServices? = nil) -> Router<AdminRequestContext> {
        let router = Router(context: AdminRequestContext.self)
        router.add(middleware: APIResponseMiddleware())
        router.get("health") { _, _ -> Response in
            let report = await health.report()
            return jsonResponse(report.isHealthy ? .ok : .serviceUnavailable, report.json)
        }
        if let services {
            // The API's description (docs/openapi.json), without authentication.
            router.get("openapi.json") { _, _ -> Response in jsonResponse(.ok, openAPIDocument) }
            addRoutes(to: router, services: services)
        }
        return router
    }

    /// The application as a swift-service-lifecycle `Service`, for the process's `ServiceGroup`.
    public static func application(
        host: String, port: Int, health: HealthEndpoint, services: AdminServices? = nil, logger: Logger
    ) -> some ApplicationProtocol & Service {
        Application(
            router: router(health: health, services: services),
            configuration: ApplicationConfiguration(address: .hostname(host, port: port), serverName: "MailTier"),
            logger: logger)
    }

    static func jsonResponse(_ status: HTTPResponse.Status, _ body: String) -> Response {
        Response(
            status: status, headers: [.contentType: "application/json; charset=utf-8"],
            body: ResponseBody(byteBuffer: ByteBuffer(string: body + "\n")))
    }

    /// `{"error": "not_found", "message": "…"}`.
    static func errorResponse(_ status: HTTPResponse.Status, error: String, message: String) -> Response {
        jsonResponse(status, "{\"error\": \(JSON.string(error)), \"message\": \(JSON.string(message))}")
    }
}

extension HTTPFields.Element.Name {
    static let apiVersion = Self("X-API-Version")!
}

/// Puts `X-API-Version` on every response, and turns errors (an unknown path included) into
/// JSON error bodies.
struct APIResponseMiddleware<Context: RequestContext>: RouterMiddleware {
    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        var response: Response
        do {
            response = try await next(request, context)
        } catch let error as APIError {
            response = error.response
        } catch let error as any HTTPResponseError where error.status == .notFound {
            response = AdminAPI.errorResponse(
                .notFound, error: "not_found", message: "no such endpoint: \(request.method) \(request.uri.path)")
        } catch let error as any HTTPResponseError {
            let code = error.status.reasonPhrase.lowercased().split(separator: " ").joined(separator: "_")
            response = AdminAPI.errorResponse(error.status, error: code, message: error.status.reasonPhrase)
        } catch {
            context.logger.error("request failed", metadata: ["error": "\(error)"])
            response = AdminAPI.errorResponse(.internalServerError, error: "internal_error", message: "internal server error")
        }
        response.headers[.apiVersion] = AdminAPI.version
        return response
    }
}
