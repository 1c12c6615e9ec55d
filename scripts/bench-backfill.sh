#!/usr/bin/env bash
# `saltpipe backfill --all` of a job cache written in Salt's own format
# (scripts/make-job-cache.py, Salt's local_cache) into SQLite: returns/s and
# peak RSS (/usr/bin/time -v), then the same again on the full database
# (a second run writes nothing).
#
#   scripts/bench-backfill.sh [RETURNS]         # default 100000
#   BENCH_DIR=/tmp/bf100k scripts/bench-backfill.sh   # reuse a generated cache
#
# Generating 100,000 returns with Salt's own code takes several minutes (its
# returner writes each return.p through an atomic rename); the cache is kept
# in $BENCH_DIR/cache and reused when it was made for the same RETURNS.
set -euo pipefail
N=${1:-100000}
cd "$(dirname "$0")/.."
VENV=$(bash scripts/salt-venv.sh | tail -1)
W=${BENCH_DIR:-$(mktemp -d /tmp/saltpipe-bench-backfill.XXXXXX)}
mkdir -p "$W"
CACHE="$W/cache"
if [ ! -f "$W/cache.$N" ]; then
    rm -rf "$CACHE"
    "$VENV/bin/python" scripts/make-job-cache.py write --cachedir "$CACHE" --returns "$N" --minions 10
    touch "$W/cache.$N"
fi
nice cargo build --release --bin saltpipe
cat > "$W/bench.toml" <<EOF
[queue]
url = "embedded://$W/queue"
[sink]
url = "sqlite://$W/salt.db"
[metrics]
enabled = false
[backfill]
job_cache_dir = "$CACHE/jobs"
EOF
rm -rf "$W/queue" "$W"/salt.db*
for run in first second; do
    /usr/bin/time -v target/release/saltpipe backfill --all --json -c "$W/bench.toml" \
        > "$W/$run.json" 2> "$W/$run.time"
    secs=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["seconds"])' "$W/$run.json")
    written=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["written"]["returns"])' "$W/$run.json")
    rss=$(awk '/Maximum resident/ {print $6}' "$W/$run.time")
    python3 -c "import sys; n,s,w,r=int(sys.argv[1]),float(sys.argv[2]),int(sys.argv[3]),int(sys.argv[4]); print(f'$run run: {n} returns read, {w} written in {s:.2f}s = {n/s:,.0f} returns/s, peak RSS {r/1024:.1f} MB')" "$N" "$secs" "$written" "$rss"
done
echo "rows: $(sqlite3 "$W/salt.db" 'SELECT count(*) FROM salt_returns') returns, $(sqlite3 "$W/salt.db" 'SELECT count(*) FROM jids') jobs ($W)"
