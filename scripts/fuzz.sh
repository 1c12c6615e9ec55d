#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/) for a bounded time, starting
# from the committed seed corpus (fuzz/corpus/<target>, made by
# scripts/fuzz-seeds.py from the real captures). New inputs go to a temp
# dir, so the tree stays clean; a crash fails the run and leaves its input
# in fuzz/artifacts/<target>/.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]   (default 20 s, all)
# Needs the nightly toolchain (installed beside stable here) and cargo-fuzz,
# installed on first use. No sanitizer: the code under test is safe Rust,
# and without ASan the build is faster and each run does ~2x the inputs;
# overflow checks and debug assertions stay on.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(framer json event pack config)
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  echo "== fuzz $t for ${secs}s"
  if ! cargo +nightly fuzz run --sanitizer none "$t" "$work/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    >"$work/$t.log" 2>&1; then
    tail -40 "$work/$t.log" >&2
    echo "fuzz target $t failed: its input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  grep -E '^stat::(number_of_executed_units|peak_rss_mb)' "$work/$t.log" || true
done
echo "fuzz: ${#targets[@]} targets, ${secs}s each, no failure"
