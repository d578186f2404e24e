"""The console writer's exactly-once state file: where it is in RAW and how long the CRI log was.

The writer persists a ``LogState`` after every batch (tmp + fsync + rename, so a crash leaves the old or the
new one) and reads it back on start; see ``virtlet.console.writer`` for how it is used to emit every line once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from virtlet import errors

STATE_VERSION = 1


@dataclass
class LogState:
    """Where the writer is: persisted after every batch, read back on start."""

    raw_dev: int | None = None
    raw_inode: int | None = None
    raw_offset: int = 0
    raw_head: str = ""  # hex of the first min(HEAD_BYTES, raw_offset) bytes of that RAW file
    cri_dev: int | None = None
    cri_inode: int | None = None
    cri_size: int = 0

    @classmethod
    def load(cls, path: Path) -> LogState | None:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise errors.Internal(f"console log state {path} is unreadable ({exc}); remove it to start over "
                                  "(the CRI log may then repeat lines)") from exc
        if doc.get("version") != STATE_VERSION:
            raise errors.Internal(f"console log state {path} has version {doc.get('version')!r}, "
                                  f"this virtletd understands {STATE_VERSION}")
        doc.pop("version")
        try:
            return cls(**doc)
        except TypeError as exc:
            raise errors.Internal(f"console log state {path} has unknown fields ({exc})") from exc

    def save(self, path: Path, fsync: bool = True) -> None:
        """Atomically replace ``path`` (tmp + fsync + rename), so a crash leaves the old or the new state."""
        doc = {"version": STATE_VERSION, **self.__dict__}
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, json.dumps(doc, sort_keys=True).encode())
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def same_position(self, other: LogState) -> bool:
        """Whether both name the same RAW position and CRI log length (the head is derived, not compared)."""
        return (self.raw_dev, self.raw_inode, self.raw_offset, self.cri_dev, self.cri_inode, self.cri_size) == \
            (other.raw_dev, other.raw_inode, other.raw_offset, other.cri_dev, other.cri_inode, other.cri_size)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
