#!/usr/bin/env bash
# The project's test command: Rust tests, then every suite under tests/*/run.sh
# (C, C++, Python, shell), each of which builds what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release
status=0
for suite in tests/*/run.sh; do
  [ -f "$suite" ] || continue
  echo "== $suite"
  if ! bash "$suite"; then
    echo "FAILED: $suite"
    status=1
  fi
done
exit $status
