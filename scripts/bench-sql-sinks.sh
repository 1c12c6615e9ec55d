#!/usr/bin/env bash
# Benchmark of the SQL sinks (issue 3), end to end, on the real local servers.
#
#   scripts/bench-sql-sinks.sh            # COUNT=200000 returns of SIZE=1024 bytes
#   COUNT=500000 SALT_COUNT=20000 scripts/bench-sql-sinks.sh
#   SINKS="mariadb postgres" SALT_COUNT=0 BIN=/tmp/old scripts/bench-sql-sinks.sh
#       # some sinks only, no Salt run, binaries from elsewhere (A/B of two builds)
#   WRITERS=1 SINKS="mariadb postgres" SALT_COUNT=0 scripts/bench-sql-sinks.sh
#       # `sink.writers` for the database servers (default: the sink's, 2), to
#       # compare with scripts/bench-db-ceiling.sh's sessions
#
# 1. saltpipe-gen writes a stream: COUNT job returns of ~SIZE bytes, 100 minions
#    per job, with the noise a real bus carries (new/publish, find_job, auth).
# 2. `saltpipe replay` pushes it through rules -> embedded queue -> worker -> sink,
#    once per database (MariaDB, PostgreSQL, and SQLite for reference), each into
#    a fresh database with a random name that is dropped afterwards.
#    Reported: returns/s end to end (returns written / wall time of the replay),
#    transactions per 10,000 returns (batches / returns * 10,000), a check
#    that the table holds exactly COUNT rows, and the 1-minute load average
#    before and after (the machine is shared: a figure means little without it).
# 3. In the same run, Salt's own path: saltext-mysql's event_return (from the
#    Salt venv, scripts/salt-venv.sh) on the first SALT_COUNT returns of the same
#    stream, into a database made with the returner's own DDL; once with the
#    master's default event_return_queue (0: one call, one transaction per event)
#    and once with event_return_queue = 2000 (its best case).
#
# Needs: MariaDB on 127.0.0.1:3306 (root, no password), PostgreSQL on
# 127.0.0.1:5432 (trust), the mysql and psql clients, python3 for the Salt venv.
set -euo pipefail

COUNT="${COUNT:-200000}"
SIZE="${SIZE:-1024}"
SALT_COUNT="${SALT_COUNT:-20000}"
cd "$(dirname "$0")/.."

SINKS="${SINKS:-mariadb postgres sqlite}"
WRITERS="${WRITERS:-}"
if [ -z "${BIN:-}" ]; then
    cargo build --release --bins >&2
    BIN=target/release
fi
work="$(mktemp -d)"
suffix="$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
MDB="saltpipe_bench_$suffix"
PDB="saltpipe_bench_$suffix"
SDB="saltpipe_bench_salt_$suffix"

my() { mysql -h127.0.0.1 -P3306 -uroot -N -B "$@"; }
pg() { psql -h 127.0.0.1 -U postgres -tA -v ON_ERROR_STOP=1 "$@"; }

