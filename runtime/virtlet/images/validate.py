"""Is a downloaded file a disk image a VM may boot from?  Only qcow2 and raw, with nothing outside itself.

A qcow2 with a backing file or an external data file would make QEMU open a path chosen by whoever wrote the
image, i.e. read host files into the VM; both are refused.  The qcow2 header is checked in Python *before*
``qemu-img`` runs, so not even ``qemu-img`` opens such a path; ``qemu-img info`` then confirms and gives the
size.

Raw accepts any bytes, so a raw candidate is refused when it is obviously not a disk: the server called it
``text/html``/``application/xhtml+xml``, it starts with an HTML/XML marker, or its first 4 KiB are UTF-8 text
without a single NUL byte (real disks have zeros in their first sectors: boot code, partition table gaps).
An empty file is refused too.

``qemu-img`` always gets an explicit format: ``-f qcow2`` after the magic number said qcow2, else ``-f raw``
once the first bytes are neither qcow2 nor another image format (VMDK, VDI, VHD(X), QED, LUKS, ...; those are
refused by name).  Without ``-f``, ``qemu-img`` probes, and a crafted VMDK descriptor makes it open any host path
(a FIFO blocks it until the timeout).  Its error text names host paths and tells whether they exist, so it is
logged for the admin and never returned to the caller, who gets "not a valid qcow2/raw image".
"""

from __future__ import annotations

import json
import logging
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from virtlet import errors

log = logging.getLogger(__name__)

QCOW2_MAGIC = b"QFI\xfb"
SNIFF_BYTES = 4096
QEMU_IMG_TIMEOUT_S = 120
_HTML_TYPES = ("text/html", "application/xhtml+xml")
_MARKUP = (b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body", b"<!--")
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_EXT_DATA_FILE = 0x44415441
_OTHER_FORMATS = (  # (magic at offset 0, format): images qemu-img would open as something other than raw
    (b"KDMV", "vmdk"), (b"COWD", "vmdk"), (b"# Disk DescriptorFile", "vmdk descriptor"),
    (b"<<< ", "vdi"), (b"vhdxfile", "vhdx"), (b"conectix", "vpc/vhd"), (b"QED\0", "qed"),
    (b"LUKS\xba\xbe", "luks"), (b"WithoutFreeSpace", "parallels"), (b"WithouFreSpacExt", "parallels"),
    (b"Bochs Virtual HD Image", "bochs"), (b"#!/bin/sh\n#V2.0 Format", "cloop"),
)
_VDI_SIGNATURE = b"\x7f\x10\xda\xbe"  # at offset 0x40, little-endian 0xbeda107f


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
        _check_not_other_format(head, what)
        _check_not_text(head, content_type, what)
        info = _qemu_img_info(path, "raw", what)
    return _check_info(info, what)


def _check_not_other_format(head: bytes, what: str) -> None:
    for magic, fmt in _OTHER_FORMATS:
        if head.startswith(magic) and (fmt != "vdi" or head[0x40:0x44] == _VDI_SIGNATURE):
            raise errors.InvalidArgument(
                f"{what} is a {fmt} image; only qcow2 and raw images are accepted (convert it with "
                "'qemu-img convert -O qcow2')")


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


def _qemu_img_info(path: Path, fmt: str, what: str) -> dict[str, object]:
    cmd = ["qemu-img", "info", "--output=json", "-f", fmt, str(path)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_IMG_TIMEOUT_S, check=False)
    except FileNotFoundError as exc:
        raise errors.FailedPrecondition("qemu-img is not installed on this node (qemu-utils)") from exc
    except subprocess.TimeoutExpired as exc:
        raise errors.InvalidArgument(f"{what}: qemu-img info took over {QEMU_IMG_TIMEOUT_S} s") from exc
    if out.returncode != 0:
        # The text names paths on this node: for the admin's log only, never for the caller.
        log.warning("%s: qemu-img info -f %s failed: %s", what, fmt, out.stderr.strip()[:2000])
        raise errors.InvalidArgument(f"{what} is not a valid {fmt} image (details in the virtletd log)")
    try:
        info = json.loads(out.stdout)
    except json.JSONDecodeError as exc:
        log.warning("%s: qemu-img info -f %s printed no JSON: %r", what, fmt, out.stdout[:2000])
        raise errors.InvalidArgument(f"{what} is not a valid {fmt} image (details in the virtletd log)") from exc
    if not isinstance(info, dict):
        raise errors.InvalidArgument(f"{what} is not a valid {fmt} image")
    return info


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
    size = info.get("virtual-size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise errors.InvalidArgument(f"{what} has no usable virtual size")
    return ImageInfo(fmt, size)
