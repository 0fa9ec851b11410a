#!/usr/bin/env bash
# Runs the benchmarks (bench/run.py; issue 7): ours in embedded mode, a private Postfix and
# smtp-sink, with the same loads, one after the other on 127.0.0.1.
#
#   scripts/bench.sh             installs what is missing (Postfix tools, matplotlib), builds
#                                release, runs every timed scenario; results in bench/results/
#   scripts/bench.sh --smoke     tiny counts, seconds, no thresholds, no install, no build
#                                (BENCH_SMOKE=1 does the same); the server from BENCH_BIN
#                                (default .build/debug)
#
# Other arguments go to bench/run.py (--help lists them: --only, --messages, --sessions, …).
# BENCH_BIN: the directory that holds smtp-server (default .build/release, smoke .build/debug).
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=${BENCH_SMOKE:-0}
for arg in "$@"; do [ "$arg" = "--smoke" ] && smoke=1; done

if [ "$smoke" = 1 ]; then
    bin=${BENCH_BIN:-.build/debug}
    [ -x "$bin/smtp-server" ] || { echo "bench: $bin/smtp-server not built (swift build)" >&2; exit 2; }
    args=("$@")
    [[ " $* " == *" --smoke "* ]] || args=(--smoke "${args[@]}")
    exec python3 bench/run.py --bin "$bin" "${args[@]}"
fi

scripts/install-deps.sh
# The chart; checked before installing so an offline machine that has it needs nothing.
if ! python3 -c 'import matplotlib' 2>/dev/null; then
    echo "bench: pip install matplotlib"
    python3 -m pip install -q --root-user-action=ignore matplotlib
fi
if [ -z "${BENCH_BIN:-}" ]; then
    swift build -c release --product smtp-server
    swift build -c release --product mailtier-load
fi
bin=${BENCH_BIN:-.build/release}
exec python3 bench/run.py --bin "$bin" "$@"
