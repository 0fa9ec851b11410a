#!/usr/bin/env python3
"""MailTier benchmarks (issue 7): ingress and delivery throughput, latency and memory,
side by side with Postfix and smtp-sink on the same machine, in one run.

Every scenario starts what it needs on 127.0.0.1 (free ports, state in a temp dir) and
stops it after:

  ingress/<target>/<size>/<new|reuse>   target: ours (embedded mode: SQLite, spool, maildir),
                                        postfix (private instance: smtpd -> queue -> discard),
                                        sink (Postfix's smtp-sink, stores nothing: the ceiling)
      1. throughput: smtp-source -s SESSIONS -m MESSAGES -l SIZE [-d]  -> msg/s, MB/s,
         the server's peak RSS and CPU seconds per 1000 messages;
      2. latency: bench/smtp_load.py, same sessions and mode -> p50/p95/p99 (MAIL to the 250
         after the dot), after the queue of pass 1 has drained.
  delivery/ours/1k   N messages queued by an ingress-only server (AUTH, remote recipient),
                     then a delivery-only server sends them to smtp-sink (SMTP_RELAY_HOST,
                     reused connections): msg/s from the first to the last delivered.
  idle/ours          N idle SMTP sessions (after the greeting): RSS growth per connection.

Writes OUT/<timestamp>.json and OUT/latest.json (smoke: smoke-*.json), OUT/latest.png when
matplotlib is there, and prints a table. Exit status 1 when a scenario failed, 2 when a tool
is missing.
"""
import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import smtp_load  # noqa: E402

LOCAL_DOMAIN = "bench.test"
RECIPIENT = f"bench@{LOCAL_DOMAIN}"
SENDER = "load@load.invalid"
ADMIN_PASSWORD = "bench-password-1"
TICK = os.sysconf("SC_CLK_TCK")


def log(*parts):
    print("bench:", *parts, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# MARK: - processes and /proc

_ports_given = set()


def free_port():
    """A port free now and not handed out before by this process: the kernel may offer the
    same free port to two calls in a row (a server given it as SMTP_PORT and SMTP_HEALTH_PORT
    refused to start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def children_map():
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def tree(root):
    """root (a pid or a list of pids) and all their live descendants."""
    children = children_map()
    pids, todo = [], list(root) if isinstance(root, list) else [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def cpu_seconds(pid):
    """utime + stime + cutime + cstime: the process and its reaped children."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICK


def tree_cpu(root):
    return sum(cpu_seconds(pid) for pid in tree(root))


def status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid):
    """Proportional set size: shared pages divided among the processes sharing them."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(root, whole_tree=True):
    """One process: its VmRSS. A tree (Postfix: master and its daemons): the sum of their PSS,
    so that the libraries and the text they all share count once, not once per process."""
    if not whole_tree:
        return status_kb(root, "VmRSS")
    return sum(pss_kb(pid) for pid in tree(root))


def reset_peak_rss(pid):
    """Resets the process's VmHWM to its current RSS (Linux 4.0+), so that VmHWM read later is
    the peak since now — not since start, where our server's first Argon2 hash (64 MiB) of the
    admin password would dominate."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class RSSSampler:
    """Samples a server's memory every `interval` seconds and keeps the peak: for one process
    its VmHWM (reset at the start, so nothing between samples is missed), for a tree the
    summed PSS."""

    def __init__(self, root, interval=0.1, whole_tree=True):
        # A single-process server is sampled without walking /proc (cheaper, less noise).
        self.root, self.interval, self.whole_tree = root, interval, whole_tree
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, tree_rss_kb(self.root, self.whole_tree))
            self._stop.wait(self.interval)

    def __enter__(self):
        if not self.whole_tree:
            reset_peak_rss(self.root)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, tree_rss_kb(self.root, self.whole_tree))
        if not self.whole_tree:
            self.peak_kb = max(self.peak_kb, status_kb(self.root, "VmHWM"))


def wait_smtp(port, timeout, proc=None, what="server"):
    """Waits until 127.0.0.1:port greets with 220."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode} before it greeted")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                greeting = s.recv(512)
                if greeting.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
                last = greeting
        except OSError as error:
            last = error
        time.sleep(0.05)
    raise BenchError(f"{what} on port {port} not ready after {timeout} s ({last})")


def stop_process(proc, grace=15):
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path, lines=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# MARK: - the servers

class Queueing:
    """A server that queues what it accepts; `queued()` counts what is still to deliver."""

    def queued(self):
        raise NotImplementedError

    def drain(self, timeout):
        """Waits until the queue is empty; False after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.queued() == 0:
                return True
            time.sleep(0.1)
        return False


