#!/usr/bin/env bash
# C suite: tests/c/test_reshard.c against libreshard on the MindSpore-made fixtures, built with
# -Wall -Wextra -Werror and run four ways:
#   1. AddressSanitizer + UndefinedBehaviorSanitizer (LeakSanitizer included), shared library;
#   2. valgrind on a build without sanitizers: no definite leaks, no memory errors;
#   3. linked statically to libreshard.a;
#   4. compiled and linked with the flags of the pkg-config file cmake/reshard.pc.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
cargo build --release -p reshard-ffi -p reshard-cli
lib="${CARGO_TARGET_DIR:-$root/target}/release"
fixtures="$root/tests/fixtures/conformance"
out=$(mktemp -d "${TMPDIR:-/tmp}/reshard-c.XXXXXX")
trap 'rm -rf "$out"' EXIT
cc=${CC:-cc}
cflags=(-std=c11 -Wall -Wextra -Werror -g -I"$root/include")
src="$here/test_reshard.c"
runs=0
failed=0

run() { # name, command...
  local name=$1
  shift
  echo "-- $name"
  runs=$((runs + 1))
  if ! "$@"; then
    echo "FAILED: $name"
    failed=$((failed + 1))
  fi
}

sanitized() { # name, source, binary: built with ASan+UBSan (LeakSanitizer included) and run
  "$cc" "${cflags[@]}" -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
    "$2" -o "$out/$3" -L"$lib" -lreshard -Wl,-rpath,"$lib" -lpthread
  run "$1" env ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
    "$out/$3" "$fixtures" "$out/$3.scratch"
}

under_valgrind() { # name, source, binary: built without sanitizers and run under valgrind
  "$cc" "${cflags[@]}" -O1 "$2" -o "$out/$3" -L"$lib" -lreshard -Wl,-rpath,"$lib" -lpthread
  if ! command -v valgrind >/dev/null 2>&1; then
    echo "FAILED: $1: valgrind is not installed (tests/install-deps.sh installs it)"
    failed=$((failed + 1))
    return
  fi
  # Only definite leaks count (and are shown): rayon's global worker threads are still alive at
  # exit, so their thread-local blocks are "possibly lost" by design.
  run "$1" valgrind -q --leak-check=full --show-leak-kinds=definite --errors-for-leak-kinds=definite \
    --error-exitcode=1 "$out/$3" "$fixtures" "$out/$3.scratch"
}

sanitized "ASan+UBSan" "$src" test_asan
under_valgrind "valgrind" "$src" test_plain

"$cc" "${cflags[@]}" "$src" -o "$out/test_static" "$lib/libreshard.a" -lpthread -ldl -lm
run "static libreshard.a" "$out/test_static" "$fixtures" "$out/static"

# reshard_load_rank (tests/c/test_load.c): every fixture and rank into malloc'd buffers, under
# ASan+UBSan and valgrind (which also reports any byte of a buffer the load leaves unwritten).
sanitized "load: ASan+UBSan" "$here/test_load.c" load_asan
under_valgrind "load: valgrind" "$here/test_load.c" load_plain

pc_version=$(PKG_CONFIG_PATH="$root/cmake" pkg-config --modversion reshard)
cargo_version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
if [ "$pc_version" != "$cargo_version" ]; then
  echo "FAILED: cmake/reshard.pc says version $pc_version, Cargo.toml $cargo_version"
  failed=$((failed + 1))
fi
# shellcheck disable=SC2046 # pkg-config output is meant to be split into words
"$cc" -std=c11 -Wall -Wextra -Werror $(PKG_CONFIG_PATH="$root/cmake" pkg-config --cflags reshard) \
  "$src" -o "$out/test_pc" $(PKG_CONFIG_PATH="$root/cmake" pkg-config --libs reshard) -lpthread
run "pkg-config" "$out/test_pc" "$fixtures" "$out/pc"

echo "c suite: $((runs - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
