#!/usr/bin/env bash
# A private PostgreSQL 15 for a test that stops and restarts it (the shared one of
# scripts/test-services.sh must stay up): trust authentication, 127.0.0.1 only.
#
#   private_postgres.sh start DIR PORT   # initdb on first use; returns when it accepts connections
#   private_postgres.sh crash DIR        # immediate shutdown: like a crash, connections cut
#   private_postgres.sh stop DIR         # fast shutdown, for cleanup
set -euo pipefail
pg_bin=/usr/lib/postgresql/15/bin
as_postgres() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

# The server must not inherit the caller's other descriptors: a parent that watches one of
# them (Foundation's Process does) would wait for PostgreSQL to exit.
for fd in /proc/$$/fd/*; do
    fd=${fd##*/}
    [ "$fd" -gt 2 ] && eval "exec $fd>&-" 2>/dev/null || true
done

command=${1:?usage: private_postgres.sh start|crash|stop DIR [PORT]}
dir=${2:?missing DIR}
case "$command" in
start)
    port=${3:?missing PORT}
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres:postgres "$dir"
    chmod 700 "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        as_postgres "$pg_bin/initdb" -D "$dir/data" -U postgres -A trust >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    as_postgres "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
        -o "-p $port -c listen_addresses=127.0.0.1 -k $dir -c synchronous_commit=on -c fsync=on" start >/dev/null \
        || { cat "$dir/postgres.log" >&2; exit 1; }
    ;;
crash)
    as_postgres "$pg_bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null
    ;;
stop)
    [ -f "$dir/data/PG_VERSION" ] || exit 0
    as_postgres "$pg_bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    ;;
*)
    echo "usage: private_postgres.sh start|crash|stop DIR [PORT]" >&2
    exit 2
    ;;
esac
