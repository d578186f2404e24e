"""Following files that are renamed under us: virtlogd's RAW generations and the kubelet's CRI log rotation.

virtlogd rotates RAW by renaming ``RAW`` -> ``RAW.0`` -> ``RAW.1`` ... and starting a fresh ``RAW``.  The writer
follows files by (device, inode), keeps each generation open until every byte it read from it is written, and
trusts a recorded inode only when the file's first bytes still match (an inode number can be reused).  The
kubelet rotates the CRI log by renaming it; an unrecorded tail of the renamed file is cut on recovery.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from virtlet.console.state import LogState

log = logging.getLogger(__name__)

#: Bytes at the start of a RAW file kept in the state, to tell a reused inode number from the file we read.
HEAD_BYTES = 64


class RawFile:
    """One open RAW generation; the fd keeps it readable after virtlogd renames or deletes it."""

    def __init__(self, fd: int) -> None:
        st = os.fstat(fd)
        self.fd = fd
        self.ident = (st.st_dev, st.st_ino)

    def head(self, n: int) -> bytes:
        return os.pread(self.fd, min(n, HEAD_BYTES), 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class Segment:
    """A run of pending (read but not yet written) bytes and where in RAW it came from."""

    file: RawFile
    start: int
    length: int


def generation(raw_name: str, name: str) -> int | None:
    """N when ``name`` is virtlogd's older generation ``RAW.N`` of ``raw_name``, -1 for ``RAW`` itself, else None."""
    if name == raw_name:
        return -1
    suffix = name[len(raw_name) + 1:] if name.startswith(raw_name + ".") else ""
    return int(suffix) if suffix.isdigit() else None


def raw_chain(raw: Path) -> list[Path]:
    """RAW generations oldest first: ``RAW.N`` ... ``RAW.0``, ``RAW`` (only those that exist)."""
    gens: list[tuple[int, Path]] = []
    try:
        names = os.listdir(raw.parent)
    except FileNotFoundError:
        return []
    for name in names:
        n = generation(raw.name, name)
        if n is not None and n >= 0:
            gens.append((n, raw.parent / name))
    chain = [p for _, p in sorted(gens, reverse=True)]
    if raw.name in names:
        chain.append(raw)
    return chain


def ident(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, or ``None`` when it does not exist."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def open_recorded_raw(raw: Path, state: LogState) -> RawFile | None:
    """The RAW generation ``state`` was reading, opened, if it is still there and still the same file."""
    if state.raw_inode is None:
        return None
    want = (state.raw_dev, state.raw_inode)
    head = bytes.fromhex(state.raw_head)
    for path in raw_chain(raw):
        if ident(path) != want:
            continue
        try:
            f = RawFile(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            continue
        if f.ident == want and os.fstat(f.fd).st_size >= state.raw_offset and f.head(state.raw_offset) == head:
            return f
        f.close()
    log.warning("console log %s: the RAW file at the recorded position is gone (rotated away while "
                "virtletd was down?); continuing with the oldest RAW generation, output may be missing", raw)
    return None


def cut_rotated_cri_tail(cri_log: Path, state: LogState) -> None:
    """The kubelet rotated the CRI log while we were down (or we died inside ``reopen()``): cut the unrecorded
    tail of the old generation if it is still next to it under another name."""
    for entry in os.scandir(cri_log.parent):
        if not entry.name.startswith(cri_log.name) or not entry.is_file(follow_symlinks=False):
            continue
        st = entry.stat(follow_symlinks=False)
        if (st.st_dev, st.st_ino) == (state.cri_dev, state.cri_inode) and st.st_size > state.cri_size:
            os.truncate(entry.path, state.cri_size)
            log.info("cut unrecorded tail of rotated CRI log %s to %d bytes", entry.path, state.cri_size)
