#!/usr/bin/env python3
"""A minimal SMTP server whose every reply is given on the command line: for the
odd peers aiosmtpd cannot play (EHLO refused, plaintext injected behind STARTTLS,
a tiny SIZE limit).

usage: scripted_smtp.py --port P --log FILE --replies JSON

JSON maps a verb (upper case: EHLO, HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT,
STARTTLS, BDAT) or "greeting" or "." (the end of the data) to the exact octets
to send (CRLFs included). Defaults: a plain 220/250/354 server. Every line
received is appended to FILE ("C: <line>"); the data section as received, after
"DATA-BEGIN", ends with "DATA-END". Prints "READY <port>" once listening.
"""
import argparse
import json
import socketserver
import sys
import threading

DEFAULTS = {
    "greeting": "220 scripted.test ESMTP\r\n",
    "EHLO": "250-scripted.test\r\n250 8BITMIME\r\n",
    "HELO": "250 scripted.test\r\n",
    "MAIL": "250 2.1.0 Ok\r\n",
    "RCPT": "250 2.1.5 Ok\r\n",
    "DATA": "354 go ahead\r\n",
    ".": "250 2.0.0 Ok: queued\r\n",
    "RSET": "250 2.0.0 Ok\r\n",
    "NOOP": "250 2.0.0 Ok\r\n",
    "QUIT": "221 2.0.0 Bye\r\n",
    "STARTTLS": "454 4.7.0 TLS not available\r\n",
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", required=True)
    p.add_argument("--replies", default="{}")
    a = p.parse_args()
    replies = dict(DEFAULTS)
    replies.update(json.loads(a.replies))
    lock = threading.Lock()

    def log(text):
        with lock, open(a.log, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text + "\n")

    class Handler(socketserver.StreamRequestHandler):
        def send(self, key):
            self.wfile.write(replies[key].encode())
            self.wfile.flush()

        def handle(self):
            self.send("greeting")
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                text = line.decode("utf-8", "backslashreplace").rstrip("\r\n")
                log("C: " + text)
                verb = text.split(" ")[0].split(":")[0].upper()
                self.send(verb if verb in replies else "NOOP")
                if verb == "DATA" and replies["DATA"].startswith("354"):
                    log("DATA-BEGIN")
                    while True:
                        data = self.rfile.readline()
                        if not data or data == b".\r\n":
                            break
                        log(data.decode("utf-8", "backslashreplace").rstrip("\r\n"))
                    log("DATA-END")
                    self.send(".")
                if verb == "QUIT":
                    return

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    server = Server(("127.0.0.1", a.port), Handler)
    sys.stdout.write(f"READY {a.port}\n")
    sys.stdout.flush()
    server.serve_forever()


if __name__ == "__main__":
    main()
