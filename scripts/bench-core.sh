#!/usr/bin/env bash
# Core benchmarks (issue 2): decode + rules on one core (criterion), and
# `saltpipe replay` of 1,000,000 ~1 KB job returns through the embedded queue
# into SQLite: events/s, peak RSS, transactions per 10,000 returns.
# Usage: scripts/bench-core.sh [COUNT]   (default 1000000; data in $BENCH_DIR or /tmp/saltpipe-bench)
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-1000000}
dir=${BENCH_DIR:-/tmp/saltpipe-bench}
mkdir -p "$dir"
cargo build --release --bins -q
stream="$dir/returns-$count.bin"
[ -f "$stream" ] || ./target/release/saltpipe-gen --count "$count" --size 1024 --out "$stream"
echo "== machine: $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $(date -u +%FT%TZ)"
echo "== decode + rules, one core (criterion)"
cargo bench --bench ingest -- --noplot 2>/dev/null | grep -E "^ingest|thrpt" || true
echo "== replay $count returns -> embedded queue -> SQLite"
rm -rf "$dir/queue" "$dir/salt.db" "$dir/salt.db-wal" "$dir/salt.db-shm"
SALTPIPE_QUEUE_URL="embedded://$dir/queue" SALTPIPE_SINK_URL="sqlite://$dir/salt.db" \
  /usr/bin/time -f "peak RSS %M KB, %e s wall, %P CPU" \
  ./target/release/saltpipe replay "$stream" --json >"$dir/replay.json" 2>"$dir/replay.time"
tail -1 "$dir/replay.time"
python3 - "$dir/replay.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
secs = s["seconds"]
print(f"returns written: {s['returns_written']}, kept {s['kept']}, in {secs:.1f} s")
print(f"end to end: {s['acked'] / secs:,.0f} returns/s")
print(f"transactions per 10,000 returns: {s['batches'] * 10000 / max(s['kept'], 1):.1f}")
print(f"sink busy: {s['sink_latency_us_total'] / 1e6:.1f} s")
PY
