"""Pull progress in the log every few seconds: the kubelet shows nothing while a big image downloads."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("virtlet.images.pull")


class ProgressLog:
    """Counts bytes; logs bytes, rate and (when the size is known) percent at most every ``interval`` s."""

    def __init__(self, label: str, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.interval = interval
        self.clock = clock
        self.total: int | None = None
        self.done = 0
        self.start = clock()
        self._next = self.start + interval

    def expect(self, total: int | None) -> None:
        self.total = total

    def add(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if now >= self._next:
            self._next = now + self.interval
            log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((self.clock() if now is None else now) - self.start, 1e-6)
        rate = self.done / elapsed
        text = f"{self.label}: {_mib(self.done)}"
        if self.total:
            text += f" of {_mib(self.total)} ({100.0 * self.done / self.total:.0f}%)"
        return f"{text} at {_mib(rate)}/s"

    def finish(self) -> None:
        log.info("%s, done", self.line())


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"
