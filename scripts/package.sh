#!/usr/bin/env bash
# Builds the release archive for C/C++ users (and anyone who wants the executable alone):
#
#   scripts/package.sh [OUT_DIR]        (default: <cargo target folder>/package)
#
# OUT_DIR/reshard-VERSION-ARCH-linux.tar.gz holds one folder, reshard-VERSION-ARCH-linux/, with
#   bin/reshard
#   lib/libreshard.so.VERSION, lib/libreshard.so -> libreshard.so.VERSION (the soname)
#   lib/libreshard.a
#   include/reshard.h, include/reshard.hpp
#   lib/cmake/reshard/reshardConfig.cmake, reshardTargets.cmake, reshardConfigVersion.cmake
#   lib/pkgconfig/reshard.pc
# Unpack it anywhere, or its contents into a prefix such as /usr/local: the CMake package and
# reshard.pc find everything relative to themselves (CMAKE_PREFIX_PATH=<where it was unpacked>).
# Uses the release build of the target folder (cargo build --release -p reshard-ffi -p
# reshard-cli, as the test suites); binaries are stripped of the line tables that the release
# profile keeps. The version is the workspace's. Prints the archive's path last.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --locked -p reshard-ffi -p reshard-cli
target_dir=$(cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
cmake_version=$(sed -n 's/^set(PACKAGE_VERSION "\(.*\)")$/\1/p' cmake/reshardConfigVersion.cmake)
if [ "$cmake_version" != "$version" ]; then
  echo "package.sh: cmake/reshardConfigVersion.cmake says $cmake_version, Cargo.toml $version" >&2
  exit 1
fi
out=${1:-$target_dir/package}
name="reshard-$version-$(uname -m)-linux"
mkdir -p "$out"
out=$(cd "$out" && pwd)
stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
dir="$stage/$name"
mkdir -p "$dir/bin" "$dir/include" "$dir/lib/cmake/reshard" "$dir/lib/pkgconfig"

release="$target_dir/release"
strip_copy() { # src, dst
  if command -v strip >/dev/null 2>&1; then strip --strip-debug -o "$2" "$1"; else cp "$1" "$2"; fi
}
strip_copy "$release/reshard" "$dir/bin/reshard"
strip_copy "$release/libreshard.so" "$dir/lib/libreshard.so.$version"
ln -s "libreshard.so.$version" "$dir/lib/libreshard.so"
strip_copy "$release/libreshard.a" "$dir/lib/libreshard.a"
chmod 755 "$dir/bin/reshard" "$dir/lib/libreshard.so.$version"
chmod 644 "$dir/lib/libreshard.a"
cp include/reshard.h bindings/cpp/reshard.hpp "$dir/include/"
cp cmake/install/reshardConfig.cmake cmake/reshardTargets.cmake cmake/reshardConfigVersion.cmake "$dir/lib/cmake/reshard/"
sed "s/@VERSION@/$version/" cmake/install/reshard.pc.in >"$dir/lib/pkgconfig/reshard.pc"
cp README.md "$dir/"

# Written under a temporary name, then renamed: a file under the final name is complete.
tar -C "$stage" --sort=name --owner=0 --group=0 --numeric-owner -czf "$stage/$name.tar.gz" "$name"
mv "$stage/$name.tar.gz" "$out/$name.tar.gz"
echo "$out/$name.tar.gz"
