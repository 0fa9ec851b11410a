#!/usr/bin/env python3
"""Checks a stored bounce with Python's email package (an independent MIME parser).

usage: dsn_check.py MESSAGE_FILE EXPECTED_JSON

MESSAGE_FILE is the message as a mailbox stored it (maildir file: Return-Path first).
EXPECTED_JSON is an object:
  {"reporting_mta": "mail.example.test",      Reporting-MTA: dns; <host>, From: MAILER-DAEMON@<host>
   "to": "alice@example.test",                the To: header (the original's sender)
   "recipients": [                            one per-recipient block each, in order
     {"final": "carol@example.test", "action": "failed", "status": "5.2.2",
      "diagnostic": "mailbox full", "remote_mta": null}],   diagnostic: a substring; remote_mta optional
   "original_subject": "Quarterly numbers",   must appear in the text/rfc822-headers part
   "return_path": false}                      optional: the file is not from a mailbox (no Return-Path: <>)

Prints "ok" and exits 0, or prints what differs and exits 1.
"""
import email
import email.policy
import json
import sys


def main():
    data = open(sys.argv[1], "rb").read()
    expected = json.loads(sys.argv[2])
    problems = []

    def check(condition, message):
        if not condition:
            problems.append(message)

    host = expected["reporting_mta"]
    first_line = data.split(b"\r\n", 1)[0]
    if expected.get("return_path", True):
        check(first_line == b"Return-Path: <>", "first line %r, expected Return-Path: <>" % first_line)
    else:
        check(first_line.startswith(b"From: "), "first line %r, expected the DSN's From:" % first_line)
    msg = email.message_from_bytes(data)
    check(msg.get_content_type() == "multipart/report", "content type %s" % msg.get_content_type())
    check(msg.get_param("report-type") == "delivery-status", "report-type %s" % msg.get_param("report-type"))
    check(msg["From"] == "Mail Delivery System <MAILER-DAEMON@%s>" % host, "From: %s" % msg["From"])
    check(msg["To"] == "<%s>" % expected["to"], "To: %s" % msg["To"])
    check(msg["Auto-Submitted"] == "auto-replied", "Auto-Submitted: %s" % msg["Auto-Submitted"])
    parts = msg.get_payload() if msg.is_multipart() else []
    types = [p.get_content_type() for p in parts]
    check(types == ["text/plain", "message/delivery-status", "text/rfc822-headers"], "parts %s" % types)
    if len(parts) == 3:
        blocks = parts[1].get_payload()
        check(blocks[0]["Reporting-MTA"] == "dns; %s" % host, "Reporting-MTA: %s" % blocks[0]["Reporting-MTA"])
        check(blocks[0]["Arrival-Date"] is not None, "no Arrival-Date")
        wanted = expected["recipients"]
        check(len(blocks) == 1 + len(wanted), "%d recipient blocks, expected %d" % (len(blocks) - 1, len(wanted)))
        for block, want in zip(blocks[1:], wanted):
            check(block["Final-Recipient"] == "rfc822; %s" % want["final"], "Final-Recipient: %s" % block["Final-Recipient"])
            check(block["Action"] == want["action"], "Action: %s" % block["Action"])
            check(block["Status"] == want["status"], "Status: %s" % block["Status"])
            diagnostic = " ".join((block["Diagnostic-Code"] or "").split())
            check(want["diagnostic"] in diagnostic, "Diagnostic-Code: %s" % diagnostic)
            if "remote_mta" in want:
                remote = want["remote_mta"]
                check(block["Remote-MTA"] == (None if remote is None else "dns; %s" % remote),
                      "Remote-MTA: %s" % block["Remote-MTA"])
        headers = parts[2].get_payload()
        check("Subject: %s" % expected["original_subject"] in headers, "original headers: %r" % headers[:400])
        text = parts[0].get_payload(decode=True).decode("utf-8")
        check("could not be delivered" in text, "explanation: %r" % text[:400])
    for part in msg.walk():
        check(not part.defects, "defects in %s: %s" % (part.get_content_type(), part.defects))
    for part in email.message_from_bytes(data, policy=email.policy.default).walk():
        check(not part.defects, "defects (policy.default) in %s: %s" % (part.get_content_type(), part.defects))
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print("ok")


if __name__ == "__main__":
    main()
