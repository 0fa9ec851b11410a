#!/usr/bin/env python3
"""Sends messages with smtplib, one connection per message, from several threads, and
reports what became of each, for the cluster tests.

usage: load_sender.py --port P [--host H] [--source ADDR] --to ADDR [--from ADDR]
                      (--count N | --duration SECONDS) [--threads T] [--size BYTES]
                      [--stop-file F]
       load_sender.py --port P [--source ADDR] --greetings N [--threads T] --to X

--count sends N messages in all; --duration keeps sending until the time is up (or until
--stop-file exists). --source binds the client socket to that local address (any of
127.0.0.0/8 works on Linux), so a test can be "one client address".

Output: one JSON object per message attempt, {"n": int, "code": int|null, "id": str|null,
"error": str|null, "start": unix time, "t": seconds taken}: "code" is the reply to the end of data (null when the
session broke before it), "id" the queue id of a 250. Then {"done": true}.
"""
import argparse
import json
import re
import smtplib
import sys
import threading
import time

lock = threading.Lock()


def out(obj):
    with lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def message(n, size):
    head = "From: load@example.org\r\nTo: rcpt\r\nSubject: load %d\r\nMessage-ID: <load-%d-%f@example.org>\r\n\r\n" % (
        n, n, time.time())
    line = ("message %d " % n) * 8 + "\r\n"
    body = ""
    while len(head) + len(body) < size:
        body += line
    return head + body


def send_one(args, n):
    start = time.time()
    code, qid, error = None, None, None
    try:
        source = (args.source, 0) if args.source else None
        with smtplib.SMTP(args.host, args.port, local_hostname="load.example.org", timeout=30,
                          source_address=source) as smtp:
            smtp.ehlo()
            smtp.mail(args.sender)
            rcode, rtext = smtp.rcpt(args.to)
            if rcode != 250:
                code, error = rcode, rtext.decode("utf-8", "replace")
            else:
                code, text = smtp.data(message(n, args.size).encode())
                text = text.decode("utf-8", "replace")
                if code == 250:
                    m = re.search(r"queued as (\S+)", text)
                    qid = m.group(1) if m else None
                else:
                    error = text
            try:
                smtp.quit()
            except Exception:
                pass
    except smtplib.SMTPResponseException as e:
        code, error = e.smtp_code, e.smtp_error.decode("utf-8", "replace") if isinstance(e.smtp_error, bytes) else str(e.smtp_error)
    except Exception as e:  # connection refused/reset, timeout: nothing was acknowledged
        error = "%s: %s" % (type(e).__name__, e)
    out({"n": n, "code": code, "id": qid, "error": error, "start": round(start, 3), "t": round(time.time() - start, 3)})


def greetings(args):
    """--greetings N: opens N connections (all at once with --threads > 1) and reports the
    first reply line of each, then QUIT."""
    import socket

    def one(n):
        line = None
        try:
            s = socket.create_connection((args.host, args.port), timeout=10,
                                         source_address=(args.source, 0) if args.source else None)
            f = s.makefile("rb")
            raw = f.readline()
            line = raw.decode("utf-8", "replace").rstrip("\r\n") if raw else None
            try:
                s.sendall(b"QUIT\r\n")
                f.readline()
            except OSError:
                pass
            s.close()
        except OSError as e:
            line = "error: %s" % e
        out({"n": n, "line": line})

    if args.threads > 1:
        threads = [threading.Thread(target=one, args=(n,)) for n in range(1, args.greetings + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for n in range(1, args.greetings + 1):
            one(n)
    out({"done": True})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--source")
    p.add_argument("--to", required=True)
    p.add_argument("--from", dest="sender", default="load@example.org")
    p.add_argument("--count", type=int)
    p.add_argument("--duration", type=float)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--stop-file")
    p.add_argument("--greetings", type=int)
    args = p.parse_args()
    if args.greetings:
        greetings(args)
        return
    counter = iter(range(1, 10**9))
    deadline = time.time() + args.duration if args.duration else None

    def worker():
        import os
        while True:
            with lock:
                n = next(counter)
            if args.count is not None and n > args.count:
                return
            if deadline is not None and time.time() > deadline:
                return
            if args.stop_file and os.path.exists(args.stop_file):
                return
            send_one(args, n)
            if deadline is not None and code_pause[0]:
                time.sleep(0.01)

    code_pause = [args.duration is not None]
    threads = [threading.Thread(target=worker) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out({"done": True})


if __name__ == "__main__":
    main()
