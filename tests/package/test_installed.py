"""Checks that the Python suite, run by tests/package/run.sh, tested the installed wheel: the
module and libreshard.so come from the package in site-packages, nothing from the checkout, and
the wheel's `reshard` executable is on PATH."""

import filecmp
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

import reshard

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
PACKAGE = os.path.dirname(os.path.abspath(reshard.__file__))


def workspace_version():
    with open(os.path.join(ROOT, "Cargo.toml")) as f:
        return re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)


def test_module_and_library_come_from_the_installed_package():
    assert os.environ.get("RESHARD_TEST_INSTALLED") == "1"
    assert "RESHARD_LIBRARY" not in os.environ
    assert not PACKAGE.startswith(ROOT + os.sep), PACKAGE
    assert os.path.basename(reshard.__file__) == "__init__.py"
    assert PACKAGE.startswith(sys.prefix + os.sep) and sys.prefix != sys.base_prefix, (PACKAGE, sys.prefix)
    assert reshard.library_path() == os.path.join(PACKAGE, "libreshard.so")
    assert not any(os.path.abspath(p or ".").startswith(os.path.join(ROOT, "bindings")) for p in sys.path)


def test_versions_are_the_workspace_version():
    v = workspace_version()
    assert reshard.version() == v
    assert importlib.metadata.version("reshard") == v


def test_headers_are_bundled():
    for name, src in (("reshard.h", "include/reshard.h"), ("reshard.hpp", "bindings/cpp/reshard.hpp")):
        assert filecmp.cmp(os.path.join(PACKAGE, "include", name), os.path.join(ROOT, src), shallow=False)


def test_executable_is_on_path():
    exe = shutil.which("reshard")
    assert exe == os.path.join(sys.prefix, "bin", "reshard"), exe
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "reshard " + workspace_version()
    ckpt = os.path.join(ROOT, "tests", "fixtures", "conformance", "complete_to_dp2mp2", "src", "rank_0")
    ckpt = os.path.join(ckpt, sorted(os.listdir(ckpt))[0])
    r = subprocess.run([exe, "inspect", "--json", ckpt], capture_output=True, text=True, check=True)
    assert r.stdout.strip().startswith(("{", "["))
