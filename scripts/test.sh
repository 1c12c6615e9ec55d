#!/usr/bin/env bash
# The whole test suite: unit tests, the conformance suites against the real
# databases and brokers on this machine, and the end-to-end tests against a
# real salt-master (installed into ~/.cache/saltpipe on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
bash scripts/salt-venv.sh >/dev/null
# The benches once in test mode (each benchmark runs once, checking it works),
# then every unit, conformance and end-to-end test; cargo's summary comes last.
cargo test --benches "$@"
exec cargo test "$@"
