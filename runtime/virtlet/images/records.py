"""What the image store hands out (records, fs info) and its small file/DB helpers, apart so the store stays
one readable module."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from virtlet import errors


@dataclass(frozen=True)
class ImageRecord:
    digest: str  # "sha256:<hex>" of the file content
    names: tuple[str, ...]  # normalised names (no virtlet.cloud/ prefix, no tag), sorted
    size: int
    path: Path  # image_dir/data/<hex>
    format: str  # "qcow2" | "raw"
    virtual_size: int
    pulled_at: float  # time.time() of the last pull that named it


@dataclass(frozen=True)
class FsInfo:
    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp_ns: int


def db_error(exc: sqlite3.Error, what: str) -> errors.VirtletError:
    if "full" in str(exc):
        return errors.ResourceExhausted(f"{what}: image index is full (no space left in the image directory)")
    return errors.Internal(f"{what}: image index error: {exc}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        import shutil

        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def repo_tags(record: ImageRecord) -> list[str]:
    """As containerd: ``repo:tag`` names are tags.  An HTTP image's name has no tag (the URL is the version): it
    is shown as ``name:latest``, a form clients such as crictl can parse."""
    return [n if _has_tag(n) else f"{n}:latest" for n in record.names if "@" not in n]


def repo_digests(record: ImageRecord) -> list[str]:
    """``repo@sha256:<manifest>`` names; an HTTP image's names with its content digest."""
    return [n for n in record.names if "@" in n] or [f"{n}@{record.digest}" for n in record.names]


def _has_tag(name: str) -> bool:
    return name.rfind(":") > name.rfind("/") >= 0
