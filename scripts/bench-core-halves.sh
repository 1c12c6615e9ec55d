#!/usr/bin/env bash
# The two halves of the core pipeline apart (docs/BENCHMARKS.md): how fast the
# listener half fills the embedded queue, and how fast a worker drains a full
# queue into SQLite (an operator's catch-up rate after an outage).
#
#   scripts/bench-core-halves.sh [COUNT]   (default 1000000; data in $BENCH_DIR or /tmp/saltpipe-bench)
#   BIN=/tmp/old scripts/bench-core-halves.sh   # another build's binaries
#
# 1. fill: `saltpipe replay` with the sink pointed at a closed port, so the
#    worker waits for its database (as it does when one is down) and the
#    listener half runs alone: time from the first queued event to COUNT.
# 2. drain: `saltpipe work` on a copy of that queue into a fresh SQLite file:
#    time until COUNT rows are in salt_returns.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-1000000}
d=${BENCH_DIR:-/tmp/saltpipe-bench}
mkdir -p "$d"
# BIN=DIR: another build's saltpipe (an A/B); default: build this tree.
if [ -z "${BIN:-}" ]; then
    cargo build --release --bins -q
    BIN=target/release
fi
bin=$BIN/saltpipe
stream="$d/returns-$count.bin"
[ -f "$stream" ] || "$BIN/saltpipe-gen" --count "$count" --size 1024 --out "$stream"
export SALTPIPE_METRICS_ENABLED=false
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"

rm -rf "$d/qfill"
SALTPIPE_QUEUE_URL="embedded://$d/qfill" SALTPIPE_SINK_URL="mysql://root@127.0.0.1:1/none" \
    "$bin" replay "$stream" >/dev/null 2>"$d/fill.log" &
pid=$!
python3 - "$d/qfill/queue.db" "$count" <<'PY'
import sqlite3, sys, time
db, want = sys.argv[1], int(sys.argv[2])
t0 = n0 = None
while True:
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            n = c.execute("SELECT coalesce(sum(events), 0) FROM containers").fetchone()[0]
        except sqlite3.OperationalError:  # a build before containers (BIN=...)
            n = c.execute("SELECT count(*) FROM messages").fetchone()[0]
        c.close()
    except sqlite3.Error:
        n = 0
    if n and t0 is None:
        t0, n0 = time.time(), n
    if n >= want:
        break
    time.sleep(0.05)
s = time.time() - t0
print(f"listener half: {n - n0} events queued in {s:.2f} s = {(n - n0) / s:,.0f} events/s")
PY
awk '{printf "listener half CPU: %.1f s user, %.1f s system\n", $14/100, $15/100}' "/proc/$pid/stat"
kill -9 "$pid"; wait "$pid" 2>/dev/null || true

rm -rf "$d/qdrain" "$d/drain.db"*
cp -r "$d/qfill" "$d/qdrain"
SALTPIPE_QUEUE_URL="embedded://$d/qdrain" SALTPIPE_SINK_URL="sqlite://$d/drain.db" \
    /usr/bin/time -f "worker half: peak RSS %M KB, CPU %U s user, %S s system" "$bin" work >/dev/null 2>"$d/drain.log" &
pid=$!
python3 - "$d/drain.db" "$count" <<'PY'
import sqlite3, sys, time
db, want = sys.argv[1], int(sys.argv[2])
t0 = time.time()
while True:
    try:
        c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        n = c.execute("SELECT count(*) FROM salt_returns").fetchone()[0]
        c.close()
    except sqlite3.Error:
        n = 0
    if n >= want:
        break
    time.sleep(0.1)
s = time.time() - t0
print(f"worker half: {n} returns drained into SQLite in {s:.2f} s = {n / s:,.0f} returns/s")
PY
pkill -TERM -P "$pid" 2>/dev/null || kill -TERM "$pid"
wait "$pid" 2>/dev/null || true
tail -1 "$d/drain.log"
