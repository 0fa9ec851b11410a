// MailTier — the domain.
//
// Owns: the model (`User`, `Envelope`, `QueuedMessage`, `DeliveryJob`), the ports
// (`UserStore`, `MessageQueue`, `BlobStore`, `MailboxStore`, `PasswordHasher`), configuration,
// accounts, and the role services (ingress policy and the durability contract, delivery).
// Must not import: any adapter (SQLite, files, Argon2, PostgreSQL, S3, Redis); the executables
// choose the adapters.
