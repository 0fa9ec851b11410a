#!/usr/bin/env python3
"""An SMTP load generator that records per-message latency (asyncio, first version).

Latency is the time from sending MAIL FROM to reading the final reply to the end of data
(the 250 after the dot): what a sender waits for the server to take responsibility. With
one connection per message, connecting, the greeting and EHLO are not in it.

Closed loop (default): --sessions concurrent sessions send --messages messages in all, each
session starting its next message as soon as the last one is answered. --reuse keeps each
session's connection for all its messages; otherwise every message has its own connection
(QUIT after it).

Open loop (--rate R): message i is due at start + i/R whatever the server does; at most
--sessions messages are in flight (each on its own connection); a message that has to wait
for a free slot counts that wait in its latency (no coordinated omission).

--auth USER:PASSWORD sends AUTH PLAIN after EHLO (for relayed recipients).

Prints one JSON object: messages (answered 250), errors, first_error, elapsed_s, msgs_per_s,
latency_ms {p50, p95, p99, max, mean}.

This is a Python first version: on a small machine the generator itself needs a good part
of a core, so compare latencies measured with the same generator only.
"""
import argparse
import asyncio
import base64
import json
import math
import sys
import time


class SMTPError(Exception):
    pass


def build_message(size, sender, recipient):
    """A header section and a body of 78-character lines, about `size` octets in all (the
    payload), ending with the end-of-data line. No line starts with a dot."""
    head = (f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: mailtier bench\r\n"
            f"Message-ID: <bench@load.invalid>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    body = bytearray(head)
    while len(body) + len(line) <= size:
        body += line
    if len(body) < size:
        body += b"x" * max(0, size - len(body) - 2) + b"\r\n"
    return bytes(body) + b".\r\n"


async def reply(reader):
    """Reads one (possibly multi-line) reply; returns (code, last line)."""
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError("connection closed by the server")
        if len(line) < 4 or line[3:4] != b"-":
            try:
                return int(line[:3]), line.decode("utf-8", "replace").rstrip()
            except ValueError:
                raise SMTPError(f"malformed reply {line[:80]!r}")


async def expect(reader, codes, what):
    code, text = await reply(reader)
    if code not in codes:
        raise SMTPError(f"{what}: {text}")
    return code


class Session:
    def __init__(self, args):
        self.args = args
        self.reader = None
        self.writer = None

    async def open(self):
        a = self.args
        self.reader, self.writer = await asyncio.open_connection(a.host, a.port, limit=1 << 16)
        await expect(self.reader, (220,), "greeting")
        self.writer.write(b"EHLO load.invalid\r\n")
        await expect(self.reader, (250,), "EHLO")
        if a.auth:
            token = base64.b64encode(b"\0" + a.auth.encode()).decode()
            self.writer.write(f"AUTH PLAIN {token}\r\n".encode())
            await expect(self.reader, (235,), "AUTH")

    async def send(self, message, sender, recipient):
        """One transaction, without pipelining; returns its latency in seconds."""
        w, r = self.writer, self.reader
        start = time.perf_counter()
        w.write(f"MAIL FROM:<{sender}>\r\n".encode())
        await expect(r, (250,), "MAIL")
        w.write(f"RCPT TO:<{recipient}>\r\n".encode())
        await expect(r, (250, 251), "RCPT")
        w.write(b"DATA\r\n")
        await expect(r, (354,), "DATA")
        w.write(message)
        await expect(r, (250,), "end of data")
        return time.perf_counter() - start

    async def close(self):
        if self.writer is None:
            return
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(reply(self.reader), 5)
        except Exception:
            pass
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except Exception:
            pass
        self.writer = None


def recipient_for(args, n):
    # "{n}" in --to numbers the recipients (remote delivery spreads them over addresses).
    return args.to.replace("{n}", str(n))


async def run(args):
    message_cache = {}
    latencies = []
    errors = []
    counter = iter(range(args.messages))

    def message(recipient):
        if recipient not in message_cache:
            message_cache[recipient] = build_message(args.size, args.sender, recipient)
        return message_cache[recipient]

    async def one(n, session=None, started=None):
        """Sends message n, on `session` or on a new connection; records the outcome."""
        own = session is None
        try:
            if own:
                session = Session(args)
                await session.open()
            rcpt = recipient_for(args, n)
            latency = await session.send(message(rcpt), args.sender, rcpt)
            if started is not None:  # open loop: from the time it was due
                latency = time.perf_counter() - started
            latencies.append(latency)
            return True
        except (OSError, SMTPError, asyncio.IncompleteReadError) as error:
            errors.append(f"message {n}: {type(error).__name__}: {error}")
            return False
        finally:
            if own and session is not None:
                await session.close()

    async def closed_loop_worker():
        session = None
        for n in counter:
            if not args.reuse:
                await one(n)
                continue
            if session is None:
                session = Session(args)
                try:
                    await session.open()
                except (OSError, SMTPError, asyncio.IncompleteReadError) as error:
                    errors.append(f"session: {type(error).__name__}: {error}")
                    session = None
                    continue
            if not await one(n, session):
                await session.close()
                session = None
        if session is not None:
            await session.close()

    start = time.perf_counter()
    if args.rate:
        slots = asyncio.Semaphore(args.sessions)

        async def due(n, at):
            async with slots:
                await one(n, started=at)

        tasks = []
        for n in range(args.messages):
            at = start + n / args.rate
            delay = at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(due(n, at)))
        await asyncio.gather(*tasks)
    else:
        await asyncio.gather(*(closed_loop_worker() for _ in range(args.sessions)))
    elapsed = time.perf_counter() - start
    return summary(latencies, errors, elapsed)