class Ours(Queueing):
    """Our smtp-server in embedded mode (or one role), state in `directory`."""

    name = "ours"

    def __init__(self, binary, directory, role="all", max_connections=1000, extra=None):
        self.binary, self.directory = binary, directory
        self.role, self.max_connections, self.extra = role, max_connections, extra or {}
        self.port = free_port()
        self.db = os.path.join(directory, "smtp.db")
        self.proc = None

    def environment(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
        env.update({
            "SMTP_ROLE": self.role,
            "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(self.port),
            "SMTP_HEALTH_PORT": str(free_port()), "SMTP_METRICS_PORT": str(free_port()),
            "SMTP_DB_PATH": self.db,
            "SMTP_SPOOL_PATH": os.path.join(self.directory, "spool"),
            "SMTP_STORAGE_PATH": os.path.join(self.directory, "mail"),
            "SMTP_HOSTNAME": "mailtier.bench", "SMTP_LOCAL_DOMAINS": LOCAL_DOMAIN,
            "SMTP_ENABLE_TLS": "false", "SMTP_ENABLE_AUTH": "false",
            "SMTP_ADMIN_USERNAME": "bench", "SMTP_ADMIN_EMAIL": RECIPIENT,
            "SMTP_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "SMTP_RATE_CONNECTIONS_PER_MINUTE": "0", "SMTP_RATE_COMMANDS_PER_MINUTE": "0",
            "SMTP_RATE_AUTH_FAILURES_PER_HOUR": "0", "SMTP_RATE_MESSAGES_PER_HOUR": "0",
            "SMTP_MAX_CONNECTIONS": str(self.max_connections),
            "SMTP_TIMEOUT_SECONDS": "600", "SMTP_SHUTDOWN_GRACE_SECONDS": "3",
        })
        env.update(self.extra)
        return env

    def start(self, timeout=90):
        os.makedirs(self.directory, exist_ok=True)
        self.log_path = os.path.join(self.directory, f"server-{self.role}.log")
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary], env=self.environment(), cwd=self.directory,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        if self.role != "delivery":
            try:
                wait_smtp(self.port, timeout, self.proc, "smtp-server")
            except BenchError as error:
                self.stop()
                raise BenchError(f"{error}\n{tail(self.log_path)}")
        return self.proc.pid

    @property
    def root_pid(self):
        return self.proc.pid

    def queued(self):
        """Recipients not yet delivered (None before the database exists)."""
        if not os.path.exists(self.db):
            return None
        try:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5) as db:
                return db.execute("SELECT COUNT(*) FROM queue_recipients WHERE status <> 'delivered'").fetchone()[0]
        except sqlite3.Error:
            return None

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc)


POSTFIX_MASTER = """\
# service type private unpriv chroot wakeup maxproc command
{listen} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp unix - - n - - smtp
relay unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""

POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
maillog_file_prefixes = /var, /dev/stdout, {d}
maillog_file = {d}/maillog
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench
mydomain = postfix.bench
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relay_domains = {domain}
transport_maps = inline:{{ {domain}=discard: }}
smtpd_recipient_restrictions = permit
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
smtp_dns_support_level = disabled
smtpd_peername_lookup = no
alias_maps =
alias_database =
local_recipient_maps =
biff = no
default_process_limit = 200
"""


class Postfix(Queueing):
    """A private Postfix instance: smtpd on a free port, the local domain to discard:."""

    name = "postfix"

    def __init__(self, directory):
        self.directory = directory
        self.conf = os.path.join(directory, "conf")
        self.port = free_port()
        self.master_pid = None

    def postfix(self, *args, check=True):
        log_path = os.path.join(self.directory, "postfix-command.log")
        with open(log_path, "ab") as out:
            # `script` gives postfix a tty: without one it prints nothing about what fails.
            status = subprocess.call(
                ["script", "-qec", " ".join(["postfix", "-c", self.conf, *args]), "/dev/null"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=60)
        if check and status != 0:
            raise BenchError(f"postfix {' '.join(args)} failed ({status}):\n{tail(log_path)}")

    def start(self, timeout=30):
        os.makedirs(self.conf, exist_ok=True)
        for sub in ("queue", "data"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        shutil.chown(os.path.join(self.directory, "data"), "postfix", "postfix")
        os.chmod(self.directory, 0o755)
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN.format(d=self.directory, domain=LOCAL_DOMAIN))
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER.format(listen=f"127.0.0.1:{self.port}"))
        self.postfix("start")
        pid_file = os.path.join(self.directory, "queue", "pid", "master.pid")
        deadline = time.monotonic() + timeout
        while self.master_pid is None and time.monotonic() < deadline:
            try:
                with open(pid_file) as f:
                    self.master_pid = int(f.read().strip())
            except (OSError, ValueError):
                time.sleep(0.05)
        if self.master_pid is None:
            raise BenchError(f"postfix master did not start\n{tail(os.path.join(self.directory, 'maillog'))}")
        wait_smtp(self.port, timeout, what="postfix smtpd")
        return self.master_pid

    @property
    def root_pid(self):
        return self.master_pid

    def queued(self):
        queue = os.path.join(self.directory, "queue")
        count = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(os.path.join(queue, sub)):
                count += len(files)
        return count

    def stop(self):
        if self.master_pid is None:
            return
        pids = tree(self.master_pid)
        self.postfix("stop", check=False)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
            time.sleep(0.05)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.master_pid = None


