#!/usr/bin/env bash
# The main job on the embedded default, from nothing: installs Salt into a
# virtualenv (cached in ~/.cache/saltpipe), starts a throwaway master with two
# minions on loopback, runs `saltpipe run` against its event bus (embedded
# queue, SQLite sink), runs a few jobs, stops saltpipe with SIGTERM and shows
# what was stored. Everything lives in a temporary directory, removed at the end
# (keep it with KEEP=1). Needs root (the master runs as root), like Salt's own.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/saltpipe-demo.XXXXXX)
sandbox="$work/salt"
cleanup() {
  [ -n "${sp_pid:-}" ] && kill "$sp_pid" 2>/dev/null || true
  python3 scripts/salt-sandbox.py down --dir "$sandbox" >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

echo "== building saltpipe"
cargo build --release --bin saltpipe
echo "== installing Salt 3008.5 (first time ~1 min)"
venv=$(bash scripts/salt-venv.sh | tail -1)
echo "== starting a master and two minions on loopback"
python3 scripts/salt-sandbox.py up --dir "$sandbox" --venv "$venv" --minions 2 >"$work/sandbox.json"
bus=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["event_pub"])' "$work/sandbox.json")

cat >"$work/saltpipe.toml" <<TOML
[source]
socket = "$bus"
[queue]
url = "embedded://$work/queue"
[sink]
url = "sqlite://$work/salt.db"
TOML
echo "== saltpipe run --config $work/saltpipe.toml"
./target/release/saltpipe run --config "$work/saltpipe.toml" 2>"$work/saltpipe.log" &
sp_pid=$!
sleep 1

salt() { python3 scripts/salt-sandbox.py salt --dir "$sandbox" -- "$@" >/dev/null || true; }
echo "== running jobs: test.ping, cmd.run 'echo hi', cmd.run 'exit 3', state.apply failing, cmd.run 'sleep 7' (find_job polls)"
salt '*' test.ping
salt '*' cmd.run 'echo hi'
salt '*' cmd.run 'exit 3'
salt '*' state.apply failing
salt 'minion-1' cmd.run 'sleep 7'
sleep 1
kill -TERM "$sp_pid"; wait "$sp_pid"; sp_pid=
echo "== saltpipe stopped (exit 0). Its log:"
sed 's/^/  /' "$work/saltpipe.log"
echo
echo "== salt_returns (one row per job and minion; no saltutil.find_job rows):"
python3 - "$work/salt.db" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
print(f"  {'jid':<22} {'minion':<10} {'fun':<12} {'success':<7} {'retcode':<7} return")
for jid, mid, fun, ok, ret, full in db.execute('SELECT jid, id, fun, success, "return", full_ret FROM salt_returns ORDER BY jid, id'):
    print(f"  {jid:<22} {mid:<10} {fun:<12} {ok:<7} {str(json.loads(full).get('retcode')):<7} {ret[:50]}")
print(f"  jids rows: {db.execute('SELECT count(*) FROM jids').fetchone()[0]}")
PY