def percentile(sorted_values, p):
    if not sorted_values:
        return None
    # Nearest rank: the smallest value with at least p % of the values at or below it.
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def summary(latencies, errors, elapsed):
    values = sorted(latencies)
    ms = lambda v: None if v is None else round(v * 1000, 3)
    return {
        "messages": len(values),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "elapsed_s": round(elapsed, 3),
        "msgs_per_s": round(len(values) / elapsed, 1) if elapsed > 0 else 0,
        "latency_ms": {
            "p50": ms(percentile(values, 50)),
            "p95": ms(percentile(values, 95)),
            "p99": ms(percentile(values, 99)),
            "max": ms(values[-1] if values else None),
            "mean": ms(sum(values) / len(values) if values else None),
        },
    }


async def open_idle(host, port, count, parallel=200):
    """Opens `count` SMTP connections and reads each greeting; returns (writers, errors).
    The caller keeps them open as long as it needs, then closes the writers."""
    writers, errors = [], []
    gate = asyncio.Semaphore(parallel)

    async def connect():
        async with gate:
            try:
                reader, writer = await asyncio.open_connection(host, port)
                code, text = await asyncio.wait_for(reply(reader), 30)
                if code != 220:
                    errors.append(text)
                    writer.close()
                    return
                writers.append(writer)
            except (OSError, SMTPError, asyncio.TimeoutError) as error:
                errors.append(f"{type(error).__name__}: {error}")

    await asyncio.gather(*(connect() for _ in range(count)))
    return writers, errors


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sessions", type=int, default=50)
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=1024, help="payload octets (headers and body)")
    p.add_argument("--reuse", action="store_true", help="send every message of a session on one connection")
    p.add_argument("--rate", type=float, default=0, help="open loop: messages per second")
    p.add_argument("--from", dest="sender", default="load@load.invalid")
    p.add_argument("--to", required=True, help="recipient; {n} is replaced by the message number")
    p.add_argument("--auth", help="USER:PASSWORD for AUTH PLAIN")
    args = p.parse_args()
    if args.auth:
        user, _, password = args.auth.partition(":")
        args.auth = user + "\0" + password
    result = asyncio.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
