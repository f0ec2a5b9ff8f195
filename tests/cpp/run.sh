#!/usr/bin/env bash
# C++ suite: configures tests/cpp as a consumer of the reshard CMake package (found through
# CMAKE_PREFIX_PATH=<repo>, i.e. <repo>/cmake/reshardConfig.cmake), builds it and runs ctest.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"
cargo build --release -p reshard-ffi -p reshard-cli
build=$(mktemp -d "${TMPDIR:-/tmp}/reshard-cpp.XXXXXX")
trap 'rm -rf "$build"' EXIT
cmake -S "$here" -B "$build" -DCMAKE_PREFIX_PATH="$root" -DCMAKE_BUILD_TYPE=Debug >"$build/configure.log" ||
  { cat "$build/configure.log"; exit 1; }
cmake --build "$build" -j 2
status=0
ctest --test-dir "$build" --output-on-failure || status=$?
# Each test program's own closing line.
grep -h -E '^([0-9]+/[0-9]+ Testing: |[0-9]+ passed, [0-9]+ failed)' "$build/Testing/Temporary/LastTest.log" || true
total=$(grep -c '^add_test' "$here/CMakeLists.txt")
if [ "$status" -eq 0 ]; then
  echo "cpp suite: $total passed, 0 failed"
else
  failed=$(grep -c . "$build/Testing/Temporary/LastTestsFailed.log" 2>/dev/null || echo "$total")
  echo "cpp suite: $((total - failed)) passed, $failed failed"
fi
exit "$status"
