"""Small statistics shared by the benches: nearest-rank percentiles of latency samples, the machine's CPU use."""

from __future__ import annotations

import os

from virtlet import procs


def percentile(samples: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of ``samples``."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class MachineCpu:
    """The whole machine's CPU use between ``start()`` and ``stop()``, from ``/proc/stat``: busy CPU-seconds and
    the busy share of all CPUs (a bench names what bounds a MISSED row: CPU or waiting)."""

    def __init__(self) -> None:
        self._t0: tuple[float, float] = (0.0, 0.0)
        self.busy_s = 0.0
        self.share = 0.0

    @staticmethod
    def _sample() -> tuple[float, float]:
        """(busy, total) jiffies of all CPUs, converted to seconds."""
        fields = [int(v) for v in open("/proc/stat").readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # guest time is counted in user already
        hz = os.sysconf("SC_CLK_TCK")
        return (total - idle) / hz, total / hz

    def start(self) -> MachineCpu:
        self._t0 = self._sample()
        return self

    def stop(self) -> MachineCpu:
        busy, total = self._sample()
        self.busy_s = busy - self._t0[0]
        self.share = self.busy_s / max(total - self._t0[1], 1e-9)
        return self


def process_cpu_s(pid: int) -> float:
    """CPU-seconds (user + system) process ``pid`` has used so far, from ``/proc/<pid>/stat``."""
    fields = procs.stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14 and 15)


def allocated_bytes(path: str) -> int:
    """Bytes of disk the files under ``path`` take (allocated blocks, so sparse files count what they use)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total
