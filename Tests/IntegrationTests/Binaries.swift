import Foundation

/// The path of the built executable `name` (e.g. "user-cli", "smtp-server").
///
/// `MAILTIER_BIN_PATH`, when set, is the directory that holds the executables. Otherwise this
/// walks up from the test bundle (`CommandLine.arguments[0]`, inside `.build/<triple>/debug`)
/// to the first directory that contains an executable file called `name`. When there is none,
/// it returns where the executable would be next to the test bundle, so that the caller's
/// error names a sensible path.
func binaryPath(_ name: String) -> String {
    let fileManager = FileManager.default
    if let directory = ProcessInfo.processInfo.environment["MAILTIER_BIN_PATH"], !directory.isEmpty {
        return URL(fileURLWithPath: directory).appendingPathComponent(name).path
    }
    let arg0 = CommandLine.arguments.first ?? ""
    let start = URL(
        fileURLWithPath: arg0, relativeTo: URL(fileURLWithPath: fileManager.currentDirectoryPath, isDirectory: true)
    ).standardizedFileURL.resolvingSymlinksInPath()
    var directory = start.deletingLastPathComponent()
    let fallback = directory.appendingPathComponent(name).path
    while true {
        let candidate = directory.appendingPathComponent(name).path
        var isDirectory: ObjCBool = false
        if fileManager.fileExists(atPath: candidate, isDirectory: &isDirectory), !isDirectory.boolValue,
            fileManager.isExecutableFile(atPath: candidate)
        {
            return candidate
        }
        let parent = directory.deletingLastPathComponent()
        if parent.path == directory.path || directory.path == "/" { return fallback }
        directory = parent
    }
}
