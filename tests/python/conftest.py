"""pytest setup for the ctypes bindings: imports bindings/python/reshard.py (or, with
RESHARD_TEST_INSTALLED=1, the installed package) and prints the suite's closing
"N passed, M failed" line."""

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
# tests/package/run.sh sets RESHARD_TEST_INSTALLED=1 to test the installed wheel instead.
if not os.environ.get("RESHARD_TEST_INSTALLED"):
    sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))


def pytest_terminal_summary(terminalreporter):
    stats = terminalreporter.stats
    passed = len(stats.get("passed", []))
    failed = len(stats.get("failed", [])) + len(stats.get("error", []))
    terminalreporter.write_line(f"{passed} passed, {failed} failed")
