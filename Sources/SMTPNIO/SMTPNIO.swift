// SMTPNIO — SMTP on SwiftNIO.
//
// Owns: strict CRLF framing (command lines, DATA with dot-unstuffing, BDAT chunks), the server
// channel handler that runs the state machine's actions, STARTTLS (and the negotiated TLS version
// and cipher suite), idle timeouts, the connection limit, PROXY protocol v1/v2 headers from trusted
// proxies, and the listener as a swift-service-lifecycle `Service`.
// Must not import: MailTier or any adapter; it reaches the mail system only through
// `SMTPServerDelegate`.
