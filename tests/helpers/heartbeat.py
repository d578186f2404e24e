"""A heartbeat for long tests: while one test runs longer than 30 s, a line with its name and elapsed time.

Why: the test command's tiers hold tests that take minutes (molecule about 9, the local node about 3) and
pytest prints nothing until a test ends.  pytest captures fds 1 and 2, so the line goes to the file
descriptor named by VIRTLET_HEARTBEAT_FD (tools/test.sh opens fd 3 on its stdout); without it, nothing.
VIRTLET_HEARTBEAT sets the interval (default 30 s).
"""

from __future__ import annotations

import os
import threading
import time

_current: dict[str, object] = {}


def _beat(nodeid: str, stop: threading.Event, fd: int, interval: float) -> None:
    start = time.monotonic()
    while not stop.wait(interval):
        s = int(time.monotonic() - start)
        line = f"\n   ... still running {nodeid}: {s // 60} min {s % 60:02d} s so far\n"
        try:
            os.write(fd, line.encode())
        except OSError:
            return


def pytest_runtest_logstart(nodeid: str, location: object) -> None:
    raw = os.environ.get("VIRTLET_HEARTBEAT_FD", "")
    if not raw.isdigit():
        return
    stop = threading.Event()
    interval = float(os.environ.get("VIRTLET_HEARTBEAT", "30"))
    t = threading.Thread(target=_beat, args=(nodeid, stop, int(raw), interval), name="heartbeat", daemon=True)
    _current[nodeid] = stop
    t.start()


def pytest_runtest_logfinish(nodeid: str, location: object) -> None:
    stop = _current.pop(nodeid, None)
    if isinstance(stop, threading.Event):
        stop.set()
