#!/usr/bin/env python3
"""Plays a scripted raw-socket SMTP dialogue and prints what the server said.

usage: smtp_session.py PORT SCRIPT.json

SCRIPT is a JSON array of steps; each has "op" and optionally "c" (a connection
name, default "0"; a connection to 127.0.0.1:PORT is opened on first use):

  {"op": "send", "data": "<base64>"}            one sendall() of exactly these bytes
  {"op": "expect", "n": N, "timeout": T}        read N complete replies (multi-line aware)
  {"op": "eof", "timeout": T}                   read until the peer closes
  {"op": "tls", "cafile": PATH}                 TLS handshake (server name "localhost")
  {"op": "close"}                               close the connection
  {"op": "mark", "name": NAME}                  print a mark (for synchronisation)
  {"op": "wait_file", "path": P, "timeout": T}  wait until the file P exists

Output: one JSON object per line. Every step that reads prints
  {"step": i, "replies": [[line, ...], ...], "extra": [line, ...], "eof": bool,
   "timeout": bool, "error": str|null}
where "replies" are complete replies (each a list of its lines, CRLF stripped)
and "extra" holds complete lines that were not part of a complete reply.
Lines are decoded as UTF-8 with backslash escapes for invalid bytes.
"""
import base64
import json
import os
import select
import socket
import ssl
import sys
import time


def out(obj):
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


class Conn:
    def __init__(self, port):
        self.sock = None
        self.buf = b""
        self.eof = False
        self.error = None
        try:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        except OSError as e:
            self.error = "connect: %s" % e
            self.eof = True

    def fill(self, deadline):
        """Reads once; returns False on timeout."""
        if self.eof:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        # An SSL socket may hold decrypted bytes that select() cannot see.
        pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0
        if not pending:
            r, _, _ = select.select([self.sock], [], [], remaining)
            if not r:
                return False
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError) as e:
            self.error = "recv: %s" % e
            self.eof = True
            return True
        if not data:
            self.eof = True
        self.buf += data
        return True

    def next_line(self):
        i = self.buf.find(b"\n")
        if i < 0:
            return None
        raw = self.buf[: i + 1]
        self.buf = self.buf[i + 1 :]
        if raw.endswith(b"\r\n"):
            raw = raw[:-2]
        else:
            raw = raw[:-1]
        return raw.decode("utf-8", "backslashreplace")


def read_replies(conn, n, timeout):
    deadline = time.monotonic() + timeout
    replies, current, timed_out = [], [], False
    while len(replies) < n:
        line = conn.next_line()
        if line is None:
            if conn.eof:
                break
            if not conn.fill(deadline):
                timed_out = True
                break
            continue
        current.append(line)
        if len(line) < 4 or line[3] != "-":
            replies.append(current)
            current = []
    return replies, current, timed_out


def main():
    port = int(sys.argv[1])
    with open(sys.argv[2], "rb") as f:
        steps = json.loads(f.read().decode("utf-8"))
    conns = {}

    def conn(name):
        if name not in conns:
            conns[name] = Conn(port)
        return conns[name]

    for i, step in enumerate(steps):
        op = step["op"]
        name = step.get("c", "0")
        if op == "send":
            c = conn(name)
            if c.sock is None or c.error:
                continue
            try:
                c.sock.sendall(base64.b64decode(step["data"]))
            except (OSError, ssl.SSLError) as e:
                c.error = "send: %s" % e
        elif op == "expect":
            c = conn(name)
            replies, partial, timed_out = read_replies(c, step.get("n", 1), step.get("timeout", 10))
            out({"step": i, "replies": replies, "extra": partial,
                 "eof": c.eof and not c.buf, "timeout": timed_out, "error": c.error})
        elif op == "eof":
            c = conn(name)
            deadline = time.monotonic() + step.get("timeout", 10)
            timed_out = False
            while not c.eof:
                if not c.fill(deadline):
                    timed_out = True
                    break
            lines = []
            while True:
                line = c.next_line()
                if line is None:
                    break
                lines.append(line)
            if c.buf:
                lines.append(c.buf.decode("utf-8", "backslashreplace"))
                c.buf = b""
            out({"step": i, "replies": [], "extra": lines, "eof": c.eof,
                 "timeout": timed_out, "error": c.error})
        elif op == "tls":
            c = conn(name)
            err = None
            if c.buf:
                err = "unread plaintext before TLS: %r" % c.buf
            else:
                try:
                    ctx = ssl.create_default_context(cafile=step["cafile"])
                    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
                except (OSError, ssl.SSLError, ValueError) as e:
                    err = "tls: %s" % e
            if err:
                c.error = err
                c.eof = True
            out({"step": i, "replies": [], "extra": [], "eof": c.eof,
                 "timeout": False, "error": err})
        elif op == "close":
            c = conn(name)
            if c.sock is not None:
                try:
                    c.sock.close()
                except OSError:
                    pass
            del conns[name]
        elif op == "mark":
            out({"mark": step["name"]})
        elif op == "wait_file":
            deadline = time.monotonic() + step.get("timeout", 30)
            while not os.path.exists(step["path"]) and time.monotonic() < deadline:
                time.sleep(0.02)
        else:
            raise SystemExit("unknown op %r" % op)


if __name__ == "__main__":
    main()
