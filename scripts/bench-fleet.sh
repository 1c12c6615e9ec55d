#!/usr/bin/env bash
# Fleet bursts through a real master (issue 16): saltpipe `run` beside a
# Salt 3008.5 master while `saltpipe-gen sim` pushes a simulated fleet into
# the master's master_event_pull.ipc, as the master's own MWorkers do.
#
#   scripts/bench-fleet.sh SINK [SCENARIO]       SINK: sqlite | mariadb | postgres
#   scripts/bench-fleet.sh mariadb burst100k      SCENARIO: highstate (default) | mixed | burst100k
#   MINIONS=2000 RATE=500 SEED=7 BIN=/tmp/old scripts/bench-fleet.sh postgres
#   HEADER=1 scripts/bench-fleet.sh sqlite        # the table header first
#   SIM_ARGS="--size 1KiB" scripts/bench-fleet.sh mariadb burst100k   # more sim options
#   MODE=listen scripts/bench-fleet.sh sqlite burst100k   # `saltpipe listen` alone: the
#       cost on the master when workers run elsewhere (a broker layout); the
#       embedded queue stands in for the broker, nothing is written to SQL, and
#       "stored" is what the queue took (saltpipe_queue_pushed_total)
#   EXTRA='[memory]
#   budget = "64MiB"' scripts/bench-fleet.sh mariadb burst100k       # more saltpipe config
#   SALTPIPE_SOURCE_PENDING_LIMIT=48MiB scripts/bench-fleet.sh sqlite   # a [source] key
#
# 1. A master alone (scripts/salt-sandbox.py up --no-minions), saltpipe `run`
#    (release build; the embedded queue, the default) reading its bus into a
#    throwaway database (dropped afterwards), configured by a TOML written to
#    a temp dir.
# 2. The simulator pushes the scenario as fast as the master takes it (or
#    RATE events/s) and prints what it sent (expected jids and returns).
# 3. Until the last row is in (or nothing changed for SETTLE s): the database
#    is polled (row count) and saltpipe's VmRSS sampled, every 0.25 s.
# 4. One summary line (a Markdown table row):
#    sent (events, MB, s), stored returns and jids, lost = expected - distinct
#    stored (returns; jids in brackets), doubled = rows - distinct, peak RSS
#    (VmHWM at the end / max sampled VmRSS), lag (s from the simulator's last
#    event to the last row committed, to the 0.25 s poll), CPU s per 100 MB of
#    bus traffic of saltpipe (utime+stime from the push's start to the last
#    row) and of the master's EventPublisher over the same time, their ratio,
#    and whether the master cut saltpipe off (bus reconnects after the first
#    connect, events dropped on overflow, oversized frames, from /metrics).
#
# Needs: the Salt venv (scripts/salt-venv.sh; its PyMySQL and psycopg2 poll
# the databases), MariaDB on 127.0.0.1:3306 (root), PostgreSQL on 5432 (trust).
set -euo pipefail

SINK="${1:?usage: bench-fleet.sh sqlite|mariadb|postgres [highstate|mixed|burst100k]}"
SCENARIO="${2:-highstate}"
MINIONS="${MINIONS:-10000}"
RATE="${RATE:-0}"
SEED="${SEED:-1}"
SETTLE="${SETTLE:-60}"
MODE="${MODE:-run}"
cd "$(dirname "$0")/.."
ROOT="$PWD"

if [ -z "${BIN:-}" ]; then
    cargo build --release --bins >&2
    BIN="$ROOT/target/release"
fi
VENV="$(scripts/salt-venv.sh 2>/dev/null | tail -1)"
PY="$VENV/bin/python"
work="$(mktemp -d /tmp/bench-fleet.XXXXXX)"
suffix="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
DB="saltpipe_fleet_$suffix"
sp_pid=""

my() { mysql -h127.0.0.1 -P3306 -uroot -N -B "$@"; }
pg() { psql -h 127.0.0.1 -U postgres -tA -v ON_ERROR_STOP=1 "$@"; }

