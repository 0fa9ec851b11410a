#!/usr/bin/env python3
"""Sends up to TOTAL messages over CONNS parallel connections; prints one line
"ACK <token>" (flushed) after each "250 2.0.0 Ok: queued as" reply. Every
message carries its unique token in the Subject and in the body. A connection
that fails (the server was killed) just stops; the script exits 0 when all
connections have stopped.

usage: crash_sender.py PORT TOTAL CONNS FROM TO
"""
import os
import smtplib
import sys
import threading

lock = threading.Lock()


def say(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def worker(port, index, count, sender, rcpt, run):
    sent = 0
    while sent < count:
        try:
            s = smtplib.SMTP("127.0.0.1", port, local_hostname="crash.test", timeout=20)
            s.ehlo()
            # Reconnect every 20 messages: several connections over the run.
            for _ in range(min(20, count - sent)):
                token = "tok%sc%02dn%04d" % (run, index, sent)
                sent += 1
                body = ("From: <%s>\r\nTo: <%s>\r\nSubject: durability %s\r\n\r\n"
                        "token %s\r\n" % (sender, rcpt, token, token)).encode("ascii")
                code, _ = s.mail(sender)
                if code != 250:
                    raise RuntimeError("MAIL %d" % code)
                code, _ = s.rcpt(rcpt)
                if code != 250:
                    raise RuntimeError("RCPT %d" % code)
                code, text = s.data(body)
                if code == 250 and b"queued as" in text:
                    say("ACK " + token)
                else:
                    say("NACK %s %d" % (token, code))
            s.quit()
        except Exception as e:
            say("STOP %d %s" % (index, type(e).__name__))
            return


def main():
    port, total, conns = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    sender, rcpt = sys.argv[4], sys.argv[5]
    run = os.urandom(3).hex()
    per = total // conns
    threads = [threading.Thread(target=worker, args=(port, i, per, sender, rcpt, run)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    say("DONE")


if __name__ == "__main__":
    main()
