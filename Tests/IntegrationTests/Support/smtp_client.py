#!/usr/bin/env python3
"""Sends one message with Python's smtplib and prints every reply.

usage: smtp_client.py --port P --from ADDR --to ADDR [--to ADDR ...] --body-file F
                      [--ehlo NAME] [--starttls CAFILE] [--auth PLAIN|LOGIN
                      --user U --password PW] [--smtputf8]

The body file holds the message exactly as it should be stored (CRLF line
endings, ending in CRLF); smtplib dot-stuffs it on the wire.

Output: one JSON object per line, {"step": NAME, "code": int, "text": str},
NAME in ehlo, starttls, ehlo_tls, auth, mail, rcpt, data, quit; "text" is the
reply without its code (lines joined with "\n"), as smtplib reports it. After a
refused auth/mail step the script stops; {"step": "error", ...} on exceptions.
"""
import argparse
import json
import smtplib
import ssl
import sys


def out(step, code, text):
    if isinstance(text, bytes):
        text = text.decode("utf-8", "backslashreplace")
    sys.stdout.write(json.dumps({"step": step, "code": code, "text": text}, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ehlo", default="client.test")
    p.add_argument("--starttls")
    p.add_argument("--auth", choices=["PLAIN", "LOGIN"])
    p.add_argument("--user")
    p.add_argument("--password")
    p.add_argument("--smtputf8", action="store_true")
    p.add_argument("--from", dest="sender", required=True)
    p.add_argument("--to", action="append", required=True)
    p.add_argument("--body-file", required=True)
    a = p.parse_args()
    with open(a.body_file, "rb") as f:
        body = f.read()

    s = smtplib.SMTP(local_hostname=a.ehlo, timeout=20)
    # Connect by address but verify the certificate for "localhost".
    s._host = "localhost"
    try:
        s.connect("127.0.0.1", a.port)
        code, text = s.ehlo()
        out("ehlo", code, text)
        if a.starttls:
            ctx = ssl.create_default_context(cafile=a.starttls)
            code, text = s.starttls(context=ctx)
            out("starttls", code, text)
            code, text = s.ehlo()
            out("ehlo_tls", code, text)
        if a.auth:
            s.user, s.password = a.user, a.password
            try:
                if a.auth == "PLAIN":
                    code, text = s.auth("PLAIN", s.auth_plain, initial_response_ok=True)
                else:
                    code, text = s.auth("LOGIN", s.auth_login, initial_response_ok=False)
                out("auth", code, text)
            except smtplib.SMTPAuthenticationError as e:
                out("auth", e.smtp_code, e.smtp_error)
                return
        options = ["SMTPUTF8"] if a.smtputf8 else []
        code, text = s.mail(a.sender, options)
        out("mail", code, text)
        if code != 250:
            return
        accepted = 0
        for rcpt in a.to:
            code, text = s.rcpt(rcpt)
            out("rcpt", code, text)
            accepted += code in (250, 251)
        if not accepted:
            return
        try:
            code, text = s.data(body)
        except smtplib.SMTPDataError as e:
            code, text = e.smtp_code, e.smtp_error
        out("data", code, text)
        code, text = s.docmd("QUIT")
        out("quit", code, text)
    except Exception as e:  # report, never hang
        out("error", 0, "%s: %s" % (type(e).__name__, e))
        sys.exit(1)
    finally:
        s.close()


if __name__ == "__main__":
    main()
