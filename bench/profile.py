#!/usr/bin/env python3
"""Profiles our server's ingress under an smtp-source load (issue 7, point 5): starts the
release build in embedded mode as bench/run.py does, and records it while smtp-source sends.

  bench/profile.py perf   [--size 1024] [--messages 3000] [--reuse]   perf record -g; top symbols
  bench/profile.py strace [--size 1024] [--messages 500]  [--reuse]   syscalls per message

perf: the data stays in --out (default /tmp/mailtier-perf.data) for `perf report -i`; the
summary is the self time by library and the top symbols (demangled by `swift demangle`).
strace: `strace -f -c` over the load and until the queue has drained (so it includes the
delivery loop's maildir writes), divided by the message count.
Needs linux-perf or strace (apt-get install linux-perf strace).
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tool", choices=["perf", "strace"])
    p.add_argument("--bin", default=os.path.join(run.ROOT, ".build", "release"))
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--messages", type=int)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--out", default="/tmp/mailtier-perf.data")
    p.add_argument("--env", action="append", default=[], metavar="SMTP_X=value",
                   help="a setting for the server (repeatable), e.g. --env SMTP_SPOOL_SMALL_MESSAGE_KB=0")
    a = p.parse_args()
    messages = a.messages or (3000 if a.tool == "perf" else 500)
    if not shutil.which(a.tool):
        print(f"profile: {a.tool} is not installed", file=sys.stderr)
        return 2
    directory = tempfile.mkdtemp(prefix="mailtier-profile-")
    server = run.Ours(os.path.join(os.path.abspath(a.bin), "smtp-server"), directory,
                      extra=dict(setting.split("=", 1) for setting in a.env))
    server.start()
    report = os.path.join(directory, "strace.txt")
    try:
        if a.tool == "perf":
            command = ["perf", "record", "-F", "499", "-g", "-o", a.out, "-p", str(server.root_pid)]
        else:
            command = ["strace", "-f", "-c", "-o", report, "-p", str(server.root_pid)]
        recorder = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        time.sleep(1)
        elapsed = run.smtp_source(server.port, a.size, a.reuse, a.sessions, messages)
        if a.tool == "strace":
            server.drain(300)
        recorder.send_signal(signal.SIGINT)
        recorder.wait(60)
        print(f"{messages} messages of {a.size} octets in {elapsed:.2f} s ({messages / elapsed:.0f} msg/s, "
              f"slowed by the {a.tool} recording)")
        if a.tool == "perf":
            for sort in ("dso", "symbol"):
                text = subprocess.run(["perf", "report", "-i", a.out, "--no-children", "--sort", sort, "-g", "none",
                                       "--stdio"], capture_output=True, text=True).stdout
                lines = [l for l in text.splitlines() if "%" in l and not l.startswith("#")][:25]
                demangled = subprocess.run(["swift", "demangle", "--simplified"], input="\n".join(lines),
                                           capture_output=True, text=True).stdout
                print(demangled)
        else:
            with open(report) as f:
                rows = f.read().splitlines()
            print(f"{'syscall':<18} {'calls':>9} {'per message':>12}")
            for row in rows[2:]:
                fields = row.split()
                if len(fields) >= 5 and fields[0][0].isdigit():
                    calls, name = int(fields[3]), fields[-1]
                    if calls >= messages:
                        print(f"{name:<18} {calls:>9} {calls / messages:>12.1f}")
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