cleanup() {
    if [ -n "$sp_pid" ] && kill -0 "$sp_pid" 2>/dev/null; then
        kill -TERM "$sp_pid" 2>/dev/null || true
        wait "$sp_pid" 2>/dev/null || true
    fi
    python3 scripts/salt-sandbox.py down --dir "$work/salt" >/dev/null 2>&1 || true
    case $SINK in
        mariadb) my -e "DROP DATABASE IF EXISTS $DB" || true ;;
        postgres) pg -d test -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null || true ;;
    esac
    if [ -n "${KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT

case $SINK in
    mariadb)
        my -e "CREATE DATABASE $DB CHARACTER SET utf8mb4"
        URL="mysql://root@127.0.0.1:3306/$DB" ;;
    postgres)
        pg -d test -c "CREATE DATABASE $DB" >/dev/null
        URL="postgres://postgres@127.0.0.1:5432/$DB" ;;
    sqlite) URL="sqlite://$work/salt.db" ;;
    *) echo "unknown sink $SINK" >&2; exit 2 ;;
esac

python3 scripts/salt-sandbox.py up --dir "$work/salt" --no-minions --venv "$VENV" >"$work/sandbox.json"
read -r master_pid pull pub < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(d["master_pid"], d["event_pull"], d["event_pub"])' "$work/sandbox.json")
publisher="$(ps -eo pid=,pgid=,args= | awk -v g="$master_pid" '$2 == g && $NF == "EventPublisher" { print $1; exit }')"
[ -n "$publisher" ] || { echo "no EventPublisher in the master's process group" >&2; exit 1; }
port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"

cat >"$work/saltpipe.toml" <<EOF
[source]
socket = "$pub"
[queue]
url = "embedded://$work/queue"
[sink]
url = "$URL"
master_id = "bench"
[backfill]
# the pushed events never reach the master's job cache: nothing to read back
enabled = false
[metrics]
listen = "127.0.0.1:$port"
${EXTRA:-}
[log]
level = "info"
EOF
"$BIN/saltpipe" --config "$work/saltpipe.toml" schema >/dev/null 2>"$work/schema.log"
"$BIN/saltpipe" --config "$work/saltpipe.toml" "$MODE" 2>"$work/saltpipe.log" &
sp_pid=$!
metric() { # the value of a counter (summed over labels) from /metrics
    curl -sf "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { print s + 0 }'
}
for _ in $(seq 200); do
    [ "$(metric saltpipe_bus_connects_total 2>/dev/null || echo 0)" -ge 1 ] && break
    kill -0 "$sp_pid" || { cat "$work/saltpipe.log" >&2; exit 1; }
    sleep 0.1
done
# User and system CPU ticks of a process, apart: the system part is mostly
# the kernel's copies (socket reads, file writes), the floor under the CPU
# ratio; their sum is the table's CPU.
split_ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }

# The watcher: samples saltpipe's VmRSS and polls the row count until the
# simulator's summary is there and the count reached what it expects, or
# stood still for SETTLE s.
"$PY" - "$SINK" "$URL" "$sp_pid" "$work/sim.json" "$SETTLE" "$MODE" "$port" >"$work/watch.json" <<'EOF' &
import json, os, sys, time, urllib.request
sink, url, pid, summary, settle, mode, port = sys.argv[1:8]
settle = float(settle)
if mode == "listen":
    conn = None
elif sink == "sqlite":
    import sqlite3
    path = url[len("sqlite://"):]
    while not os.path.exists(path):
        time.sleep(0.1)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
elif sink == "mariadb":
    import pymysql
    conn = pymysql.connect(host="127.0.0.1", port=3306, user="root", database=url.rsplit("/", 1)[1], autocommit=True)
else:
    import psycopg2
    conn = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=url.rsplit("/", 1)[1])
    conn.autocommit = True
def pushed():
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return int(sum(float(l.split()[-1]) for l in text.splitlines()
                   if l.startswith("saltpipe_queue_pushed_total")))
def count():
    if conn is None:
        return pushed()
    cur = conn.cursor()
    cur.execute("SELECT COUNT(*) FROM salt_returns")
    return cur.fetchone()[0]
def rss():
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
rows, changed, peak, expected = 0, time.time(), 0, None
while True:
    peak = max(peak, rss())
    n = count()
    now = time.time()
    if n != rows:
        rows, changed = n, now
    if expected is None and os.path.exists(summary) and os.path.getsize(summary) > 0:
        expected = json.load(open(summary))["expected_returns"]
    # listen: the queue takes every kept event (returns and the rest), so
    # the end is 2 s without a change once the simulator is done.
    wait = 2 if conn is None else settle
    if expected is not None and ((conn is not None and rows >= expected) or now - changed > wait):
        break
    time.sleep(0.25)
print(json.dumps({"rows": rows, "last_change": changed, "rss_max_kb": peak}))
EOF
watch_pid=$!

