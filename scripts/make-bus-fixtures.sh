#!/usr/bin/env bash
# Re-create tests/fixtures/salt-<VERSION>-bus.bin (+ .summary.txt) from a real
# throwaway master: a sandbox is brought up, the bus is captured while a fixed
# script of jobs runs, then everything is stopped.
#
#   scripts/make-bus-fixtures.sh [VERSION] [full|small]
#
# full (default for 3008.5): the whole job list below; small: test.ping and
# cmd.run 'exit 3' only. Takes about 1.5 minutes (full).
set -euo pipefail

VERSION="${1:-3008.5}"
MODE="${2:-full}"
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
OUTDIR="$REPO/tests/fixtures"
VENV="$("$HERE/salt-venv.sh" "$VERSION" | tail -n1)"
export SALTPIPE_SALT_VENV="$VENV"
PY="$VENV/bin/python"
SB="$(mktemp -d /tmp/saltpipe-fixture.XXXXXX)"
OUT="$OUTDIR/salt-$VERSION-bus.bin"
S=(python3 "$HERE/salt-sandbox.py")
CAP_PID=""

log() { echo "make-bus-fixtures: $*" >&2; }
cleanup() {
    if [[ -n "$CAP_PID" ]] && kill -0 "$CAP_PID" 2>/dev/null; then kill -TERM "$CAP_PID"; wait "$CAP_PID" || true; fi
    "${S[@]}" down --dir "$SB" || true
}
trap cleanup EXIT

log "sandbox in $SB (salt $VERSION)"
"${S[@]}" up --dir "$SB" --minions 2 >/dev/null
sleep 3   # let start-up chatter settle before recording

rm -f "$OUT"
python3 "$HERE/capture-bus.py" --sandbox "$SB" --out "$OUT" --ready-file "$SB/capture.ready" \
    >"$SB/capture.json" &
CAP_PID=$!
for _ in $(seq 50); do [[ -f "$SB/capture.ready" ]] && break; sleep 0.1; done
[[ -f "$SB/capture.ready" ]] || { log "capture did not connect"; exit 1; }
sleep 1

step() { log "step: $*"; echo "== $*" >>"$SB/steps.txt"; }
salt() { "${S[@]}" salt --dir "$SB" -- "$@" >>"$SB/steps.txt" || true; sleep 1.5; }

step "salt '*' test.ping"
salt '*' test.ping
step "salt '*' cmd.run 'exit 3'"
salt '*' cmd.run 'exit 3'

if [[ "$MODE" == full ]]; then
    step "salt '*' cmd.run 'echo hi'"
    salt '*' cmd.run 'echo hi'
    step "salt minion-1 cmd.run 'sleep 12'  (saltutil.find_job polls)"
    salt minion-1 cmd.run 'sleep 12'
    step "salt '*' state.apply failing"
    salt '*' state.apply failing
    step "salt '*' test.ping,test.echo , hello  (multi-function job)"
    salt '*' test.ping,test.echo , hello
    step "salt minion-1 test.echo,test.arg hello , a b=1  (multi-function, kwarg)"
    salt minion-1 test.echo,test.arg hello , a b=1
    step "salt-call (minion-1) test.ping"
    "${S[@]}" salt-call --dir "$SB" --id minion-1 -- test.ping >>"$SB/steps.txt"; sleep 1.5
    step "salt-call (minion-1) event.send saltpipe/custom/hello {...}"
    # data as YAML flow map with literal UTF-8 (incl. a 4-byte char): Salt's
    # CLI yamlifies it into a dict (JSON \u-surrogate escapes would not parse
    # and the whole thing would stay a string, and event.send drops it).
    UTF8="$(printf 'caf\303\251 \360\237\247\202')"   # "café 🧂" (U+1F9C2: 4 bytes in UTF-8)
    "${S[@]}" salt-call --dir "$SB" --id minion-1 -- event.send saltpipe/custom/hello \
        "{greeting: hi, n: 1, big: 18446744073709551616, neg: -5, nested: {list: [1, 2.5, null, true]}, utf8: '$UTF8'}" \
        >>"$SB/steps.txt"; sleep 1.5
    step "salt-run test.arg 1"
    "${S[@]}" salt-run --dir "$SB" -- test.arg 1 >>"$SB/steps.txt"; sleep 1.5
    step "stop minion-2; salt minion-2 test.ping  (job to a stopped minion)"
    "${S[@]}" stop-minion --dir "$SB" --id minion-2
    sleep 1
    salt minion-2 test.ping
    sleep 2
fi

kill -TERM "$CAP_PID"; wait "$CAP_PID" || true; CAP_PID=""
cat "$SB/capture.json" >&2
cp "$SB/steps.txt" "$OUTDIR/salt-$VERSION-bus.steps.txt"
"$PY" "$HERE/dump-bus.py" --tags-only "$OUT" >"$OUTDIR/salt-$VERSION-bus.summary.txt"
log "wrote $OUT ($(stat -c %s "$OUT") bytes), $(wc -l <"$OUTDIR/salt-$VERSION-bus.summary.txt") frames"
