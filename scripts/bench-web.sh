#!/usr/bin/env bash
# Server time of each web page, p50/p95 over N sequential requests, measured
# by curl on loopback (time to the last byte; no connection reuse).
#   scripts/bench-web.sh http://127.0.0.1:8080 [N]
# Fill a database first (docs/BENCHMARKS.md, "Web pages"), serve it with
# `saltpipe web`. Jids and minions for the job/minion pages are taken from
# the job list, so any database works.
set -euo pipefail
base=${1:?base URL}
n=${2:-40}
jobs=$(curl -sf "$base/jobs")
jid=$(grep -o 'data-jid="[0-9]*"' <<<"$jobs" | sed -n 1p | grep -o '[0-9]\+')
older=$(grep -o 'data-jid="[0-9]*"' <<<"$jobs" | tail -1 | grep -o '[0-9]\+')
state_jid=$(curl -sf "$base/jobs?fun=state.apply&outcome=failed" | grep -o 'data-jid="[0-9]*"' | sed -n 1p | grep -o '[0-9]\+' || echo "$jid")
minion=$(curl -sf "$base/job/$jid" | grep -o 'class="result-link" href="[^"]*"' | sed -n 1p | sed 's/.*minion=//; s/"//')
pages=(
  "/"
  "/jobs"
  "/jobs?before=$older"
  "/jobs?outcome=failed"
  "/jobs?fun=state.*&outcome=failed"
  "/jobs?minion=$minion"
  "/job/$jid"
  "/job/$state_jid"
  "/minion/$minion"
  "/search?q=$minion&days=1"
  "/data/hourly.csv"
)
printf '%-44s %8s %8s %8s\n' page p50_ms p95_ms max_ms
curl -s -o /dev/null "$base/" # one warm-up request (page cache, prepared statements)
for p in "${pages[@]}"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' "$base$p")
  if [ "$code" != 200 ]; then printf '%-44s HTTP %s (not timed)\n' "${p:0:44}" "$code"; continue; fi
  for _ in $(seq "$n"); do curl -s -o /dev/null -w '%{time_total}\n' "$base$p"; done |
    sort -n | awk -v p="$p" '{ t[NR] = $1 * 1000 } END {
      i50 = int(NR * 0.50 + 0.5); i95 = int(NR * 0.95 + 0.5); if (i95 > NR) i95 = NR
      printf "%-44s %8.1f %8.1f %8.1f\n", substr(p, 1, 44), t[i50], t[i95], t[NR] }'
done