# Per thread: on CPU and waiting for a CPU (runnable, not running), from
# /proc/PID/task/*/schedstat (ns), to tell a starved stage from a slow one;
# and its minor page faults (stat field 10: on this VM each new page costs
# the host a fault too).
threads() {
    for t in /proc/"$1"/task/*; do
        printf '%s %s %s %s\n' "${t##*/}" "$(tr ' ' '_' <"$t/comm" 2>/dev/null)" \
            "$(cat "$t/schedstat" 2>/dev/null)" "$(sed 's/.*) //' "$t/stat" 2>/dev/null | awk '{ print $8 }')"
    done
}
{ threads "$sp_pid"; threads "$publisher" | sed 's/ / publisher:/'; } >"$work/threads0"
read -r spu0 sps0 < <(split_ticks "$sp_pid"); read -r epu0 eps0 < <(split_ticks "$publisher")
sp0=$((spu0 + sps0)); ep0=$((epu0 + eps0))
"$BIN/saltpipe-gen" sim --scenario "$SCENARIO" --minions "$MINIONS" --rate "$RATE" --seed "$SEED" \
    ${SIM_ARGS:-} --push "$pull" --summary "$work/sim.tmp" 2>"$work/sim.log"
mv "$work/sim.tmp" "$work/sim.json"
wait "$watch_pid"
read -r spu1 sps1 < <(split_ticks "$sp_pid"); read -r epu1 eps1 < <(split_ticks "$publisher")
sp1=$((spu1 + sps1)); ep1=$((epu1 + eps1))
{ threads "$sp_pid"; threads "$publisher" | sed 's/ / publisher:/'; } >"$work/threads1"
# By thread name, to stderr: seconds on CPU / waiting for a CPU / minor
# page faults over the run.
awk 'NR == FNR { run[$1] = $3; wait[$1] = $4; flt[$1] = $6; next }
     NF >= 6 { name = $2; r[name] += ($3 - run[$1]) / 1e9; w[name] += ($4 - wait[$1]) / 1e9; f[name] += $6 - flt[$1] }
     END { printf "threads, s on CPU / s waiting for one / minor faults:"; for (n in r) printf " %s %.2f/%.2f/%d", n, r[n], w[n], f[n]; print "" }' \
    "$work/threads0" "$work/threads1" >&2
hwm="$(awk '/^VmHWM:/ { print $2 }' "/proc/$sp_pid/status")"
connects="$(metric saltpipe_bus_connects_total)"
disconnects="$(metric saltpipe_bus_disconnects_total)"
overflow="$(metric saltpipe_events_overflow_dropped_total)"
oversized="$(metric saltpipe_frames_oversized_total)"
# The last scrape, read twice below.
final="$(curl -sf "http://127.0.0.1:$port/metrics")"
# The memory budget's parts at their peak, MB (builds before the budget: -).
parts="$(printf '%s\n' "$final" | awk '
    /^saltpipe_memory_peak_bytes\{part="listener"\}/ { l = $2 / 1048576 }
    /^saltpipe_memory_peak_bytes\{part="worker"\}/ { w = $2 / 1048576 }
    END { if (l == "" && w == "") print "-"; else printf "%.0f / %.0f", l, w }')"
# The listener's queue writer: its slowest transaction and its mean, in ms
# (a long one fills the reader's backlog; builds before the metric: -).
qwrite="$(printf '%s\n' "$final" | awk '
    /^saltpipe_queue_write_slowest_seconds / { slow = $2 * 1000 }
    /^saltpipe_queue_write_microseconds_total / { us = $2 }
    /^saltpipe_queue_writes_total / { n = $2 }
    END { if (n == "") print "-"; else printf "%.0f / %.1f", slow, us / 1000 / (n > 0 ? n : 1) }')"
# Kept events the listener held in its overflow file on disk while the
# queue was behind, and the file's peak in MB (builds before it: -).
spill="$(printf '%s\n' "$final" | awk '
    /^saltpipe_events_overflow_spilled_total / { n = $2 }
    /^saltpipe_overflow_peak_bytes / { p = $2 / 1e6 }
    END { if (n == "") print "-"; else printf "%d events, peak %.0f MB", n, p }')"
