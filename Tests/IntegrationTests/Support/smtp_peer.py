#!/usr/bin/env python3
"""A scriptable remote mail server (aiosmtpd) standing in for an internet MX.

usage: smtp_peer.py --port P --dir D [--no-smtputf8] [--delay SECONDS] [--tls-cert C --tls-key K]

Every message it accepts is stored as D/msg-<n>.eml (the content exactly as
received, after dot-unstuffing) with D/msg-<n>.json beside it:
{"mail_from", "rcpt_tos", "mail_options", "rcpt_options", "peer_port", "helo", "tls"}.
The .json is written last (atomically), so a test can poll for it. Each connection
adds its client port as a line to D/connections.log.

What it answers depends on the recipient's local part:
  reject...    550 5.1.1 <addr>: Recipient address rejected: no such user here
  tempfail...  451 4.2.0 <addr>: try again later   (the first time), then 250
  tempfailN... the same N times (tempfail2-x@…: twice), then 250
  anything     250

--no-smtputf8 leaves SMTPUTF8 out of its EHLO reply; --delay sleeps before each
reply to MAIL, RCPT and the end of the data (a slow server); --tls-cert/--tls-key
offer STARTTLS. Prints "READY <port>" once it accepts connections.
"""
import argparse
import asyncio
import itertools
import json
import os
import ssl
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


class RecordingSMTP(SMTP):
    """Appends one line per accepted connection to D/connections.log."""

    log_path = None

    def connection_made(self, transport):
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(f"{peer[1] if peer else '?'}\n")


class PeerController(Controller):
    def factory(self):
        return RecordingSMTP(self.handler, **self.SMTP_kwargs)


class Peer:
    def __init__(self, directory, delay):
        self.directory = directory
        self.delay = delay
        self.lock = threading.Lock()
        self.count = 0
        self.tempfailed = {}

    async def pause(self):
        if self.delay:
            await asyncio.sleep(self.delay)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        await self.pause()
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        await self.pause()
        local = address.split("@")[0].lower()
        if local.startswith("reject"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: no such user here"
        if local.startswith("tempfail"):
            digits = "".join(itertools.takewhile(str.isdigit, local[len("tempfail"):]))
            with self.lock:
                failures = self.tempfailed.get(address, 0)
                self.tempfailed[address] = failures + 1
            if failures < int(digits or "1"):
                return f"451 4.2.0 <{address}>: try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        await self.pause()
        with self.lock:
            self.count += 1
            n = self.count
        base = os.path.join(self.directory, f"msg-{n}")
        with open(base + ".eml", "wb") as f:
            f.write(envelope.original_content)
        info = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "mail_options": envelope.mail_options,
            "rcpt_options": envelope.rcpt_options,
            "peer_port": session.peer[1] if session.peer else None,
            "helo": session.host_name,
            "tls": session.ssl is not None,
        }
        with open(base + ".json.tmp", "w", encoding="utf-8") as f:
            json.dump(info, f, ensure_ascii=False)
        os.rename(base + ".json.tmp", base + ".json")
        return f"250 2.0.0 Ok: queued as peer-{n}"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--no-smtputf8", action="store_true")
    p.add_argument("--delay", type=float, default=0)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    a = p.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    kwargs = {}
    if a.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(a.tls_cert, a.tls_key)
        kwargs["tls_context"] = context
    RecordingSMTP.log_path = os.path.join(a.dir, "connections.log")
    open(RecordingSMTP.log_path, "a").close()
    controller = PeerController(
        Peer(a.dir, a.delay), hostname="127.0.0.1", port=a.port, server_hostname="peer.test",
        enable_SMTPUTF8=not a.no_smtputf8, decode_data=False, **kwargs)
    controller.start()
    # start() opened one connection of its own to check the server: not one of ours.
    open(RecordingSMTP.log_path, "w").close()
    sys.stdout.write(f"READY {a.port}\n")
    sys.stdout.flush()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
