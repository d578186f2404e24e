"""The three files of one console log writer in a tmp dir, and what virtlogd and a crash do to them."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from virtlet.console.cri_format import CriLogEntry, parse_cri_log, read_cri_lines
from virtlet.console.writer import ConsoleLogWriter


class Files:
    """The three paths of one writer, in a tmp dir."""

    def __init__(self, root: Path) -> None:
        self.raw = root / "vcl-raw" / "console.raw"
        self.raw.parent.mkdir()
        self.cri = root / "vcl-pods" / "vm" / "0.log"
        self.state = root / "vcl-raw" / "console.state"

    def writer(self, **kw: object) -> ConsoleLogWriter:
        kw.setdefault("partial_delay", 3600.0)
        return ConsoleLogWriter(self.raw, self.cri, self.state, **kw)  # type: ignore[arg-type]

    def append(self, data: bytes, path: Path | None = None) -> None:
        with open(path or self.raw, "ab") as f:
            f.write(data)

    def rotate(self, backups: int = 3) -> None:
        """What virtlogd does at its size limit: RAW.i -> RAW.i+1, RAW -> RAW.0, then a fresh RAW."""
        def gen(i: int) -> Path:
            return self.raw if i < 0 else self.raw.with_name(f"{self.raw.name}.{i}")
        for i in range(backups - 1, -1, -1):
            if gen(i - 1).exists():
                os.rename(gen(i - 1), gen(i))
        self.raw.touch()

    def entries(self) -> list[CriLogEntry]:
        return parse_cri_log(self.cri.read_bytes())

    def lines(self) -> list[str]:
        return read_cri_lines(self.cri)



def crash(w: ConsoleLogWriter) -> None:
    """Drop a writer like a SIGKILL would: close its fds, persist nothing."""
    w._close()


def wait_for(cond: Callable[[], object], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)
