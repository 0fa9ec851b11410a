/// The release this build reports (`GET /health`'s `version`).
public enum MailTierVersion {
    public static let current = "0.4.0"
}