class Sink:
    """Postfix's smtp-sink: answers every command, stores nothing."""

    name = "sink"

    def __init__(self, directory):
        self.directory = directory
        self.port = free_port()
        self.proc = None

    def start(self, timeout=15):
        os.makedirs(self.directory, exist_ok=True)
        with open(os.path.join(self.directory, "smtp-sink.log"), "ab") as out:
            self.proc = subprocess.Popen(
                ["smtp-sink", "-u", "nobody", f"127.0.0.1:{self.port}", "1024"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        wait_smtp(self.port, timeout, self.proc, "smtp-sink")
        return self.proc.pid

    @property
    def root_pid(self):
        return self.proc.pid

    def drain(self, timeout):
        return True

    def stop(self):
        if self.proc is not None:
            stop_process(self.proc, grace=5)


def free_port_range(count):
    """The first of `count` consecutive free ports (for SeaweedFS, which opens about ten)."""
    import random
    for _ in range(200):
        base = random.randrange(30000, 45000)
        if _ports_given.intersection(range(base, base + count)):
            continue
        try:
            sockets = []
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            _ports_given.update(range(base, base + count))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise BenchError(f"no {count} consecutive free ports")


class Cluster(Queueing):
    """Cluster mode as `scripts/cluster.sh` starts it (PostgreSQL, Redis, SeaweedFS S3, haproxy
    with PROXY v2 in front of two ingress nodes, a delivery node, an admin node), with its state
    in a temp dir and its service ports free ones. The nodes' own ports are cluster.sh's fixed
    ones (2601-2604, 8101-8104, 8201-8204): nothing else may use them meanwhile."""

    name = "cluster"

    def __init__(self, binary_dir, directory):
        build = os.path.relpath(binary_dir, os.path.join(ROOT, ".build"))
        if build.startswith(".."):
            raise BenchError(f"cluster mode runs the server from .build/, not {binary_dir}")
        self.directory = directory
        self.state = os.path.join(directory, "cluster")
        self.port = free_port()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SMTP_")}
        self.env.update({
            "CLUSTER_DIR": self.state, "CLUSTER_BUILD": build, "CLUSTER_SMTP_PORT": str(self.port),
            "CLUSTER_PG_PORT": str(free_port()), "CLUSTER_REDIS_PORT": str(free_port()),
            "CLUSTER_S3_PORT": str(free_port()), "CLUSTER_S3_BASE_PORT": str(free_port_range(12)),
            "SMTP_LOCAL_DOMAINS": LOCAL_DOMAIN, "SMTP_ENABLE_AUTH": "false",
            "SMTP_ADMIN_USERNAME": "bench", "SMTP_ADMIN_EMAIL": RECIPIENT, "SMTP_ADMIN_PASSWORD": ADMIN_PASSWORD,
            "SMTP_RATE_CONNECTIONS_PER_MINUTE": "0", "SMTP_RATE_COMMANDS_PER_MINUTE": "0",
            "SMTP_RATE_AUTH_FAILURES_PER_HOUR": "0", "SMTP_RATE_MESSAGES_PER_HOUR": "0",
            "SMTP_MAX_CONNECTIONS": "1000", "SMTP_SHUTDOWN_GRACE_SECONDS": "3",
        })
        self.started = False

    def cluster_sh(self, command, timeout=300):
        log_path = os.path.join(self.directory, "cluster-sh.log")
        with open(log_path, "ab") as out:
            status = subprocess.call([os.path.join(ROOT, "scripts", "cluster.sh"), command], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
        if status != 0:
            raise BenchError(f"cluster.sh {command} failed ({status}):\n{tail(log_path)}")

    def start(self):
        self.started = True
        self.cluster_sh("start")
        wait_smtp(self.port, 60, what="haproxy")
        return self.root_pid

    def roots(self):
        """haproxy, the nodes, PostgreSQL's postmaster, Redis, SeaweedFS."""
        files = [os.path.join(self.state, "run", name) for name in os.listdir(os.path.join(self.state, "run"))]
        services = os.path.join(self.state, "services")
        files += [os.path.join(services, "postgres", "data", "postmaster.pid"),
                  os.path.join(services, "redis", "redis.pid"), os.path.join(services, "seaweedfs", "weed.pid")]
        pids = []
        for path in files:
            try:
                with open(path) as f:
                    pids.append(int(f.readline().strip()))
            except (OSError, ValueError):
                pass
        return pids

    @property
    def root_pid(self):
        return self.roots()

    def queued(self):
        with open(os.path.join(self.state, "env")) as f:
            url = next(line.split("=", 1)[1].strip() for line in f if line.startswith("export SMTP_DATABASE_URL="))
        result = subprocess.run(["psql", url, "-tAc", "SELECT COUNT(*) FROM queue_recipients WHERE status <> 'delivered'"],
                                capture_output=True, text=True, timeout=30)
        return int(result.stdout.strip()) if result.returncode == 0 and result.stdout.strip().isdigit() else None

    def stop(self):
        if self.started:
            self.started = False
            try:
                self.cluster_sh("stop", timeout=120)
            except (BenchError, subprocess.SubprocessError) as error:
                log(f"cluster: {error}")


# MARK: - load

def smtp_source(port, size, reuse, sessions, messages, timeout=600):
    """Runs smtp-source; returns the wall time in seconds."""
    command = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", str(size),
               "-f", SENDER, "-t", RECIPIENT, "-M", "load.invalid"]
    if reuse:
        command.append("-d")
    command.append(f"127.0.0.1:{port}")
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        status = subprocess.call(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 timeout=timeout)
        elapsed = time.perf_counter() - start
        if status != 0:
            out.seek(0)
            raise BenchError(f"smtp-source exited {status}: {out.read()[-2000:].decode(errors='replace')}")
    return elapsed


def python_load(port, size, reuse, sessions, messages, to=RECIPIENT, auth=None, timeout=600, generator=None):
    """Runs a latency generator in its own process — `generator` (the path of mailtier-load)
    or else bench/smtp_load.py, which take the same arguments; returns its JSON summary."""
    program = [generator] if generator else [sys.executable, os.path.join(HERE, "smtp_load.py")]
    command = program + ["--port", str(port), "--sessions", str(sessions), "--messages", str(messages),
                         "--size", str(size), "--from", SENDER, "--to", to]
    if reuse:
        command.append("--reuse")
    if auth:
        command += ["--auth", auth]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        status = subprocess.call(command, stdin=subprocess.DEVNULL, stdout=out, stderr=err, timeout=timeout)
        out.seek(0)
        err.seek(0)
        text = out.read().decode(errors="replace")
        try:
            result = json.loads(text)
        except ValueError:
            raise BenchError(f"{os.path.basename(command[1 if not generator else 0])} exited {status}: {text[-500:]} {err.read()[-1500:].decode(errors='replace')}")
    if result["errors"]:
        raise BenchError(f"{result.get('generator', 'smtp_load.py')}: {result['errors']} errors, first: {result['first_error']}")
    return result


# MARK: - scenarios

@contextlib.contextmanager
def workspace(workdir, prefix):
    """A scenario's temp directory and the servers it starts (appended by the scenario);
    the servers are stopped, last started first, and the directory removed after it."""
    directory = tempfile.mkdtemp(prefix=prefix, dir=workdir)
    os.chmod(directory, 0o755)  # Postfix's daemons run as the postfix user
    servers = []
    try:
        yield directory, servers
    finally:
        for server in reversed(servers):
            server.stop()
        if os.environ.get("BENCH_KEEP") == "1":  # for debugging: logs and state stay
            log(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


def ingress_scenario(target_name, make_server, size, reuse, p, workdir, latency_pass=True):
    name = f"ingress/{target_name}/{size_label(size)}/{'reuse' if reuse else 'new'}"
    result = {"name": name, "kind": "ingress", "target": target_name, "size": size,
              "connections": "reuse" if reuse else "new", "sessions": p.sessions, "messages": p.messages}
    log(f"{name}: {p.messages} messages, {p.sessions} sessions")
    with workspace(workdir, f"{target_name}-") as (directory, servers):
        server = make_server(directory)
        servers.append(server)
        server.start()
        root = server.root_pid
        time.sleep(0.3)
        cpu_before = tree_cpu(root)
        with RSSSampler(root, whole_tree=target_name in ("postfix", "cluster")) as sampler:
            elapsed = smtp_source(server.port, size, reuse, p.sessions, p.messages)
        cpu_used = tree_cpu(root) - cpu_before
        result.update({
            "elapsed_s": round(elapsed, 3),
            "msgs_per_s": round(p.messages / elapsed, 1),
            "mb_per_s": round(p.messages * size / elapsed / 1e6, 2),
            "peak_rss_mb": round(sampler.peak_kb / 1024, 1),
            "cpu_s_per_1000": round(cpu_used / p.messages * 1000, 3),
        })
        drain_start = time.monotonic()
        drained = server.drain(p.drain_timeout)
        result["drain_s"] = round(time.monotonic() - drain_start, 2) if drained else None
        if not drained:
            log(f"{name}: queue not drained after {p.drain_timeout} s; the latency pass runs with a backlog")
        if latency_pass:
            latency = python_load(server.port, size, reuse, p.sessions, p.latency_messages, generator=p.generator)
            result["latency_ms"] = latency["latency_ms"]
            result["latency_pass"] = {k: latency[k] for k in ("messages", "elapsed_s", "msgs_per_s")}
            result["latency_pass"]["generator"] = latency.get("generator", "smtp_load.py")
        result["ok"] = True
    p99 = (result.get("latency_ms") or {}).get("p99")
    log(f"{name}: {result['msgs_per_s']} msg/s" + (f", p99 {p99} ms" if p99 is not None else ""))
    return result


def delivery_scenario(binary, p, workdir):
    name = "delivery/ours/1k"
    count = p.delivery_messages
    result = {"name": name, "kind": "delivery", "target": "ours", "size": 1024, "connections": "reuse",
              "messages": count, "outbound_concurrency": 10}
    log(f"{name}: queueing {count} messages")
    with workspace(workdir, "delivery-") as (directory, servers):
        sink = Sink(os.path.join(directory, "sink"))
        ingress = Ours(binary, directory, role="ingress")
        servers += [sink, ingress]
        ingress.start()
        python_load(ingress.port, 1024, True, min(10, count), count, to="rcpt{n}@remote.bench",
                    auth=f"bench:{ADMIN_PASSWORD}")
        ingress.stop()
        queued = ingress.queued()
        if queued != count:
            raise BenchError(f"{queued} recipients queued, expected {count}")
        sink.start()
        worker = Ours(binary, directory, role="delivery",
                      extra={"SMTP_RELAY_HOST": f"127.0.0.1:{sink.port}", "SMTP_OUTBOUND_CONCURRENCY": "10",
                             "SMTP_QUEUE_POLL_SECONDS": "1"})
        servers.append(worker)
        started = time.monotonic()
        worker.start()
        first = last = None
        cpu_before = None
        deadline = started + p.drain_timeout
        left_at_first = count
        with RSSSampler(worker.root_pid, whole_tree=False) as sampler:
            while time.monotonic() < deadline:
                if cpu_before is None:
                    cpu_before = tree_cpu(worker.root_pid)
                left = worker.queued()
                now = time.monotonic()
                if left is not None and left < count and first is None:
                    first, left_at_first = now, left
                if left == 0:
                    last = now
                    break
                if worker.proc.poll() is not None:
                    raise BenchError(f"delivery server exited {worker.proc.returncode}\n{tail(worker.log_path)}")
                time.sleep(0.02)
        cpu_used = tree_cpu(worker.root_pid) - cpu_before
        if last is None:
            raise BenchError(f"{worker.queued()} of {count} not delivered after {p.drain_timeout} s")
        if left_at_first > 0 and last > first:
            # At `first` the first deliveries were seen and `left_at_first` were still queued:
            # those took until `last`.
            span, delivered = last - first, left_at_first
        else:  # all of them between two polls: count from the start of the process
            span, delivered = last - started, count
        result.update({
            "elapsed_s": round(span, 3),
            "from_start_s": round(last - started, 3),
            "msgs_per_s": round(delivered / span, 1),
            "mb_per_s": round(delivered * 1024 / span / 1e6, 2),
            "peak_rss_mb": round(sampler.peak_kb / 1024, 1),
            "cpu_s_per_1000": round(cpu_used / count * 1000, 3),
            "ok": True,
        })
    log(f"{name}: {result['msgs_per_s']} msg/s")
    return result


def idle_scenario(binary, p, workdir):
    name = "idle/ours"
    count = p.idle
    result = {"name": name, "kind": "idle", "target": "ours", "connections_wanted": count}
    log(f"{name}: {count} idle sessions")
    with workspace(workdir, "idle-") as (directory, servers):
        server = Ours(binary, directory, max_connections=count + 100)
        servers.append(server)
        server.start()
        pid = server.root_pid

        async def measure():
            warm, _ = await smtp_load.open_idle("127.0.0.1", server.port, min(20, count))
            for w in warm:
                w.close()
            await asyncio.sleep(1.0)
            before = status_kb(pid, "VmRSS")
            start = time.perf_counter()
            writers, errors = await smtp_load.open_idle("127.0.0.1", server.port, count)
            opened_in = time.perf_counter() - start
            await asyncio.sleep(1.0)
            after = status_kb(pid, "VmRSS")
            for w in writers:
                w.close()
            await asyncio.sleep(1.0)
            closed = status_kb(pid, "VmRSS")
            return before, after, closed, len(writers), errors, opened_in

        before, after, closed, opened, errors, opened_in = asyncio.run(measure())
        if opened != count:
            raise BenchError(f"opened {opened} of {count} sessions; first error: {errors[:1]}")
        result.update({
            "connections": opened,
            "open_s": round(opened_in, 3),
            "rss_before_mb": round(before / 1024, 1),
            "rss_with_idle_mb": round(after / 1024, 1),
            "rss_after_close_mb": round(closed / 1024, 1),
            "rss_per_connection_kb": round((after - before) / opened, 2),
            "ok": True,
        })
    log(f"{name}: {result['rss_per_connection_kb']} KB per connection")
    return result


def size_label(size):
    return f"{size // 1024}k" if size % 1024 == 0 else f"{size}b"


def merge_runs(runs):
    """One row from the repeated runs of a scenario: the median msg/s (and MB/s), the other
    figures of the run that had it (the lower middle for an even count), the latency of the
    run that measured it, and every run's msg/s."""
    ok = [r for r in runs if r.get("ok")]
    if not ok:
        return runs[-1]
    ranked = sorted(ok, key=lambda r: r["msgs_per_s"])
    row = dict(ranked[(len(ranked) - 1) // 2])
    values = sorted(r["msgs_per_s"] for r in ok)
    row["msgs_per_s"] = round(statistics.median(values), 1)
    if row.get("size"):
        row["mb_per_s"] = round(row["msgs_per_s"] * row["size"] / 1e6, 2)
    row["runs"] = len(ok)
    row["runs_msgs_per_s"] = [r["msgs_per_s"] for r in ok]
    if len(ok) < len(runs):
        row["failed_runs"] = len(runs) - len(ok)
    measured = next((r for r in ok if r.get("latency_ms")), None)
    if measured:
        row["latency_ms"], row["latency_pass"] = measured["latency_ms"], measured["latency_pass"]
    return row


def add_ratios(scenarios):
    by_name = {s["name"]: s for s in scenarios}
    for s in scenarios:
        if s["kind"] != "ingress" or s["target"] not in ("ours", "cluster") or not s.get("ok"):
            continue
        for peer in ("postfix", "sink"):
            other = by_name.get(s["name"].replace(f"/{s['target']}/", f"/{peer}/"))
            if other and other.get("ok") and other.get("msgs_per_s"):
                s[f"ratio_vs_{peer}"] = round(s["msgs_per_s"] / other["msgs_per_s"], 2)


def machine():
    def first(path, key):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return None

    def output(command):
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "cpus": os.cpu_count(),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "memory_gb": round(int(first("/proc/meminfo", "MemTotal").split()[0]) / 1024 / 1024, 1),
        "kernel": platform.release(),
        "postfix": output(["postconf", "-dh", "mail_version"]),
        "python": platform.python_version(),
        "commit": output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]),
        "load_average": os.getloadavg(),
    }


# MARK: - output

def fmt(value, digits=1):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(report):
    rows = [("scenario", "msg/s", "MB/s", "p50 ms", "p95 ms", "p99 ms", "peak RSS MB", "CPU s/1k", "vs postfix", "vs sink")]
    for s in report["scenarios"]:
        if s["kind"] == "idle":
            continue
        if not s.get("ok"):
            rows.append((s["name"], "FAILED", "", "", "", "", "", "", "", ""))
            continue
        lat = s.get("latency_ms") or {}
        rows.append((s["name"], msgs_cell(s), fmt(s.get("mb_per_s"), 2), fmt(lat.get("p50")),
                     fmt(lat.get("p95")), fmt(lat.get("p99")), fmt(s.get("peak_rss_mb")),
                     fmt(s.get("cpu_s_per_1000"), 3),
                     fmt(s.get("ratio_vs_postfix"), 2) + ("x" if s.get("ratio_vs_postfix") else ""),
                     fmt(s.get("ratio_vs_sink"), 2) + ("x" if s.get("ratio_vs_sink") else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    for s in report["scenarios"]:
        if s["kind"] == "idle":
            if s.get("ok"):
                lines.append(f"{s['name']}: {s['connections']} idle sessions, RSS {s['rss_before_mb']} -> "
                             f"{s['rss_with_idle_mb']} MB: {s['rss_per_connection_kb']} KB per connection "
                             f"({s['rss_after_close_mb']} MB after closing them)")
            else:
                lines.append(f"{s['name']}: FAILED")
    return "\n".join(lines)


def msgs_cell(s):
    """msg/s, with the range of the runs when there were several: `2885 (2593-3177)`."""
    values = s.get("runs_msgs_per_s") or []
    if len(values) > 1:
        return f"{fmt(s.get('msgs_per_s'))} ({min(values):.0f}-{max(values):.0f})"
    return fmt(s.get("msgs_per_s"))


def markdown_table(report):
    head = "| scenario | msg/s | MB/s | p50 ms | p95 ms | p99 ms | peak RSS MB | CPU s/1000 msg | ours/Postfix | ours/smtp-sink |"
    lines = [head, "|" + "---|" * 10]
    for s in report["scenarios"]:
        if s["kind"] == "idle" or not s.get("ok"):
            continue
        lat = s.get("latency_ms") or {}
        ratio = lambda k: (fmt(s.get(k), 2) + "×") if s.get(k) else ""
        lines.append(f"| {s['name']} | {msgs_cell(s)} | {fmt(s.get('mb_per_s'), 2)} | "
                     f"{fmt(lat.get('p50'))} | {fmt(lat.get('p95'))} | {fmt(lat.get('p99'))} | "
                     f"{fmt(s.get('peak_rss_mb'))} | {fmt(s.get('cpu_s_per_1000'), 3)} | "
                     f"{ratio('ratio_vs_postfix')} | {ratio('ratio_vs_sink')} |")
    return "\n".join(lines)


README_START = "<!-- bench:results (written by bench/run.py after a complete run) -->"
README_END = "<!-- /bench:results -->"


def results_section(report):
    m = report["machine"]
    idle = next((s for s in report["scenarios"] if s["kind"] == "idle" and s.get("ok")), None)
    delivery = next((s for s in report["scenarios"] if s["kind"] == "delivery" and s.get("ok")), None)
    lines = [
        README_START,
        f"Latest run: {report['timestamp']}, commit `{m['commit']}`, on {m['cpus']} × {m['cpu_model']}, "
        f"{m['memory_gb']} GB, Linux {m['kernel']}, Postfix {m['postfix']} (load average at the start: "
        f"{', '.join(f'{x:.2f}' for x in m['load_average'])}). "
        f"{report['parameters']['sessions']} sessions, {report['parameters']['messages']} messages per scenario"
        + (f"; each ingress scenario ran {report['parameters'].get('repeat')} times, alternating with its peers "
           "(the cluster once): msg/s is the median, the range of the runs in brackets, the other columns "
           "from the median run." if (report['parameters'].get('repeat') or 1) > 1 else "."),
        "",
        markdown_table(report),
        "",
    ]
    if delivery:
        lines += [f"Delivery: {delivery['messages']} queued messages to smtp-sink in {delivery['from_start_s']} s "
                     f"from the start of the delivery process ({delivery['msgs_per_s']} msg/s from the first to the last delivered).", ""]
    if idle:
        lines += [f"Idle sessions: {idle['connections']} open sessions grew the server's RSS from "
                     f"{idle['rss_before_mb']} MB to {idle['rss_with_idle_mb']} MB: **{idle['rss_per_connection_kb']} KB per "
                     f"connection** ({idle['rss_after_close_mb']} MB after they closed).", ""]
    lines += ["![latest results](bench/results/latest.png)", README_END]
    return "\n".join(lines)


def update_readme(report, path):
    with open(path) as f:
        text = f.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < 0:
        log(f"no results markers in {path}: not updated")
        return
    with open(path, "w") as f:
        f.write(text[:start] + results_section(report) + text[end + len(README_END):])
    log(f"updated the results in {path}")


def chart(report, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no chart")
        return False
    ingress = [s for s in report["scenarios"] if s["kind"] == "ingress" and s.get("ok")]
    cases = []
    for s in ingress:
        case = f"{size_label(s['size'])} {s['connections']}"
        if case not in cases:
            cases.append(case)
    targets = [("ours", "MailTier (embedded)", "tab:blue"), ("cluster", "MailTier cluster (haproxy, 2 ingress)", "tab:purple"),
               ("postfix", "Postfix smtpd→queue→discard", "tab:orange"), ("sink", "smtp-sink (ceiling)", "tab:green")]
    targets = [t for t in targets if any(s["target"] == t[0] for s in ingress)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(targets)
    for i, (target, label, color) in enumerate(targets):
        xs, rate, p50, p99 = [], [], [], []
        for x, case in enumerate(cases):  # a case the target did not run gets no bar
            match = [s for s in ingress if s["target"] == target and f"{size_label(s['size'])} {s['connections']}" == case]
            if match:
                xs.append(x + (i - (len(targets) - 1) / 2) * width)
                rate.append(match[0]["msgs_per_s"])
                p50.append(match[0]["latency_ms"]["p50"])
                p99.append(match[0]["latency_ms"]["p99"])
        bars = ax1.bar(xs, rate, width, label=label, color=color)
        ax1.bar_label(bars, fmt="%.0f", fontsize=7)
        ax2.bar(xs, p99, width, color=color, alpha=0.35, label=f"{label}: p99")
        ax2.bar(xs, p50, width * 0.5, color=color, label=f"{label}: p50")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases)
    ax1.set_ylabel("messages per second (smtp-source)")
    ax1.set_title("Ingress throughput")
    ax1.set_ylim(top=ax1.get_ylim()[1] * 1.15)
    ax1.legend(fontsize=8)
    generator = next((s["latency_pass"]["generator"] for s in ingress), "")
    ax2.set_ylabel(f"ms, MAIL to the final 250 ({generator})")
    ax2.set_yscale("log")
    ax2.set_ylim(top=ax2.get_ylim()[1] * 10)  # room for the legend above the bars
    ax2.set_title("Latency p50 (narrow) and p99 (wide)")
    ax2.legend(fontsize=7)
    m = report["machine"]
    p = report["parameters"]
    fig.suptitle(f"{report['timestamp']}  {m['cpus']} CPUs {m.get('cpu_model') or ''}  "
                 f"{p['sessions']} sessions, {p['messages']} messages", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# MARK: - main

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny counts, seconds, no chart required")
    parser.add_argument("--bin", default=os.path.join(ROOT, ".build", "release"),
                        help="directory holding smtp-server (default .build/release)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--messages", type=int)
    parser.add_argument("--sessions", type=int)
    parser.add_argument("--latency-messages", type=int)
    parser.add_argument("--delivery-messages", type=int)
    parser.add_argument("--idle", type=int, help="idle sessions to open")
    parser.add_argument("--sizes", default="1024,102400")
    parser.add_argument("--targets", help="default ours,cluster,postfix,sink (smoke: no cluster)")
    parser.add_argument("--cluster-sizes", default="1024", help="sizes the cluster runs (its start alone takes ~20 s)")
    parser.add_argument("--only", help="run only scenarios whose name contains this")
    parser.add_argument("--python-load", action="store_true", help="latency from bench/smtp_load.py even when mailtier-load is built")
    parser.add_argument("--repeat", type=int, help="runs of each ingress scenario, median reported (default 3; smoke 1)")
    parser.add_argument("--drain-timeout", type=float, default=120,
                        help="seconds to wait for a queue to empty between passes (and for the delivery scenario)")
    p = parser.parse_args()
    smoke = p.smoke or os.environ.get("BENCH_SMOKE") == "1"
    defaults = dict(messages=50, sessions=5, latency_messages=50, delivery_messages=50, idle=50, repeat=1) if smoke else \
        dict(messages=5000, sessions=50, latency_messages=2000, delivery_messages=5000, idle=5000, repeat=3)
    for key, value in defaults.items():
        if getattr(p, key) is None:
            setattr(p, key, value)
    default_targets = "ours,postfix,sink" if smoke else "ours,cluster,postfix,sink"
    p.targets = p.targets or default_targets
    if smoke:
        p.drain_timeout = min(p.drain_timeout, 60)

    p.bin = os.path.abspath(p.bin)
    binary = os.path.join(p.bin, "smtp-server")
    # The latency generator: mailtier-load (SwiftNIO) when it was built next to the server,
    # else the Python first version.
    p.generator = os.path.join(p.bin, "mailtier-load")
    if p.python_load or not os.access(p.generator, os.X_OK):
        p.generator = None
    missing = [tool for tool in ("smtp-source", "smtp-sink", "postfix", "postconf", "script") if not shutil.which(tool)]
    if not os.access(binary, os.X_OK):
        missing.append(binary)
    if missing:
        log("missing: " + ", ".join(missing) + " (scripts/install-deps.sh installs the Postfix tools)")
        return 2

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = p.idle + 1000
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(wanted, soft), hard), hard))
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < wanted:
            log(f"open files limit {hard} is below {wanted}: fewer idle sessions")
            p.idle = max(10, hard - 1000)

    workdir = tempfile.mkdtemp(prefix="mailtier-bench-")
    os.chmod(workdir, 0o755)  # Postfix's daemons run as the postfix user
    timestamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%SZ")
    report = {"timestamp": timestamp, "smoke": smoke, "machine": machine(), "server": binary,
              "parameters": {"messages": p.messages, "sessions": p.sessions, "repeat": p.repeat,
                             "latency_messages": p.latency_messages,
                             "delivery_messages": p.delivery_messages, "idle_sessions": p.idle,
                             "sizes": [int(s) for s in p.sizes.split(",")], "targets": p.targets.split(","),
                             "load": "smtp-source (throughput), "
                                     f"{'mailtier-load' if p.generator else 'bench/smtp_load.py'} (latency)"},
              "scenarios": []}

    makers = {
        "ours": lambda d: Ours(binary, d, max_connections=max(1000, p.sessions * 4)),
        "postfix": Postfix,
        "sink": Sink,
        "cluster": lambda d: Cluster(p.bin, d),
    }
    # Every ingress scenario runs `--repeat` times (the cluster once: its start alone takes
    # ~20 s), in rounds, so that the runs of ours and of its peers alternate and a noisy minute
    # hits them alike; a scenario's row is its median run. The latency pass runs in round 1.
    plan = []
    for round_number in range(p.repeat):
        for size in report["parameters"]["sizes"]:
            for reuse in (False, True):
                for target in p.targets.split(","):
                    if target == "cluster" and (str(size) not in p.cluster_sizes.split(",") or round_number > 0):
                        continue
                    name = f"ingress/{target}/{size_label(size)}/{'reuse' if reuse else 'new'}"
                    plan.append((name, lambda t=target, s=size, r=reuse, first=round_number == 0:
                                 ingress_scenario(t, makers[t], s, r, p, workdir, latency_pass=first)))
    plan.append(("delivery/ours/1k", lambda: delivery_scenario(binary, p, workdir)))
    plan.append(("idle/ours", lambda: idle_scenario(binary, p, workdir)))

    os.makedirs(p.out, exist_ok=True)
    prefix = "smoke-" if smoke else ""

    def save(names):
        add_ratios(report["scenarios"])
        for name in names:
            with open(os.path.join(p.out, name), "w") as f:
                json.dump(report, f, indent=2)
                f.write("\n")

    failed = 0
    report["complete"] = False
    runs = {}  # scenario name -> its runs, in the order the names first ran
    try:
        for name, run in plan:
            if p.only and p.only not in name:
                continue
            try:
                result = run()
            except (BenchError, OSError, subprocess.SubprocessError) as error:
                failed += 1
                log(f"{name}: FAILED: {error}")
                kind, target = name.split("/")[:2]
                result = {"name": name, "kind": kind, "target": target, "ok": False, "error": str(error)[-3000:]}
            runs.setdefault(name, []).append(result)
            report["scenarios"] = [merge_runs(r) if r[0]["kind"] == "ingress" else r[-1] for r in runs.values()]
            save([f"{prefix}{timestamp}.json"])  # what is done so far, should the run be stopped
    finally:
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)

    report["complete"] = True
    save([f"{prefix}{timestamp}.json", f"{prefix}latest.json"])
    if not smoke:
        chart(report, os.path.join(p.out, "latest.png"))
        with open(os.path.join(p.out, "latest.md"), "w") as f:
            f.write(results_section(report) + "\n")
        # The README shows the latest complete run with the default loads, nothing partial.
        complete = not p.only and p.targets == default_targets and p.sizes == "1024,102400" \
            and (p.messages, p.sessions) == (5000, 50)
        if complete and not failed and os.path.abspath(p.out) == os.path.join(ROOT, "bench", "results"):
            update_readme(report, os.path.join(ROOT, "README.md"))
    print(table(report))
    print(f"results: {os.path.join(p.out, prefix + timestamp + '.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
