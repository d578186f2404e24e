"""Progress lines: rate always, percent only when the size is known, at most once per interval."""

import logging

import pytest

from virtlet.images.progress import ProgressLog


def test_progress_lines(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    p = ProgressLog("pull x", interval=5.0, clock=lambda: now[0])
    p.expect(100 << 20)
    with caplog.at_level(logging.INFO, logger="virtlet.images.pull"):
        p.add(10 << 20)
        now[0] = 5.0
        p.add(40 << 20)
        now[0] = 6.0
        p.add(10 << 20)  # within the interval: no line
    assert [r.getMessage() for r in caplog.records] == ["pull x: 50.0 MiB of 100.0 MiB (50%) at 10.0 MiB/s"]
    q = ProgressLog("pull y", clock=lambda: 2.0)
    q.start = 0.0
    q.add(1 << 20)
    assert q.line() == "pull y: 1.0 MiB at 0.5 MiB/s"
