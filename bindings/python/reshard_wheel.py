"""PEP 517 build backend for the reshard wheel: maturin, after the step it cannot do itself.

maturin's ``bindings = "bin"`` builds and packs the ``reshard`` executable (crate reshard-cli)
but not the C library the ctypes module loads, and it takes the Python package from a folder as
it is. So ``build_wheel`` first builds libreshard.so (``cargo build --release -p reshard-ffi``,
in the same target folder and profile as the tests, so an existing build is reused), then lays
out the package in ``target/python-package/reshard/``:

    __init__.py            bindings/python/reshard.py, as it is
    libreshard.so          found there first by the module (debug info stripped)
    include/reshard.h      the C header, and the C++ wrapper reshard.hpp

and hands over to maturin, which adds the executable (on PATH after install) and takes the
version from the workspace; the executable is then stripped in the finished wheel. Used by both pyproject.toml files (the repository root's
and bindings/python's).
"""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

import maturin

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
STAGE = os.path.join(ROOT, "target", "python-package")

get_requires_for_build_wheel = maturin.get_requires_for_build_wheel


def _run(cmd, **kwargs):
    print("reshard_wheel: " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, stdout=sys.stderr, **kwargs)


def _target_dir():
    out = subprocess.run(
        ["cargo", "metadata", "--no-deps", "--format-version", "1"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout
    return json.loads(out)["target_directory"]


def _strip_debug(src, dst):
    if shutil.which("strip"):
        # The release profile keeps line tables (debug = 1) for profiling: most of the size.
        _run(["strip", "--strip-debug", "-o", dst, src])
    else:
        shutil.copyfile(src, dst)


def _strip_scripts(wheel):
    """Strips the executable that maturin packed, rewriting the wheel and its RECORD. (maturin's
    own ``strip = true`` passes -C strip to rustc: reshard is relinked, 13 s here, and the
    target folder's reshard is left stripped for the benchmarks and profilers that use it.)"""
    with zipfile.ZipFile(wheel) as zin:
        entries = [(info, zin.read(info)) for info in zin.infolist()]
    record = []
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for info, data in entries:
            if info.filename.endswith(".dist-info/RECORD"):
                record_info = info
                continue
            if ".data/scripts/" in info.filename:
                src, dst = os.path.join(tmp, "in"), os.path.join(tmp, "out")
                with open(src, "wb") as f:
                    f.write(data)
                _strip_debug(src, dst)
                with open(dst, "rb") as f:
                    data = f.read()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{info.filename},sha256={digest},{len(data)}")
            out.append((info, data))
    record.append(f"{record_info.filename},,")
    out.append((record_info, ("\n".join(record) + "\n").encode()))
    partial = wheel + ".tmp"
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, data in out:
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    os.replace(partial, wheel)


def _stage():
    # With reshard-cli too: the same feature set as the test suites build, so nothing recompiles.
    _run(["cargo", "build", "--release", "--locked", "-p", "reshard-ffi", "-p", "reshard-cli"], cwd=ROOT)
    lib = os.path.join(_target_dir(), "release", "libreshard.so")
    pkg = os.path.join(STAGE, "reshard")
    shutil.rmtree(STAGE, ignore_errors=True)
    os.makedirs(os.path.join(pkg, "include"))
    shutil.copyfile(os.path.join(ROOT, "bindings", "python", "reshard.py"), os.path.join(pkg, "__init__.py"))
    shutil.copyfile(os.path.join(ROOT, "include", "reshard.h"), os.path.join(pkg, "include", "reshard.h"))
    shutil.copyfile(os.path.join(ROOT, "bindings", "cpp", "reshard.hpp"), os.path.join(pkg, "include", "reshard.hpp"))
    dst = os.path.join(pkg, "libreshard.so")
    _strip_debug(lib, dst)
    os.chmod(dst, 0o755)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    _stage()
    # maturin's hook runs the `maturin` command from PATH; with --no-build-isolation that is
    # the interpreter's scripts folder, which need not be on PATH (appended: a build
    # environment's own maturin stays first).
    os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + sysconfig.get_path("scripts")
    settings = dict(config_settings or {})
    if "build-args" not in settings and "maturin.build-args" not in settings:
        # An empty --compatibility is maturin's command-line default: the lowest manylinux tag
        # that the executable's glibc symbols allow (plain linux if none). Without it maturin's
        # PEP 517 hook passes "off", which always tags the wheel plain linux.
        settings["build-args"] = os.environ.get("MATURIN_PEP517_ARGS", "") + " --compatibility"
    name = maturin.build_wheel(wheel_directory, settings, metadata_directory)
    _strip_scripts(os.path.join(wheel_directory, name))
    return name


def build_sdist(sdist_directory, config_settings=None):
    raise RuntimeError(
        "reshard has no source distribution: build a wheel from the source tree "
        "(pip wheel . / pip install . / python -m build --wheel)"
    )
