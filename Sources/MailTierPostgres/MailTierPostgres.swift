// MailTierPostgres — the PostgreSQL adapter (postgres-nio): the database mailbox store with full-text search; later users and the queue. Implements MailTier's ports.
