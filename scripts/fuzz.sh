#!/usr/bin/env bash
# Runs one cargo-fuzz target of fuzz/ for a given time, one job, seeded from tests/fixtures and
# tests/corpus (and the bundled example).
#
#   scripts/fuzz.sh TARGET [SECONDS]     TARGET: ckpt | safetensors | strategy_proto | strategy_json
#
# Only a stable toolchain is needed: cargo-fuzz's nightly flags (-Zsanitizer, sancov) are let
# through with RUSTC_BOOTSTRAP=1. Install cargo-fuzz once with `cargo install cargo-fuzz --locked`.
# Environment:
#   FUZZ_SANITIZER   none (default: the core is safe Rust, so panics are what we look for and
#                    ASan only halves the speed) or address
#   FUZZ_ARGS        extra libFuzzer flags, e.g. "-fork=1 -ignore_crashes=1" to keep going after
#                    a crash, or "-runs=0" to only replay the corpus
#   CARGO_BUILD_JOBS build jobs (default 1; the machine is shared)
# Crashes land in fuzz/artifacts/TARGET/ (reproduce: scripts/fuzz.sh TARGET with
# FUZZ_ARGS=that-file, or `cargo fuzz run TARGET FILE`); the grown corpus in fuzz/corpus/TARGET/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target=${1:?usage: scripts/fuzz.sh TARGET [SECONDS] (ckpt | safetensors | strategy_proto | strategy_json)}
secs=${2:-600}
case "$target" in
  ckpt | safetensors | strategy_proto | strategy_json) ;;
  *) echo "unknown target '$target'" >&2; exit 2 ;;
esac
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 2; }

cd "$root/fuzz"
corpus="corpus/$target"
mkdir -p "$corpus"
# Seeds: every file of the right kind under tests/fixtures, tests/corpus and examples, up to
# 64 KiB (larger ones slow every mutation down), named by content hash so reruns add nothing.
seeds() {
  case "$target" in
    ckpt) find "$root/tests/fixtures" "$root/tests/corpus" "$root/examples" -name '*.ckpt' \
            ! -path '*strateg*' ;;
    safetensors) find "$root/tests/fixtures" "$root/tests/corpus" -name '*.safetensors' ;;
    strategy_proto) find "$root/tests/fixtures" "$root/tests/corpus" "$root/examples" -name '*.ckpt' \
            -path '*strateg*' ;;
    strategy_json) find "$root/tests/fixtures" "$root/tests/corpus" -name '*.json' \
            \( -path '*strateg*' -o -path '*/corpus/*' \) ! -name '*.expected.json' ;;
  esac
}
n=0
while IFS= read -r f; do
  [ "$(stat -c %s "$f")" -le 65536 ] || continue
  cp "$f" "$corpus/seed-$(sha1sum "$f" | cut -c1-16)"
  n=$((n + 1))
done < <(seeds)
echo "fuzz.sh: $target for ${secs}s, $n seed files, corpus $(ls "$corpus" | wc -l) files" >&2

export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}
# shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
exec cargo fuzz run "$target" --sanitizer "${FUZZ_SANITIZER:-none}" --debug-assertions \
  "$corpus" -- \
  -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
  -dict="dicts/$target.dict" -print_final_stats=1 ${FUZZ_ARGS:-}
