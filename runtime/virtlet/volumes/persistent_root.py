"""The persistent root disk: a block device (CRI device with devicePath ``/``) that is the VM's root disk.

Layout of the device (docs/volumes.md, "Persistent root disk"):

- from byte 0: the image, written raw by ``qemu-img convert`` (the guest's own partition table stays at the
  start, where firmware and guests look for it);
- the last ``RESERVED_BYTES`` (1 MiB) are virtlet's: the header lives in the last ``HEADER_BYTES`` (4 KiB)
  of the device.  An image must fit in ``size - RESERVED_BYTES``; the guest may use the space between the
  image's end and the reserved region (e.g. by growing its last partition) but must leave the last MiB alone.

Header (4096 bytes at ``size - 4096``): ``MAGIC`` (16 bytes), a 4-byte big-endian length N, N bytes of UTF-8
JSON ``{"version": 1, "digest": "sha256:...", "image_size": <bytes>, "instance_id": "<uuid>"}``, the 32-byte
SHA-256 of those N bytes, then zeros.  A header whose checksum does not match counts as absent.

The header is written LAST, after the copy is flushed to the device: a crash (or SIGKILL of virtletd) during
the copy leaves no header, so the next CreateContainer copies again.  Re-imaging clears the header before it
starts copying, for the same reason.

``instance_id`` is made once, when an image is written, and is cloud-init's instance id for every pod that
boots the device: first-boot modules run once per device and image, not once per pod.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from virtlet import errors, failpoints

MAGIC = b"VIRTLET-ROOTDSK1"
HEADER_BYTES = 4096
RESERVED_BYTES = 1024 * 1024
VERSION = 1
#: Annotation (pod or container) that allows writing a different image over a persistent root.
REIMAGE_ANNOTATION = "VirtletReimageRoot"
#: Bound of one image copy (qemu-img convert); generous: a large image on a slow disk.
COPY_TIMEOUT_S = 3600
QEMU_IMG_INFO_TIMEOUT_S = 60

_device_locks: dict[str, threading.Lock] = {}
_device_locks_guard = threading.Lock()


@dataclass(frozen=True)
class RootHeader:
    digest: str
    image_size: int
    instance_id: str

    def encode(self) -> bytes:
        body = json.dumps({"version": VERSION, "digest": self.digest, "image_size": self.image_size,
                           "instance_id": self.instance_id}, sort_keys=True).encode()
        block = MAGIC + struct.pack(">I", len(body)) + body + hashlib.sha256(body).digest()
        if len(block) > HEADER_BYTES:
            raise errors.InvalidArgument(f"persistent root header would be {len(block)} bytes (image digest too "
                                         "long)")
        return block.ljust(HEADER_BYTES, b"\0")

    @classmethod
    def decode(cls, block: bytes) -> RootHeader | None:
        """The header in a ``HEADER_BYTES`` block, None when there is none (or it is torn / not ours)."""
        if len(block) < HEADER_BYTES or not block.startswith(MAGIC):
            return None
        (length,) = struct.unpack(">I", block[16:20])
        if length > HEADER_BYTES - 20 - 32:
            return None
        body = block[20:20 + length]
        if hashlib.sha256(body).digest() != block[20 + length:52 + length]:
            return None
        try:
            data = json.loads(body)
            if data.get("version") != VERSION:
                return None
            return cls(digest=str(data["digest"]), image_size=int(data["image_size"]),
                       instance_id=str(data["instance_id"]))
        except (ValueError, KeyError, TypeError):
            return None


def device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def read_header(path: str) -> RootHeader | None:
    size = device_size(path)
    if size < RESERVED_BYTES:
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return RootHeader.decode(os.pread(fd, HEADER_BYTES, size - HEADER_BYTES))
    finally:
        os.close(fd)


def write_header(path: str, header: RootHeader | None) -> None:
    """Write ``header`` (None: zeros, i.e. clear it) at the end of the device and flush it to the device."""
    block = header.encode() if header is not None else b"\0" * HEADER_BYTES
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if os.pwrite(fd, block, size - HEADER_BYTES) != HEADER_BYTES:
            raise errors.Internal(f"persistent root {path}: short write of the header")
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def device_lock(path: str) -> Iterator[None]:
    """One writer per device in this virtletd (two CreateContainers naming the same device)."""
    key = os.path.realpath(path)
    with _device_locks_guard:
        lock = _device_locks.setdefault(key, threading.Lock())
    with lock:
        yield


def _qemu_img(args: list[str], timeout: int, what: str) -> str:
    try:
        out = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=timeout, check=False,
                             stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise errors.FailedPrecondition("qemu-img is not installed on this node (package qemu-utils)") from exc
    except subprocess.TimeoutExpired as exc:
        raise errors.Internal(f"{what}: qemu-img did not finish in {timeout} s") from exc
    if out.returncode != 0:
        raise errors.Internal(f"{what}: qemu-img {args[0]} failed: {out.stderr.strip()}")
    return out.stdout


def _check_not_claimed(device: str, what: str) -> None:
    """Refuse a device the host itself uses: an exclusive open (``O_EXCL`` on a block device) fails with EBUSY
    while it is mounted, a swap area, or part of a RAID/LVM/dm device, so a mistaken host path (``/dev/sda``)
    is never overwritten.  (A VM using the device opens it without O_EXCL; that case is checked by the
    caller against virtlet's own containers.)"""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise errors.FailedPrecondition(
                f"{what}: {device} is in use on the host (mounted, swap, or part of another block device); "
                "a persistent root must be a device nothing on the node uses") from None
        raise errors.InvalidArgument(f"{what}: {device} cannot be opened: {exc.strerror}") from None
    os.close(fd)


