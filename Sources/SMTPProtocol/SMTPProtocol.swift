// SMTPProtocol — the SMTP protocol, pure.
//
// Owns: the command grammar (RFC 5321 §4.1 with the extensions MailTier offers), replies with
// RFC 3463 enhanced status codes, paths and addresses (RFC 6531 UTF-8), ESMTP parameters, every
// protocol limit (`SMTPDefaults`), and the server session state machine.
// Must not import: anything but NIOCore (for ByteBuffer). No sockets, no clocks, no Foundation.
