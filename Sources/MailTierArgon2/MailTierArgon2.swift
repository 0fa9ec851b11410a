// MailTierArgon2 — Argon2id password hashing through libargon2 (`PasswordHasher`), run on a
// thread pool with bounded concurrency. Implements MailTier's port; imports nothing above MailTier.
