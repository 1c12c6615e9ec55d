#!/usr/bin/env bash
# The whole test suite: unit tests, the conformance suites against the real
# databases and brokers on this machine, and the end-to-end tests against a
# real salt-master (installed into ~/.cache/saltpipe on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
# Tools the tests run besides the services: strace (tests/power_loss.rs
# checks the order of fsyncs), openssl (tests/db_tls.rs makes a throwaway CA),
# chromium + chromedriver (tests/web.rs drives the pages in a real browser).
missing=()
for tool in strace openssl; do command -v "$tool" >/dev/null 2>&1 || missing+=("$tool"); done
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
bash scripts/salt-venv.sh >/dev/null
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# The benches once in test mode (each benchmark runs once, checking it works),
# then every unit, conformance and end-to-end test (there are no doc tests).
cargo test --benches "$@" 2>&1 | tee -a "$log"
if [ $# -gt 0 ]; then
  cargo test --lib --bins --tests "$@" 2>&1 | tee -a "$log"
else
  # The four release-line job mixes of tests/e2e_salt.rs (~95 s each, mostly
  # waiting on Salt's processes) and the 3006 LTS syndic tree of
  # tests/e2e_topologies.rs run beside the rest of the suite instead of
  # after it: a third less wall time for the whole run.
  lines=(salt_3008_ipc salt_3008_tcp salt_3007_ipc salt_3006_ipc syndic_tree_3006)
  skip=()
  for t in "${lines[@]}"; do skip+=(--skip "$t"); done
  cargo test --lib --bins --tests --no-run 2>&1 | tee -a "$log"
  side=$(mktemp)
  cargo test --test e2e_salt --test e2e_topologies -- --exact "${lines[@]}" >"$side" 2>&1 &
  side_pid=$!
  status=0
  cargo test --lib --bins --tests -- --exact "${skip[@]}" 2>&1 | tee -a "$log" || status=$?
  wait "$side_pid" || status=$?
  echo "== release lines: tests/e2e_salt.rs, 3006 syndic tree (run beside the rest)" | tee -a "$log"
  tee -a "$log" <"$side"
  rm -f "$side"
  [ "$status" -eq 0 ] || exit "$status"
fi
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { p += $4; f += $6; s += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