kill -TERM "$sp_pid"; wait "$sp_pid" || true; sp_pid=""
closed="$(grep -ciE 'bus closed|reconnect' "$work/saltpipe.log" || true)"
# What saltpipe said when it dropped events (how long the queue's write in
# progress had run, the slowest so far), to stderr.
grep -E 'cannot keep up with the bus' "$work/saltpipe.log" | head -5 >&2 || true
echo "queue writer: slowest / mean transaction ms: $qwrite" >&2
echo "overflow file: $spill" >&2
# CPU s per 100 MB of bus traffic, user / system, of saltpipe and of the
# master's EventPublisher, over the same time as the table's CPU columns.
python3 -c 'import json, sys
mb = json.load(open(sys.argv[1]))["bytes"] / 1e6
u, s, eu, es = (int(x) / 100.0 * 100 / mb for x in sys.argv[2:])
print(f"CPU s / 100 MB, user / system: saltpipe {u:.2f} / {s:.2f}, EventPublisher {eu:.2f} / {es:.2f}")' \
    "$work/sim.json" "$((spu1 - spu0))" "$((sps1 - sps0))" "$((epu1 - epu0))" "$((eps1 - eps0))" >&2

case $MODE/$SINK in
    listen/*)
        # What the queue took, every kept event (returns, jobs, the rest).
        rows="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["rows"])' "$work/watch.json")"
        distinct="$rows"; jids=0 ;;
    */mariadb)
        read -r rows distinct < <(my "$DB" -e 'SELECT COUNT(*), COUNT(DISTINCT jid, id) FROM salt_returns')
        jids="$(my "$DB" -e 'SELECT COUNT(DISTINCT jid) FROM jids')" ;;
    */postgres)
        IFS='|' read -r rows distinct < <(pg -d "$DB" -c 'SELECT COUNT(*), COUNT(DISTINCT (jid, id)) FROM salt_returns')
        jids="$(pg -d "$DB" -c 'SELECT COUNT(DISTINCT jid) FROM jids')" ;;
    */sqlite)
        read -r rows distinct jids < <(python3 -c '
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
q = lambda s: c.execute(s).fetchone()[0]
print(q("SELECT COUNT(*) FROM salt_returns"), q("SELECT COUNT(*) FROM (SELECT DISTINCT jid, id FROM salt_returns)"), q("SELECT COUNT(DISTINCT jid) FROM jids"))' "$work/salt.db") ;;
esac

[ -n "${HEADER:-}" ] && {
    echo "| scenario | sink | sent: events / MB / s | stored returns (jids) | lost (jids) | doubled | peak RSS MB: VmHWM / sampled | budget peak MB: listener / worker | lag s | saltpipe CPU s / 100 MB | EventPublisher CPU s / 100 MB | ratio | cut off |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
}
python3 - "$SCENARIO${SIM_ARGS:+ $SIM_ARGS}" "$([ "$MODE" = listen ] && echo "listen only" || echo "$SINK")" "$work/sim.json" "$work/watch.json" "$rows" "$distinct" "$jids" \
    "$hwm" "$((sp1 - sp0))" "$((ep1 - ep0))" "$connects" "$disconnects" "$overflow" "$oversized" \
    "$closed" "$parts" <<'EOF'
import json, sys
(scenario, sink, simf, watchf, rows, distinct, jids, hwm, sp, ep, connects, disconnects,
 overflow, oversized, closed, parts) = sys.argv[1:]
s, w = json.load(open(simf)), json.load(open(watchf))
rows, distinct, jids = int(rows), int(distinct), int(jids)
mb = s["bytes"] / 1e6
hz = 100.0  # USER_HZ
sp_s, ep_s = int(sp) / hz, int(ep) / hz
if sink == "listen only":
    # Kept events the listener dropped (its part full): the only loss there.
    lost, lost_jids = int(float(overflow)), 0
else:
    lost = s["expected_returns"] - distinct
    lost_jids = s["expected_jids"] - jids
lag = w["last_change"] - s["finished_unix"]
cut = int(float(connects)) - 1 + int(float(disconnects)) + int(float(overflow)) + int(float(oversized)) + int(closed)
cut_txt = "no" if cut == 0 else (f"YES: connects {connects}, disconnects {disconnects}, "
                                  f"overflow dropped {overflow}, oversized {oversized}, log lines {closed}")
ratio = (sp_s / ep_s) if ep_s > 0 else float("inf")
print(f"| {scenario} | {sink} | {s['events']:,} / {mb:,.0f} / {s['elapsed_s']:.1f} "
      f"| {distinct:,} ({jids}) | {lost} ({lost_jids}) | {rows - distinct} "
      f"| {int(hwm) / 1024:.0f} / {w['rss_max_kb'] / 1024:.0f} | {parts} | {lag:.1f} "
      f"| {sp_s * 100 / mb:.2f} | {ep_s * 100 / mb:.2f} | {ratio:.2f} | {cut_txt} |")
EOF
