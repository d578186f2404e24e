"""Is a downloaded file a disk image a VM may boot from?  Only qcow2 and raw, with nothing outside itself.

A qcow2 with a backing file or an external data file would make QEMU open a path chosen by whoever wrote the
image, i.e. read host files into the VM; both are refused.  The qcow2 header is checked in Python *before*
``qemu-img`` runs, so not even ``qemu-img`` opens such a path; ``qemu-img info`` then confirms and gives the
size.

Raw accepts any bytes, so a raw candidate is refused when it is obviously not a disk: the server called it
``text/html``/``application/xhtml+xml``, it starts with an HTML/XML marker, or its first 4 KiB are UTF-8 text
without a single NUL byte (real disks have zeros in their first sectors: boot code, partition table gaps).
An empty file is refused too.
"""

from __future__ import annotations

import json
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from virtlet import errors

QCOW2_MAGIC = b"QFI\xfb"
SNIFF_BYTES = 4096
QEMU_IMG_TIMEOUT_S = 120
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_MARKUP = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body", b"<!--")
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_EXT_DATA_FILE = 0x44415441


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "qcow2" | "raw"
    virtual_size: int


def inspect(path: Path, content_type: str = "", what: str = "image") -> ImageInfo:
    """Validate ``path``; ``what`` names the image in errors (e.g. "image 'x' from <url>")."""
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    if not head:
        raise errors.InvalidArgument(f"{what} is empty, not a disk image")
    if head.startswith(QCOW2_MAGIC):
        _check_qcow2_header(path, what)
        info = _qemu_img_info(path, "qcow2", what)
    else:
        _check_not_text(head, content_type, what)
        info = _qemu_img_info(path, None, what)
    return _check_info(info, what)


def _check_qcow2_header(path: Path, what: str) -> None:
    with open(path, "rb") as f:
        hdr = f.read(104)
    if len(hdr) < 72:
        raise errors.InvalidArgument(f"{what}: truncated qcow2 header")
    version, backing_offset, backing_size = struct.unpack(">IQI", hdr[4:20])
    if backing_offset or backing_size:
        raise errors.InvalidArgument(
            f"{what} is a qcow2 with a backing file; refused because QEMU would open a host path named by "
            "the image (flatten it with 'qemu-img convert -O qcow2' first)")
    if version >= 3 and len(hdr) >= 104:
        incompatible, = struct.unpack(">Q", hdr[72:80])
        header_length, = struct.unpack(">I", hdr[100:104])
        if incompatible & _QCOW2_INCOMPAT_DATA_FILE or _has_data_file_ext(path, header_length):
            raise errors.InvalidArgument(
                f"{what} is a qcow2 with an external data file; refused because QEMU would open a host path "
                f"named by the image (convert it to a self-contained qcow2 first)")


def _has_data_file_ext(path: Path, header_length: int) -> bool:
    with open(path, "rb") as f:
        f.seek(header_length)
        for _ in range(64):  # header extensions: (type u32, length u32, data padded to 8)
            raw = f.read(8)
            if len(raw) < 8:
                return False
            kind, length = struct.unpack(">II", raw)
            if kind == 0:
                return False
            if kind == _QCOW2_EXT_DATA_FILE:
                return True
            f.seek((length + 7) & ~7, 1)
    return False


def _check_not_text(head: bytes, content_type: str, what: str) -> None:
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in _HTML_TYPES:
        raise errors.InvalidArgument(
            f"{what} was served as {ctype}: a web page, not a disk image (is the URL a download page?)")
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if start.startswith(_MARKUP):
        raise errors.InvalidArgument(f"{what} starts with HTML/XML markup: a web page, not a disk image")
    if b"\0" not in head:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(head) - 4:  # a multi-byte char cut at the end is still text
                return
        raise errors.InvalidArgument(
            f"{what} is text (its first {len(head)} bytes are UTF-8 without a NUL byte), not a disk image; "
            "only qcow2 and raw images are accepted")


def _qemu_img_info(path: Path, fmt: str | None, what: str) -> dict[str, object]:
    cmd = ["qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), str(path)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise errors.FailedPrecondition("qemu-img is not installed on this node (qemu-utils)") from exc
    except subprocess.TimeoutExpired as exc:
        raise errors.InvalidArgument(f"{what}: qemu-img info took over {QEMU_IMG_TIMEOUT_S} s") from exc
    if out.returncode != 0:
        raise errors.InvalidArgument(f"{what} is not a valid disk image: {out.stderr.strip()}")
    return json.loads(out.stdout)


def _check_info(info: dict[str, object], what: str) -> ImageInfo:
    fmt = str(info.get("format", ""))
    if fmt not in ("qcow2", "raw"):
        raise errors.InvalidArgument(f"{what} has format {fmt!r}; only qcow2 and raw images are accepted")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise errors.InvalidArgument(f"{what} is a {fmt} with a backing file; refused")
    specific = info.get("format-specific")
    data = specific.get("data", {}) if isinstance(specific, dict) else {}
    if isinstance(data, dict) and data.get("data-file"):
        raise errors.InvalidArgument(f"{what} is a qcow2 with an external data file; refused")
    return ImageInfo(fmt, int(info.get("virtual-size", 0)))  # type: ignore[call-overload]
