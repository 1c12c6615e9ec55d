#!/usr/bin/env bash
# What the database servers themselves manage, with no saltpipe and no client
# protocol per row (docs/BENCHMARKS.md, "What the databases themselves do"):
# N returns shaped like saltpipe-gen's (~1 KiB, cmd.run, 100 minions) are made
# inside the server in a staging table, then copied into saltpipe's schema
# (`saltpipe schema --print`: the returner's tables, keys and indexes) with
# INSERT ... SELECT in transactions of 2,000 rows, the sink's batch, with the
# sink's conflict handling. A client cannot insert these rows faster than the
# server does this, so it bounds every end-to-end figure of that database.
#
#   scripts/bench-db-ceiling.sh [N]     (default 200000; DBS="postgres mariadb")
#   WRITERS=2 scripts/bench-db-ceiling.sh   (sessions at once, as `sink.writers`;
#                                            default 1 and 2, both reported)
#
# Needs PostgreSQL on 127.0.0.1:5432 (trust) and MariaDB on 127.0.0.1:3306
# (root, no password), the psql and mysql clients; uses a database named
# sp_ceiling_<random> on each, dropped afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-200000}"
DBS="${DBS:-postgres mariadb}"
WRITERS="${WRITERS:-1 2}"
if [ -z "${BIN:-}" ]; then
    cargo build --release --bin saltpipe -q
    BIN=target/release
fi
SP=$BIN/saltpipe
DB="sp_ceiling_$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')"
pg() { psql -h 127.0.0.1 -U postgres -qtA -v ON_ERROR_STOP=1 "$@"; }
my() { mysql -h127.0.0.1 -uroot -N -B "$@"; }
work="$(mktemp -d)"
cleanup() {
    pg -d test -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
    my -e "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

# Prints "<name>: <rows> rows in <s> s = <rows/s> rows/s" for the timed part.
timed() {
    local name=$1 start end rows; shift
    start=$(date +%s.%N)
    "$@"
    end=$(date +%s.%N)
    rows=$(count)
    python3 -c "print(f'$name: $rows rows in {$end - $start:.2f} s = {$rows / ($end - $start):,.0f} rows/s (load $(cut -d' ' -f1 /proc/loadavg))')"
}

# Runs the statements of file $2 with client command $1.. in $W sessions at
# once, each taking every W-th statement (the sink's writers take batches
# in turn the same way).
sessions() {
    local file=$1 w=$2; shift 2
    local k
    for ((k = 0; k < w; k++)); do
        awk -v w="$w" -v k="$k" 'NR % w == k' "$file" >"$file.$w.$k"
    done
    for ((k = 0; k < w; k++)); do
        "$@" <"$file.$w.$k" &
    done
    wait
}

ret_json() { # SQL expression of a return's JSON for minion expression $1, jid expression $2
    echo "'{\"cmd\": \"_return\", \"id\": \"minion-' || $1 || '\", \"jid\": \"' || $2 || '\", \"fun\": \"cmd.run\", \"fun_args\": [\"uptime\"], \"return\": \"' || repeat('x', 796) || '\", \"retcode\": 0, \"success\": true, \"user\": \"root\", \"_stamp\": \"2026-11-25T12:00:00.123456+00:00\", \"ts\": 1795000000}'"
}

if [[ " $DBS " == *" postgres "* ]]; then
    pg -d test -c "CREATE DATABASE $DB" >/dev/null
    "$SP" schema --print "postgres://postgres@127.0.0.1/$DB" | pg -d "$DB" >/dev/null 2>&1
    pg -d "$DB" -c "CREATE UNLOGGED TABLE stage AS SELECT i, 'cmd.run'::text AS fun,
        (20261125120000000000 + i / 100)::text AS jid, 'minion-' || lpad((i % 100)::text, 5, '0') AS id,
        'true'::text AS success,
        $(ret_json "lpad((i % 100)::text, 5, '0')" "(20261125120000000000 + i / 100)::text") AS full_ret
        FROM generate_series(0, $N - 1) AS i; CHECKPOINT;"
    for ((lo = 0; lo < N; lo += 2000)); do
        # As the sink does: the jsonb parsed once, `return` taken from it.
        echo "INSERT INTO salt_returns (fun, jid, return, id, success, full_ret) SELECT fun, jid, fr -> 'return', id, success, fr FROM (SELECT fun, jid, id, success, full_ret::jsonb AS fr FROM stage WHERE i >= $lo AND i < $lo + 2000) s ON CONFLICT DO NOTHING;"
    done >"$work/pg.sql"
    count() { pg -d "$DB" -c "SELECT count(*) FROM salt_returns"; }
    for w in $WRITERS; do
        pg -d "$DB" -c "TRUNCATE salt_returns; CHECKPOINT;" >/dev/null
        timed "postgres server alone, $w session(s)" sessions "$work/pg.sql" "$w" pg -d "$DB"
    done
fi

if [[ " $DBS " == *" mariadb "* ]]; then
    my -e "CREATE DATABASE $DB CHARACTER SET utf8mb4"
    "$SP" schema --print "mysql://root@127.0.0.1/$DB" | my "$DB"
    minion="LPAD(seq % 100, 5, '0')"
    jid="CAST(20261125120000000000 + FLOOR(seq / 100) AS CHAR)"
    my "$DB" -e "CREATE TABLE stage (i INT PRIMARY KEY, fun varchar(50), jid varchar(255), id varchar(255),
        success varchar(10), ret mediumtext, full_ret mediumtext) ENGINE=InnoDB;
        SET SESSION sql_mode = 'PIPES_AS_CONCAT';
        INSERT INTO stage SELECT seq, 'cmd.run', $jid, 'minion-' || $minion, '1',
        '\"' || REPEAT('x', 796) || '\"', $(ret_json "$minion" "$jid" | sed 's/repeat(/REPEAT(/') FROM seq_0_to_$((N - 1));"
    for ((lo = 0; lo < N; lo += 2000)); do
        echo "INSERT INTO salt_returns (fun, jid, \`return\`, id, success, full_ret) SELECT fun, jid, ret, id, success, full_ret FROM stage WHERE i >= $lo AND i < $lo + 2000 ON DUPLICATE KEY UPDATE jid = salt_returns.jid;"
    done >"$work/my.sql"
    count() { my "$DB" -e "SELECT count(*) FROM salt_returns"; }
    for w in $WRITERS; do
        my "$DB" -e "TRUNCATE salt_returns"
        timed "mariadb server alone, $w session(s)" sessions "$work/my.sql" "$w" my "$DB"
    done
fi
