// MailTierFiles — file-system adapters: the spool (`BlobStore`) and maildir (`MailboxStore`).
// Implements MailTier's ports; imports nothing above MailTier.