cleanup() {
    my -e "DROP DATABASE IF EXISTS $MDB; DROP DATABASE IF EXISTS $SDB" || true
    pg -d test -c "DROP DATABASE IF EXISTS $PDB WITH (FORCE)" >/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

echo "generating $COUNT returns of ~$SIZE bytes" >&2
"$BIN/saltpipe-gen" --count "$COUNT" --size "$SIZE" --minions 100 --noise -o "$work/stream.bin"

my -e "CREATE DATABASE $MDB CHARACTER SET utf8mb4; CREATE DATABASE $SDB CHARACTER SET utf8mb4"
pg -d test -c "CREATE DATABASE $PDB" >/dev/null

declare -A URL=(
    [mariadb]="mysql://root@127.0.0.1:3306/$MDB"
    [postgres]="postgres://postgres@127.0.0.1:5432/$PDB"
    [sqlite]="sqlite://$work/salt.db"
)

# The database server's CPU beside saltpipe's says whether a run was
# CPU-bound on this machine's cores (they share them), which bounds the
# ratio to the server-alone ceiling (scripts/server-cpu.py).
server_cpu() { python3 scripts/server-cpu.py "$1"; }
declare -A SERVER=([mariadb]=mariadbd,mysqld [postgres]=postgres [sqlite]=none)

printf '| sink | returns | seconds | returns/s | transactions per 10,000 returns | rows in salt_returns | load | saltpipe CPU s | server CPU s | cores busy |\n'
printf '|---|---|---|---|---|---|---|---|---|---|\n'
for b in $SINKS; do
    # SQLite has one writer: WRITERS is for the database servers only.
    writers=""
    name=$b
    if [ -n "$WRITERS" ] && [ "$b" != sqlite ]; then
        writers="writers = $WRITERS"
        name="$b (writers=$WRITERS)"
    fi
    cat >"$work/$b.toml" <<EOF
[queue]
url = "embedded://$work/queue-$b"
[sink]
url = "${URL[$b]}"
master_id = "bench"
$writers
[log]
level = "warn"
EOF
    l0=$(cut -d' ' -f1 /proc/loadavg)
    c0=$(server_cpu "${SERVER[$b]}")
    /usr/bin/time -f "%U %S" -o "$work/$b.cpu" \
        "$BIN/saltpipe" --config "$work/$b.toml" replay --json "$work/stream.bin" >"$work/$b.json"
    c1=$(server_cpu "${SERVER[$b]}")
    l1=$(cut -d' ' -f1 /proc/loadavg)
    case $b in
        mariadb) rows="$(my "$MDB" -e 'SELECT count(*) FROM salt_returns')" ;;
        postgres) rows="$(pg -d "$PDB" -c 'SELECT count(*) FROM salt_returns')" ;;
        sqlite) rows="$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from salt_returns').fetchone()[0])" "$work/salt.db")" ;;
    esac
    python3 - "$name" "$work/$b.json" "$rows" "$l0-$l1" "$work/$b.cpu" "$c0" "$c1" <<'EOF'
import json, sys
name, path, rows, load, cpu, c0, c1 = sys.argv[1:8]
s = json.load(open(path))
r, t, b = s["returns_written"], s["seconds"], s["batches"]
mine = sum(float(x) for x in open(cpu).read().split()[-2:])
server = float(c1) - float(c0)
print(f"| {name} | {r} | {t:.2f} | {r / t:,.0f} | {b * 10000 / max(r, 1):.1f} | {rows} | {load} "
      f"| {mine:.2f} | {server:.2f} | {(mine + server) / t:.2f} |")
EOF
done

[ "$SALT_COUNT" -gt 0 ] || exit 0
VENV="$(scripts/salt-venv.sh 2>/dev/null | tail -1)"
my "$SDB" <<'EOF'
CREATE TABLE `salt_events` (
`id` BIGINT NOT NULL AUTO_INCREMENT,
`tag` varchar(255) NOT NULL,
`data` mediumtext NOT NULL,
`alter_time` TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
`master_id` varchar(255) NOT NULL,
PRIMARY KEY (`id`),
KEY `tag` (`tag`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8;
EOF
for q in 0 2000; do
    "$VENV/bin/python" scripts/bench-salt-event-return.py --stream "$work/stream.bin" \
        --db "$SDB" --count "$SALT_COUNT" --queue "$q" --only-returns >"$work/salt-$q.json"
    python3 - "$q" "$work/salt-$q.json" <<'EOF'
import json, sys
q, s = sys.argv[1], json.load(open(sys.argv[2]))
print(f"| Salt event_return (saltext-mysql, event_return_queue={q}) | {s['events']} | {s['seconds']:.2f} | {s['events_per_s']:,.0f} | {s['calls'] * 10000 / s['events']:.1f} | - | - | - | - | - |")
EOF
done
