#!/usr/bin/env python3
"""An On-Demand Mail Relay client (RFC 2645): logs in, sends ATRN, and when the server answers 250
becomes the SMTP server on the same connection (aiosmtpd's real SMTP implementation, attached to
the connected socket), taking whatever the other side delivers until it says QUIT.

Prints one JSON line per step ({"step": ..., "line": ...}), then one per message received
({"message": {"mail_from", "rcpt_tos", "content_b64"}}), then {"closed": true}.

usage: atrn_client.py PORT USER PASSWORD DOMAIN[,DOMAIN...] [--hostname NAME] [--timeout S]
"""
import argparse
import asyncio
import base64
import json
import socket
import sys

from aiosmtpd.smtp import SMTP


def emit(obj):
    print(json.dumps(obj), flush=True)


def read_reply(f):
    lines = []
    while True:
        line = f.readline()
        if not line:
            raise ConnectionError("connection closed while reading a reply")
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        lines.append(text)
        if len(text) < 4 or text[3] != "-":
            return lines


def command(sock, f, step, text):
    sock.sendall(text.encode() + b"\r\n")
    lines = read_reply(f)
    emit({"step": step, "line": lines[-1], "lines": lines})
    return lines[-1]


class Collector:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        emit({"message": {"mail_from": envelope.mail_from, "rcpt_tos": envelope.rcpt_tos,
                          "content_b64": base64.b64encode(content).decode()}})
        return "250 2.0.0 taken by the ATRN client"


class TurnedAroundSMTP(SMTP):
    def __init__(self, *args, closed=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._closed = closed

    def connection_lost(self, exc):
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(True)


async def serve(sock, hostname, timeout):
    loop = asyncio.get_running_loop()
    closed = loop.create_future()
    handler = Collector()
    await loop.connect_accepted_socket(
        lambda: TurnedAroundSMTP(handler, hostname=hostname, closed=closed, enable_SMTPUTF8=True,
                                 decode_data=False, data_size_limit=None),
        sock)
    await asyncio.wait_for(closed, timeout)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("user")
    parser.add_argument("password")
    parser.add_argument("domains")
    parser.add_argument("--hostname", default="customer.test")
    parser.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()

    sock = socket.create_connection(("127.0.0.1", args.port), timeout=args.timeout)
    f = sock.makefile("rb")
    greeting = read_reply(f)
    emit({"step": "greeting", "line": greeting[-1]})
    command(sock, f, "ehlo", "EHLO " + args.hostname)
    auth = base64.b64encode(b"\0" + args.user.encode() + b"\0" + args.password.encode()).decode()
    command(sock, f, "auth", "AUTH PLAIN " + auth)
    reply = command(sock, f, "atrn", "ATRN " + args.domains)
    if not reply.startswith("250"):
        command(sock, f, "quit", "QUIT")
        sock.close()
        emit({"closed": True})
        return
    # The roles reverse: we are the server now. Nothing can be buffered in `f`: the other side
    # waits for our greeting before it says anything.
    sock.settimeout(None)
    sock.setblocking(False)
    asyncio.run(serve(sock, args.hostname, args.timeout))
    emit({"closed": True})


if __name__ == "__main__":
    try:
        main()
    except Exception as error:  # reported as a step, so the test shows it
        emit({"step": "error", "line": f"{type(error).__name__}: {error}"})
        sys.exit(1)
