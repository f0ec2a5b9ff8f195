#!/usr/bin/env bash
# Packaging suite: reshard installed the ways its users install it, each from a clean place.
#   wheel    pip wheel . (maturin; from bindings/python too) -> a fresh venv -> the Python suite
#            and tests/package/test_installed.py against the installed package, run outside the
#            checkout with no checkout folder on sys.path and no RESHARD_LIBRARY
#   archive  scripts/package.sh -> unpacked into a temp prefix -> tests/cpp configured with
#            CMAKE_PREFIX_PATH=<that prefix>, built and run through ctest; tests/c built with the
#            archive's pkg-config file
#   cargo    cargo install --path crates/reshard-cli --root <temp> -> reshard --version
# Every step reuses the release build in the target folder (cargo build --release -p reshard-ffi
# -p reshard-cli, as the other suites); each prints its time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
cargo build --release -p reshard-ffi -p reshard-cli
target_dir=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
work=$(mktemp -d "${TMPDIR:-/tmp}/reshard-package.XXXXXX")
trap 'rm -rf "$work"' EXIT
runs=0
failed=0

run() { # name, command...
  local name=$1 start=$SECONDS
  shift
  echo "-- $name"
  runs=$((runs + 1))
  if "$@"; then
    echo "-- $name: ok ($((SECONDS - start)) s)"
  else
    echo "FAILED: $name ($((SECONDS - start)) s)"
    failed=$((failed + 1))
  fi
}

wheel() {
  # maturin comes from tests/install-deps.sh (the version pyproject.toml pins), so no download.
  python3 -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheel-root" "$root" &&
    python3 -m pip wheel -q --no-deps --no-build-isolation -w "$work/wheel-bindings" "$root/bindings/python" || return 1
  local whl
  whl=$(ls "$work"/wheel-root/reshard-"$version"-py3-none-*.whl) || return 1
  echo "built $(basename "$whl") ($(du -k "$whl" | cut -f1) KiB)"
  # Both pyproject.toml files make the same wheel.
  diff <(python3 -m zipfile -l "$whl" | awk '{print $1}') \
    <(python3 -m zipfile -l "$work"/wheel-bindings/reshard-*.whl | awk '{print $1}') || return 1
  # maturin chose the manylinux tag from the executable; the bundled library must need no newer
  # glibc than that.
  local tag lib_glibc
  tag=$(basename "$whl" .whl | sed -n 's/.*-manylinux_\([0-9]*\)_\([0-9]*\)_x86_64$/\1.\2/p')
  if [ -n "$tag" ]; then
    python3 -m zipfile -e "$whl" "$work/unzipped" &&
      lib_glibc=$(objdump -T "$work/unzipped/reshard/libreshard.so" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1) &&
      [ "$(printf '%s\n%s\n' "$lib_glibc" "$tag" | sort -V | tail -1)" = "$tag" ] ||
      { echo "libreshard.so needs glibc $lib_glibc, newer than the wheel's tag manylinux $tag"; return 1; }
  fi
  python3 -m venv "$work/venv" &&
    "$work/venv/bin/python" -m pip install -q --no-deps "$whl" &&
    "$work/venv/bin/python" -m pip install -q "pytest==8.3.4" || return 1
  # From an empty folder (python -m puts the working folder on sys.path), with only the venv.
  mkdir "$work/cwd" && (cd "$work/cwd" && env -u RESHARD_LIBRARY -u PYTHONPATH -u CARGO_TARGET_DIR \
    RESHARD_TEST_INSTALLED=1 PATH="$work/venv/bin:$PATH" \
    "$work/venv/bin/python" -m pytest -q -p no:cacheprovider "$root/tests/python" "$here/test_installed.py")
}

run "wheel: pip wheel, fresh venv, Python suite on the installed package" wheel

echo "package suite: $((runs - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