def image_virtual_size(image: Path, fmt: str) -> int:
    info = json.loads(_qemu_img(["info", "--output=json", "-U", "-f", fmt, str(image)], QEMU_IMG_INFO_TIMEOUT_S,
                                f"reading {image}"))
    return int(info["virtual-size"])


def prepare_root(device: str, image: Path, image_format: str, digest: str, reimage: bool,
                 what: str = "persistent root") -> RootHeader:
    """Make ``device`` hold ``image`` (identified by ``digest``) and return its header.

    - header with this digest: nothing is written (later pods boot what the earlier ones left);
    - header with another digest: FAILED_PRECONDITION, unless ``reimage``;
    - no header (new device, or a copy that never finished): the image is copied, then the header written.
    """
    with device_lock(device):
        _check_not_claimed(device, what)
        current = read_header(device)
        if current is not None and current.digest == digest:
            return current
        if current is not None and not reimage:
            raise errors.FailedPrecondition(
                f"{what}: {device} holds image {current.digest}, not {digest}; use the same image, or set the "
                f"annotation {REIMAGE_ANNOTATION}: \"true\" to overwrite the disk with the new image")
        size = device_size(device)
        needed = image_virtual_size(image, image_format)
        if size - RESERVED_BYTES < needed:
            raise errors.InvalidArgument(
                f"{what}: {device} has {size} bytes, the image needs {needed} bytes plus {RESERVED_BYTES} "
                "reserved for virtlet's header; use a larger volume")
        if current is not None:
            write_header(device, None)  # re-image: a crash from here on makes the next attempt copy again
        # -n: the device exists (never "create" it); -f always (a raw image must never be probed)
        _qemu_img(["convert", "-n", "-f", image_format, "-O", "raw", "-t", "none", str(image), device],
                  COPY_TIMEOUT_S, f"{what}: writing the image to {device}")
        failpoints.hit("volumes.root_before_header")
        header = RootHeader(digest=digest, image_size=needed, instance_id=str(uuid.uuid4()))
        write_header(device, header)
        return header
