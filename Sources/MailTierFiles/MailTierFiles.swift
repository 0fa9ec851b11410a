// MailTierFiles — file-system adapters: the spool (`BlobStore`), maildir and mbox
// (`MailboxStore`), and the date tree of the timeseries store (`MessageContentStore`, sealed
// with AES-256-GCM when a key is configured). Implements MailTier's ports; imports nothing above MailTier.
