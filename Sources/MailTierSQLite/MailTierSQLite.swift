// MailTierSQLite — the SQLite adapter (embedded mode): users and the queue, versioned schema
// shared with PostgreSQL. Implements MailTier's ports; imports nothing above MailTier.
