#!/usr/bin/env bash
# Python suite: bindings/python/reshard.py through ctypes, with pytest, on the MindSpore-made
# fixtures. pytest's own exit status decides (5, "no tests collected", counts as a failure).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
cargo build --release -p reshard-ffi -p reshard-cli
export RESHARD_LIBRARY="${CARGO_TARGET_DIR:-$root/target}/release/libreshard.so"
exec python3 -m pytest -q -p no:cacheprovider "$here"
