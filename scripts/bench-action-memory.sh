#!/usr/bin/env bash
# Peak RSS of a replay whose one action fails (docs/BENCHMARKS.md, "Memory of
# a failing action"): 100 failed state.apply returns of ~1.5 MB (many small
# keys, as a real highstate) replayed with a webhook action pointed at a
# local HTTP server that answers every POST with 501 (python3 -m http.server),
# so every send is retried, then given up or left queued at the end.
#
#   scripts/bench-action-memory.sh [EXTRA_ACTION_TOML]   (data in $BENCH_DIR or /tmp/saltpipe-bench)
#   BIN=/tmp/old scripts/bench-action-memory.sh          # another build's saltpipe
#   NO_ACTION=1 scripts/bench-action-memory.sh           # the same replay without the action
#   scripts/bench-action-memory.sh 'queue_bytes = "16MiB"'
#
# Prints /usr/bin/time's peak RSS and the replay's action summary.
set -euo pipefail
cd "$(dirname "$0")/.."
d=${BENCH_DIR:-/tmp/saltpipe-bench}/action-memory
rm -rf "$d"; mkdir -p "$d"
if [ -z "${BIN:-}" ]; then
    nice cargo build --bins
    BIN=target/debug
fi
gen=target/debug/saltpipe-gen
[ -x "$gen" ] || nice cargo build --bin saltpipe-gen
stream=${BENCH_DIR:-/tmp/saltpipe-bench}/failed-states-100x1.5MB.bin
[ -s "$stream" ] || "$gen" --count 100 --size 1500000 --failed-states --out "$stream"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 >"$d/http.log" 2>&1 &
http=$!
trap 'kill $http' EXIT
sleep 1
{
    echo "[queue]"
    echo "url = \"embedded://$d/queue\""
    echo "[sink]"
    echo "url = \"sqlite://$d/salt.db\""
    echo "[metrics]"
    echo "enabled = false"
    echo "[worker]"
    echo "drain_timeout = \"20s\""
    if [ -z "${NO_ACTION:-}" ]; then
        echo "[[actions]]"
        echo "name = \"page\""
        echo "when = { kind = \"job_return\", success = false }"
        echo "rate_limit = 0"
        echo "retry_min = \"2s\""
        echo "retry_max = \"10s\""
        echo "webhook = { url = \"http://127.0.0.1:$port/hook\" }"
        echo "${1:-}"
    fi
} >"$d/saltpipe.toml"
/usr/bin/time -f "peak RSS %M KB, %e s" "$BIN/saltpipe" replay -c "$d/saltpipe.toml" "$stream" >"$d/out.txt" 2>"$d/err.txt" || { tail -5 "$d/err.txt"; exit 1; }
tail -1 "$d/err.txt"
grep -E "wrote|action" "$d/out.txt"
