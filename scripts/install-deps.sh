#!/usr/bin/env bash
# Installs what building and testing MailTier needs, when it is missing (Debian, as root).
set -euo pipefail

apt_packages=(libargon2-dev libsqlite3-dev swaks openssl)
missing=()
for package in "${apt_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${missing[*]}"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v python3 >/dev/null || { echo "install-deps: python3 is required" >&2; exit 1; }
