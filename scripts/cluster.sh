#!/usr/bin/env bash
# A MailTier cluster on one machine, everything on 127.0.0.1:
#
#   PostgreSQL, Redis and SeaweedFS (S3)      shared state, under .cluster/services
#   haproxy (TCP, send-proxy-v2)              the load balancer, on $CLUSTER_SMTP_PORT (2525)
#   ingress-1, ingress-2                      SMTP_ROLE=ingress behind haproxy
#   delivery                                  SMTP_ROLE=delivery
#   admin                                     SMTP_ROLE=admin (for now only GET /health)
#
# Every node answers GET /health on its own health port (8101-8104).
#
#   scripts/cluster.sh start    # builds if needed, starts everything, prints where things are
#   scripts/cluster.sh stop
#   scripts/cluster.sh status
#   scripts/cluster.sh env      # the variables every node runs with (to run user-cli against the cluster)
#
# Any SMTP_* variable set when calling `start` applies to every node (e.g. SMTP_RATE_*).
# Logs: .cluster/logs/<node>.log. The admin node gets the REST API with issue 6.
set -euo pipefail

top="$(cd "$(dirname "$0")/.." && pwd)"
dir="${CLUSTER_DIR:-$top/.cluster}"
smtp_port="${CLUSTER_SMTP_PORT:-2525}"
pg_port="${CLUSTER_PG_PORT:-55442}"
redis_port="${CLUSTER_REDIS_PORT:-56389}"
s3_port="${CLUSTER_S3_PORT:-58343}"
s3_base="${CLUSTER_S3_BASE_PORT:-58440}"
bucket="${CLUSTER_BUCKET:-mailtier}"
build="${CLUSTER_BUILD:-debug}"
binary="$top/.build/$build/smtp-server"
# name:role:smtp port:health port:metrics port
nodes=(
    "ingress-1:ingress:2601:8101:8201"
    "ingress-2:ingress:2602:8102:8202"
    "delivery:delivery:2603:8103:8203"
    "admin:admin:2604:8104:8204"
)

services() {
    MAILTIER_SERVICES_DIR="$dir/services" MAILTIER_TEST_PG_PORT="$pg_port" MAILTIER_TEST_REDIS_PORT="$redis_port" \
        MAILTIER_TEST_S3_PORT="$s3_port" MAILTIER_TEST_S3_BASE_PORT="$s3_base" "$top/scripts/test-services.sh" "$1"
}

# The environment every node shares (sourced from .cluster/env).
write_env() {
    # shellcheck disable=SC1091
    . "$dir/services/env"
    local password
    [ -f "$dir/admin-password" ] || (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$dir/admin-password")
    password="$(cat "$dir/admin-password")Aa1-"
    umask 077
    cat >"$dir/env" <<ENV
export SMTP_DATABASE_URL=$MAILTIER_TEST_POSTGRES_URL
export SMTP_REDIS_URL=${MAILTIER_TEST_REDIS_URL:-redis://127.0.0.1:$redis_port}
export SMTP_S3_ENDPOINT=$MAILTIER_TEST_S3_ENDPOINT
export SMTP_S3_REGION=$MAILTIER_TEST_S3_REGION
export SMTP_S3_ACCESS_KEY=$MAILTIER_TEST_S3_ACCESS_KEY
export SMTP_S3_SECRET_KEY=$MAILTIER_TEST_S3_SECRET_KEY
export SMTP_S3_BUCKET=$bucket
export SMTP_STORAGE_TYPE=\${SMTP_STORAGE_TYPE:-s3}
export SMTP_HOSTNAME=\${SMTP_HOSTNAME:-mail.example.com}
export SMTP_LOCAL_DOMAINS=\${SMTP_LOCAL_DOMAINS:-example.com}
export SMTP_ADMIN_PASSWORD=\${SMTP_ADMIN_PASSWORD:-$password}
export SMTP_HOST=127.0.0.1
ENV
}

create_bucket() {
    # shellcheck disable=SC1091
    . "$dir/services/env"
    local code
    code=$(curl -s -o "$dir/bucket.out" -w '%{http_code}' -X PUT \
        --aws-sigv4 "aws:amz:$MAILTIER_TEST_S3_REGION:s3" --user "$MAILTIER_TEST_S3_ACCESS_KEY:$MAILTIER_TEST_S3_SECRET_KEY" \
        "$MAILTIER_TEST_S3_ENDPOINT/$bucket")
    case "$code" in
    200 | 409) ;;  # created, or already there
    *) echo "cluster: cannot create bucket $bucket (HTTP $code): $(cat "$dir/bucket.out")" >&2; exit 1 ;;
    esac
}

