"""The benches' small statistics: percentiles, a process's CPU time, the disk files take."""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.stats import allocated_bytes, percentile, process_cpu_s


def test_percentile_is_nearest_rank() -> None:
    samples = [float(v) for v in range(1, 101)]
    assert percentile(samples, 0.5) == 51.0
    assert percentile(samples, 0.99) == 99.0
    assert percentile([3.0], 0.99) == 3.0


def test_process_cpu_grows_with_work_of_this_process() -> None:
    before = process_cpu_s(os.getpid())
    end = time.process_time() + 0.05
    while time.process_time() < end:
        pass
    assert process_cpu_s(os.getpid()) >= before + 0.03  # clock ticks: 10 ms granularity


def test_allocated_bytes_counts_blocks_not_apparent_size(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data").write_bytes(b"x" * 65536)
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(1 << 30)  # 1 GiB apparent, nothing written
    got = allocated_bytes(str(tmp_path))
    assert 65536 <= got < 1 << 20
    assert allocated_bytes(str(tmp_path / "missing")) == 0
