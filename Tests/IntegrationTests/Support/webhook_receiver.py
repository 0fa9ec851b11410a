#!/usr/bin/env python3
"""A webhook receiver on 127.0.0.1 that checks every signature (README "Webhooks").

usage: webhook_receiver.py --port P --secret S --log FILE [--status CODE]

Every POST is answered CODE (default 200) and appended to FILE as one JSON line:
{"id": X-MailTier-Event-Id, "type": X-MailTier-Event, "timestamp": X-MailTier-Timestamp,
 "signature_ok": bool, "status": CODE, "content_type": str, "path": str, "body": the body as text}
signature_ok is true when X-MailTier-Signature is
"sha256=" + hex(HMAC-SHA256(secret, timestamp + "." + body)), compared in constant time.
Prints "listening" once the socket is bound. Stops on SIGTERM.
"""
import argparse
import hashlib
import hmac
import json
import signal
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--status", type=int, default=200)
    args = p.parse_args()
    secret = args.secret.encode()
    log = open(args.log, "a", encoding="utf-8")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            timestamp = self.headers.get("X-MailTier-Timestamp", "")
            expected = "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
            signature = self.headers.get("X-MailTier-Signature", "")
            record = {
                "id": self.headers.get("X-MailTier-Event-Id"),
                "type": self.headers.get("X-MailTier-Event"),
                "timestamp": timestamp,
                "signature_ok": hmac.compare_digest(expected, signature),
                "status": args.status,
                "content_type": self.headers.get("Content-Type"),
                "path": self.path,
                "body": body.decode("utf-8"),
            }
            log.write(json.dumps(record) + "\n")
            log.flush()
            self.send_response(args.status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format, *args):
            pass

    server = HTTPServer(("127.0.0.1", args.port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("listening", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
