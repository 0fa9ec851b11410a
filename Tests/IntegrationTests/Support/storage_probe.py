#!/usr/bin/env python3
"""Looks at what the server stored, for StorageBackendTests.swift (black box).

usage:
  storage_probe.py sqlite DB SQL [PARAM ...]     rows as a JSON list of objects
  storage_probe.py s3 create BUCKET               creates the bucket
  storage_probe.py s3 get BUCKET KEY              {"found": bool, "b64": str|null}
  storage_probe.py s3 list BUCKET PREFIX          JSON list of keys
  storage_probe.py s3 sha256 BUCKET PREFIX        {key: hex SHA-256 of the object} for every key
  storage_probe.py s3 destroy BUCKET              deletes every object, then the bucket
  storage_probe.py decrypt KEY_B64 FILE           {"b64": plaintext} (AES-256-GCM, MTENC v1)
  storage_probe.py rcpt PORT ADDR                 EHLO, MAIL, RCPT ADDR, RSET, QUIT;
                                                  {"code": int, "text": str} of the RCPT reply

Standard library, plus boto3 (s3) and cryptography (decrypt). SQLite BLOBs come out as
{"b64": "..."}. S3 settings come from MAILTIER_TEST_S3_{ENDPOINT,REGION,ACCESS_KEY,SECRET_KEY}.
Errors: one line on stderr, exit 1 (exit 3 when a required Python module is missing).
"""
import base64
import json
import os
import smtplib
import sqlite3
import sys


def emit(value):
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def die(message, code=1):
    sys.stderr.write("storage_probe: %s\n" % message)
    sys.exit(code)


def cmd_sqlite(args):
    if len(args) < 2:
        die("sqlite: expected DB SQL [PARAM ...]")
    db, sql, params = args[0], args[1], args[2:]
    # mode=rw: never create the file; the server owns it (WAL: readers do not block it).
    con = sqlite3.connect("file:%s?mode=rw" % db, uri=True, timeout=10)
    try:
        con.row_factory = sqlite3.Row
        rows = []
        for row in con.execute(sql, params):
            item = {}
            for key in row.keys():
                value = row[key]
                if isinstance(value, (bytes, bytearray, memoryview)):
                    value = {"b64": base64.b64encode(bytes(value)).decode("ascii")}
                item[key] = value
            rows.append(item)
        emit(rows)
    finally:
        con.close()


def s3_client():
    try:
        import boto3
        from botocore.config import Config
    except ImportError as e:
        die("boto3 is not importable (%s): pip install boto3" % e, 3)
    env = os.environ
    missing = [n for n in ("MAILTIER_TEST_S3_ENDPOINT", "MAILTIER_TEST_S3_ACCESS_KEY", "MAILTIER_TEST_S3_SECRET_KEY")
               if not env.get(n)]
    if missing:
        die("not set: " + ", ".join(missing))
    return boto3.client(
        "s3",
        endpoint_url=env["MAILTIER_TEST_S3_ENDPOINT"],
        region_name=env.get("MAILTIER_TEST_S3_REGION") or "us-east-1",
        aws_access_key_id=env["MAILTIER_TEST_S3_ACCESS_KEY"],
        aws_secret_access_key=env["MAILTIER_TEST_S3_SECRET_KEY"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )


def list_keys(s3, bucket, prefix):
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys.extend(o["Key"] for o in page.get("Contents", []))
    return keys


def cmd_s3(args):
    if not args:
        die("s3: expected create|get|list|destroy")
    op, rest = args[0], args[1:]
    s3 = s3_client()
    from botocore.exceptions import ClientError
    if op == "create" and len(rest) == 1:
        s3.create_bucket(Bucket=rest[0])
        emit({"created": rest[0]})
    elif op == "get" and len(rest) == 2:
        try:
            body = s3.get_object(Bucket=rest[0], Key=rest[1])["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                emit({"found": False, "b64": None})
                return
            raise
        emit({"found": True, "b64": base64.b64encode(body).decode("ascii")})
    elif op == "list" and len(rest) == 2:
        emit(list_keys(s3, rest[0], rest[1]))
    elif op == "sha256" and len(rest) == 2:
        import hashlib
        digests = {}
        for key in list_keys(s3, rest[0], rest[1]):
            digests[key] = hashlib.sha256(s3.get_object(Bucket=rest[0], Key=key)["Body"].read()).hexdigest()
        emit(digests)
    elif op == "destroy" and len(rest) == 1:
        bucket = rest[0]
        try:
            keys = list_keys(s3, bucket, "")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "NoSuchBucket":
                emit({"deleted": 0})
                return
            raise
        for key in keys:
            s3.delete_object(Bucket=bucket, Key=key)
        s3.delete_bucket(Bucket=bucket)
        emit({"deleted": len(keys)})
    else:
        die("s3: bad arguments %r" % (args,))


def cmd_decrypt(args):
    if len(args) != 2:
        die("decrypt: expected KEY_B64 FILE")
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError as e:
        die("the Python module 'cryptography' is not importable (%s): pip install cryptography" % e, 3)
    key = base64.b64decode(args[0], validate=True)
    with open(args[1], "rb") as f:
        data = f.read()
    if len(data) < 18 + 16 or data[:6] != b"MTENC\x01":
        die("not a sealed MTENC v1 file (%d bytes, starts %r)" % (len(data), data[:6]))
    header, nonce = data[:18], data[6:18]
    try:
        plain = AESGCM(key).decrypt(nonce, data[18:], header)
    except Exception as e:  # InvalidTag
        die("decryption failed: %s: %s" % (type(e).__name__, e))
    emit({"b64": base64.b64encode(plain).decode("ascii")})


def cmd_rcpt(args):
    if len(args) != 2:
        die("rcpt: expected PORT ADDR")
    s = smtplib.SMTP(local_hostname="probe.test", timeout=20)
    try:
        s.connect("127.0.0.1", int(args[0]))
        s.ehlo()
        code, text = s.mail("bob@example.org")
        if code != 250:
            emit({"code": code, "text": "MAIL refused: " + text.decode("utf-8", "replace")})
            return
        code, text = s.rcpt(args[1])
        emit({"code": code, "text": text.decode("utf-8", "replace")})
        s.rset()
        s.docmd("QUIT")
    finally:
        s.close()


def main():
    if len(sys.argv) < 2:
        die("expected a command: sqlite, s3, decrypt, rcpt")
    command, args = sys.argv[1], sys.argv[2:]
    handlers = {"sqlite": cmd_sqlite, "s3": cmd_s3, "decrypt": cmd_decrypt, "rcpt": cmd_rcpt}
    if command not in handlers:
        die("unknown command %r" % command)
    try:
        handlers[command](args)
    except SystemExit:
        raise
    except Exception as e:
        die("%s: %s" % (type(e).__name__, e))


if __name__ == "__main__":
    main()
