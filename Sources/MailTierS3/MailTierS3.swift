// MailTierS3 — S3-compatible object storage: a small client (AWS Signature V4 on AsyncHTTPClient), the spool BlobStore and the s3 mailbox store. Implements MailTier's ports.
