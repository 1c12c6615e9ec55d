#!/usr/bin/env bash
# Broker benchmark (docs/BENCHMARKS.md, "## Brokers (issue 4)").
#
#   scripts/bench-brokers.sh [N] [SECS]
#
# 1. returns/s end to end (`saltpipe replay` of N return events: bus frames ->
#    rules -> queue -> workers -> SQLite or MariaDB), through the embedded queue and
#    through Redis, RabbitMQ and NATS (spool + forwarder + broker) with 1, 2
#    and 4 workers, into SQLite and into a fresh MariaDB database;
# 2. the listener's CPU at 1,000 and 5,000 events/s: `saltpipe listen` on a
#    real sandbox master while return events are pushed into its
#    master_event_pull.ipc for SECS seconds.
# Brokers: $SALTPIPE_TEST_REDIS, $SALTPIPE_TEST_AMQP, $SALTPIPE_TEST_NATS,
# MariaDB server: $SALTPIPE_TEST_MYSQL
# (defaults: the loopback servers). Every broker name is random and deleted.
# ONLY=e2e or ONLY=listen runs just one of the two parts.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-100000}"
SECS="${2:-20}"
REDIS="${SALTPIPE_TEST_REDIS:-redis://127.0.0.1:6379}"
AMQP="${SALTPIPE_TEST_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}"
NATS="${SALTPIPE_TEST_NATS:-nats://127.0.0.1:4222}"
MYSQL="${SALTPIPE_TEST_MYSQL:-mysql://root@127.0.0.1:3306}"

cargo build --release --bin saltpipe --example bench_brokers >&2
B=target/release/examples/bench_brokers
export SALTPIPE_BIN=target/release/saltpipe
WORK="$(mktemp -d)"
trap 'python3 scripts/salt-sandbox.py down --dir "$WORK/sandbox" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

if [ "${ONLY:-}" != listen ]; then
echo "## end to end: $N return events, saltpipe replay into SQLite and MariaDB"
echo
echo "| queue | sink | workers | events | stored | seconds | returns/s |"
echo "|---|---|---|---|---|---|---|"
"$B" gen --out "$WORK/stream.bin" --n "$N"
for sink in sqlite mariadb; do
    SINK=()
    [ "$sink" = mariadb ] && SINK=(--mysql "$MYSQL")
    "$B" e2e --stream "$WORK/stream.bin" --n "$N" --url embedded --workers 1 "${SINK[@]}"
    for url in "$REDIS" "$AMQP" "$NATS"; do
        for w in 1 2 4; do
            "$B" e2e --stream "$WORK/stream.bin" --n "$N" --url "$url" --workers "$w" "${SINK[@]}"
        done
    done
done
fi
[ "${ONLY:-}" = e2e ] && exit 0

echo
echo "## listener CPU, ${SECS}s per row, real master (sandbox)"
echo
VENV="$(scripts/salt-venv.sh | tail -1)"
python3 scripts/salt-sandbox.py up --dir "$WORK/sandbox" --minions 0 --venv "$VENV" > "$WORK/sandbox.json" 2>/dev/null \
  || python3 scripts/salt-sandbox.py up --dir "$WORK/sandbox" --minions 1 --venv "$VENV" > "$WORK/sandbox.json"
PULL="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["event_pull"])' "$WORK/sandbox.json")"
PUB="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["event_pub"])' "$WORK/sandbox.json")"
echo "| queue | target events/s | pushed events/s | kept | listener CPU (% of one core) | per 1,000 events/s |"
echo "|---|---|---|---|---|---|"
for url in embedded "$REDIS" "$AMQP" "$NATS"; do
    for rate in 1000 5000; do
        "$B" listen-cpu --pull "$PULL" --pub "$PUB" --url "$url" --rate "$rate" --secs "$SECS"
    done
done
