#!/usr/bin/env bash
# Packaging suite: reshard installed the ways its users install it, each from a clean place.
#   wheel    pip wheel . (maturin; from bindings/python too) -> a fresh venv -> the Python suite
#            and tests/package/test_installed.py against the installed package, run outside the
#            checkout with no checkout folder on sys.path and no RESHARD_LIBRARY
#   archive  scripts/package.sh -> unpacked into a temp prefix -> tests/cpp configured with
#            CMAKE_PREFIX_PATH=<that prefix>, built and run through ctest; tests/c built with the
#            archive's pkg-config file
#   cargo    cargo install --path crates/reshard-cli --root <temp> -> reshard --version; and
#            cargo package (no publishing) of the three crates without a warning
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

# Whether program $1 loads libreshard.so from prefix $2 (the path ldd shows may have "..").
loads_lib_from() {
  local got
  got=$(ldd "$1" | awk '$1 == "libreshard.so" { print $3 }')
  [ -n "$got" ] && [ "$(realpath "$got")" = "$(realpath "$2/lib/libreshard.so")" ] ||
    { echo "$1 does not load $2/lib/libreshard.so:"; ldd "$1"; return 1; }
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
  # A venv without its own pip (ensurepip alone takes 10 s here), filled by this pip.
  python3 -m venv --without-pip "$work/venv" &&
    python3 -m pip --python "$work/venv/bin/python" install -q --no-deps "$whl" &&
    python3 -m pip --python "$work/venv/bin/python" install -q "pytest==8.3.4" || return 1
  # From an empty folder (python -m puts the working folder on sys.path), with only the venv.
  mkdir "$work/cwd" && (cd "$work/cwd" && env -u RESHARD_LIBRARY -u PYTHONPATH -u CARGO_TARGET_DIR \
    RESHARD_TEST_INSTALLED=1 PATH="$work/venv/bin:$PATH" \
    "$work/venv/bin/python" -m pytest -q -p no:cacheprovider "$root/tests/python" "$here/test_installed.py")
}

archive() {
  local tgz prefix f
  tgz=$(bash "$root/scripts/package.sh" "$work/dist" | tail -1) || return 1
  echo "built $(basename "$tgz") ($(du -k "$tgz" | cut -f1) KiB)"
  mkdir "$work/unpacked" && tar -C "$work/unpacked" -xzf "$tgz" || return 1
  prefix="$work/unpacked/reshard-$version-$(uname -m)-linux"
  for f in bin/reshard lib/libreshard.so "lib/libreshard.so.$version" lib/libreshard.a include/reshard.h \
    include/reshard.hpp lib/cmake/reshard/reshardConfig.cmake lib/cmake/reshard/reshardTargets.cmake \
    lib/cmake/reshard/reshardConfigVersion.cmake lib/pkgconfig/reshard.pc; do
    [ -e "$prefix/$f" ] || { echo "the archive has no $f"; return 1; }
  done
  [ "$(readlink "$prefix/lib/libreshard.so")" = "libreshard.so.$version" ] &&
    [ "$("$prefix/bin/reshard" --version)" = "reshard $version" ] || return 1
  # CMake: the C++ test project with CMAKE_PREFIX_PATH=<where the archive was unpacked>, which
  # must find the archive's package (not the checkout's cmake/) and link its libraries.
  cmake -S "$root/tests/cpp" -B "$work/cpp" -DCMAKE_PREFIX_PATH="$work/unpacked" -DCMAKE_BUILD_TYPE=Debug \
    >"$work/cpp-configure.log" || { cat "$work/cpp-configure.log"; return 1; }
  grep -qxF "reshard_DIR:PATH=$prefix/lib/cmake/reshard" "$work/cpp/CMakeCache.txt" ||
    { echo "find_package(reshard) did not take the archive's package:"; grep reshard_DIR "$work/cpp/CMakeCache.txt"; return 1; }
  cmake --build "$work/cpp" -j 2 >"$work/cpp-build.log" || { cat "$work/cpp-build.log"; return 1; }
  loads_lib_from "$work/cpp/test_c_shared" "$prefix" || return 1
  ctest --test-dir "$work/cpp" --output-on-failure || return 1
  # pkg-config: tests/c with the flags of the archive's reshard.pc alone.
  local pc=(env PKG_CONFIG_LIBDIR="$prefix/lib/pkgconfig" PKG_CONFIG_PATH= pkg-config)
  [ "$("${pc[@]}" --modversion reshard)" = "$version" ] || return 1
  # shellcheck disable=SC2046 # pkg-config output is meant to be split into words
  ${CC:-cc} -std=c11 -Wall -Wextra -Werror $("${pc[@]}" --cflags reshard) "$root/tests/c/test_reshard.c" \
    -o "$work/test_c_pc" $("${pc[@]}" --libs reshard) -lpthread &&
    loads_lib_from "$work/test_c_pc" "$prefix" &&
    "$work/test_c_pc" "$root/tests/fixtures/conformance" "$work/pc-scratch"
}

cargo_install() {
  # CARGO_TARGET_DIR: cargo install would otherwise build everything again in a temp folder.
  CARGO_TARGET_DIR="$target_dir" cargo install --locked --path "$root/crates/reshard-cli" --root "$work/cargo-root" &&
    [ "$("$work/cargo-root/bin/reshard" --version)" = "reshard $version" ] || return 1
  # The crates are ready for a registry: packaging them (without publishing) warns about nothing,
  # e.g. a missing description, license or repository.
  cargo package --workspace --exclude reshard-bench --no-verify --locked --allow-dirty \
    --target-dir "$work/cargo-package" 2>"$work/cargo-package.log" || { cat "$work/cargo-package.log"; return 1; }
  if grep -q '^warning' "$work/cargo-package.log"; then
    cat "$work/cargo-package.log"
    return 1
  fi
}

run "wheel: pip wheel, fresh venv, Python suite on the installed package" wheel
run "archive: scripts/package.sh, unpacked, tests/cpp through find_package and tests/c through pkg-config" archive
run "cargo: cargo install --path crates/reshard-cli, crate metadata" cargo_install

echo "package suite: $((runs - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