start_node() {
    local name=$1 role=$2 port=$3 health=$4 metrics=$5
    local pidfile="$dir/run/$name.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then return 0; fi
    (
        # shellcheck disable=SC1091
        . "$dir/env"
        export SMTP_ROLE="$role" SMTP_PORT="$port" SMTP_HEALTH_PORT="$health" SMTP_METRICS_PORT="$metrics"
        export SMTP_TRUSTED_PROXIES="${SMTP_TRUSTED_PROXIES:-127.0.0.1/32}"
        export SMTP_SPOOL_PATH="$dir/data/$name/spool" SMTP_STORAGE_PATH="$dir/data/$name/mail" SMTP_DB_PATH="$dir/data/$name/unused.db"
        mkdir -p "$dir/data/$name"
        cd "$dir/data/$name"
        nohup "$binary" >>"$dir/logs/$name.log" 2>&1 &
        echo $! >"$pidfile"
    )
    # Ready when it says so in its log (a direct SMTP probe from 127.0.0.1 would need a PROXY
    # header); the admin node when its /health answers (200 or 503).
    for _ in $(seq 1 100); do
        if [ "$role" = ingress ] && grep -q "SMTP listening" "$dir/logs/$name.log"; then return 0; fi
        if [ "$role" = delivery ] && grep -q "delivery started" "$dir/logs/$name.log"; then return 0; fi
        if [ "$role" = admin ] && curl -s -o /dev/null --max-time 5 "http://127.0.0.1:$health/health"; then return 0; fi
        kill -0 "$(cat "$pidfile")" 2>/dev/null || { echo "cluster: $name exited:" >&2; tail -20 "$dir/logs/$name.log" >&2; exit 1; }
        sleep 0.2
    done
    [ "$role" = ingress ] && { echo "cluster: $name did not start listening" >&2; tail -20 "$dir/logs/$name.log" >&2; exit 1; }
    [ "$role" = admin ] && { echo "cluster: $name does not answer GET /health" >&2; tail -20 "$dir/logs/$name.log" >&2; exit 1; }
    return 0
}

start_haproxy() {
    local pidfile="$dir/run/haproxy.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then return 0; fi
    {
        echo "global"
        echo "    maxconn 4096"
        echo "defaults"
        echo "    mode tcp"
        echo "    timeout connect 5s"
        echo "    timeout client 10m"
        echo "    timeout server 10m"
        echo "frontend smtp"
        echo "    bind 127.0.0.1:$smtp_port"
        echo "    default_backend ingress"
        echo "backend ingress"
        echo "    balance roundrobin"
        for node in "${nodes[@]}"; do
            IFS=: read -r name role port _ _ <<<"$node"
            [ "$role" = ingress ] && echo "    server $name 127.0.0.1:$port send-proxy-v2 check inter 2s"
        done
    } >"$dir/haproxy.cfg"
    haproxy -c -q -f "$dir/haproxy.cfg"
    nohup haproxy -db -f "$dir/haproxy.cfg" >>"$dir/logs/haproxy.log" 2>&1 &
    echo $! >"$pidfile"
    for _ in $(seq 1 50); do
        if { exec 3<>"/dev/tcp/127.0.0.1/$smtp_port"; } 2>/dev/null; then
            local banner=""
            read -r -t 5 banner <&3 || true
            printf 'QUIT\r\n' >&3 || true
            exec 3<&- 3>&-
            case "$banner" in 220*) return 0 ;; esac
        fi
        sleep 0.2
    done
    echo "cluster: haproxy on port $smtp_port does not greet" >&2
    tail -20 "$dir/logs/haproxy.log" >&2
    exit 1
}

stop_pid() {
    local pidfile=$1
    [ -f "$pidfile" ] || return 0
    local pid
    pid="$(cat "$pidfile")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

case "${1:-}" in
start)
    command -v haproxy >/dev/null || { echo "cluster: haproxy is missing (scripts/install-deps.sh)" >&2; exit 1; }
    if [ ! -x "$binary" ]; then (cd "$top" && swift build -c "$build" --product smtp-server); fi
    mkdir -p "$dir/run" "$dir/logs" "$dir/data"
    services start
    write_env
    create_bucket
    # Migrate once, then start the nodes (each would also migrate, under an advisory lock).
    (. "$dir/env"; "$binary" migrate)
    for node in "${nodes[@]}"; do
        IFS=: read -r name role port health metrics <<<"$node"
        start_node "$name" "$role" "$port" "$health" "$metrics"
    done
    start_haproxy
    # shellcheck disable=SC1091
    . "$dir/env"
    echo "MailTier cluster up:"
    echo "  SMTP (haproxy, PROXY v2 to the ingress nodes)  127.0.0.1:$smtp_port"
    for node in "${nodes[@]}"; do
        IFS=: read -r name role port health _ <<<"$node"
        if [ "$role" = ingress ]; then
            echo "  $name ($role)  smtp 127.0.0.1:$port  health http://127.0.0.1:$health/health  log .cluster/logs/$name.log"
        else
            echo "  $name ($role)  health http://127.0.0.1:$health/health  log .cluster/logs/$name.log"
        fi
    done
    echo "  PostgreSQL  $SMTP_DATABASE_URL"
    echo "  Redis       $SMTP_REDIS_URL"
    echo "  S3          $SMTP_S3_ENDPOINT bucket $SMTP_S3_BUCKET"
    echo "  admin user  admin / $SMTP_ADMIN_PASSWORD"
    echo "  environment: source .cluster/env (e.g. for user-cli)"
    ;;
stop)
    stop_pid "$dir/run/haproxy.pid"
    for node in "${nodes[@]}"; do
        IFS=: read -r name _ _ _ _ <<<"$node"
        stop_pid "$dir/run/$name.pid"
    done
    [ -d "$dir/services" ] && services stop
    echo "MailTier cluster stopped (state kept in .cluster; rm -rf .cluster to start afresh)"
    ;;
status)
    for name in haproxy $(for node in "${nodes[@]}"; do echo "${node%%:*}"; done); do
        pidfile="$dir/run/$name.pid"
        if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
            echo "$name: running (pid $(cat "$pidfile"))"
        else
            echo "$name: stopped"
        fi
    done
    ;;
env)
    cat "$dir/env"
    ;;
*)
    echo "usage: $0 start|stop|status|env" >&2
    exit 2
    ;;
esac
