// AdminAPI — the HTTP side of MailTier (layer 5): `GET /health`, served by every role on
// `SMTP_HEALTH_PORT`, and `GET /metrics` (Prometheus text format, `MetricsServer.swift`) on
// `SMTP_METRICS_HOST`:`SMTP_METRICS_PORT`; the admin REST API joins them later (issue 6).
//
// Owns: the routes, the JSON bodies and their `X-API-Version` header, the health checks'
// timeout and cache, the Prometheus factory. It is given what it reports on (checks and gauge
// refreshes as closures, connection counts), so it imports MailTier, Hummingbird and
// swift-prometheus only — never an adapter; `smtp-server` wires the adapters.
// Untrusted input: the request line and headers (Hummingbird parses them); nothing from a request
// reaches a check, and the only echo of it (the path in a 404) is JSON-escaped.
