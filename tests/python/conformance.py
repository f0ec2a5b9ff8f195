"""What the Python tests (test_reshard.py, test_load.py) share: where the MindSpore-made
fixtures are, and running calls on other threads."""

import os
import threading

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "conformance")
# Every conformance case (a folder with a case.json).
CASES = sorted(
    d for d in os.listdir(FIXTURES) if os.path.isfile(os.path.join(FIXTURES, d, "case.json"))
)


def in_threads(fn, args):
    """Runs fn(a) for every a of args, each on its own thread, all at once; returns the
    exceptions they raised (empty when none did)."""
    errors = []

    def run(a):
        try:
            fn(a)
        except BaseException as e:  # noqa: BLE001 - returned to the caller
            errors.append(e)

    threads = [threading.Thread(target=run, args=(a,)) for a in args]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


class HeldCall:
    """call(hold) started on another thread, `hold` being a progress callback that holds the
    call open until finish(). The constructor returns once the call is held (or has failed)."""

    def __init__(self, call):
        self._started, self._release = threading.Event(), threading.Event()
        self._result = None

        def hold(done, total):
            self._started.set()
            self._release.wait(30)

        def run():
            try:
                call(hold)
                self._result = "ok"
            except Exception as e:  # noqa: BLE001 - returned by finish()
                self._result = e
                self._started.set()

        self._thread = threading.Thread(target=run)
        self._thread.start()
        assert self._started.wait(30), "the call was never held"

    def finish(self):
        """Lets the call go on, waits for it and returns "ok" or the exception it raised."""
        self._release.set()
        self._thread.join()
        return self._result
