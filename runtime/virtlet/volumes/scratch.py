"""Scratch disks: emptyDir volumes named in ``VirtletScratchDisks`` become local ext4 disks instead of shares.

``VirtletScratchDisks: "data,cache=10Gi"`` names emptyDir volumes by their volume name (the kubelet's emptyDir
directory is ``pods/<uid>/volumes/kubernetes.io~empty-dir/<name>``), each with an optional size (a Kubernetes
quantity, default ``DEFAULT_SIZE``, at most the node's ``max_root_volume_size``).  For each one virtletd:

- creates ``virtlet-scratch.img`` inside the emptyDir directory, a sparse raw file of that size, and formats it
  ext4 on the host (``mke2fs``, with a UUID derived from the emptyDir's host path), so the kubelet's emptyDir
  clean-up removes it with the pod and a restarted container finds its data again (an emptyDir outlives
  container restarts, not the pod);
- attaches it as a raw virtio (or SCSI) disk after the block volumes, before the config drive, with the serial
  ``scr-`` + 16 hex digits of the SHA-256 of the container path;
- mounts it in the guest at the container path by its UUID: a cloud-config ``mounts`` entry (``/dev/disk/by-uuid/``)
  for real cloud-init, a ``share UUID=<uuid> ext4 ...`` line in ``virtlet/mounts`` for the tiny guest.

Bad input (a malformed annotation, an unknown name, a size over the bound, a disk file that is not a regular
file) is ``errors.InvalidArgument`` naming the volume, raised before anything is made.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

from virtlet import errors, quantity
from virtlet.volumes.mounts import ScratchDisk
from virtlet.volumes.shares import GuestShare

ANNOTATION = "VirtletScratchDisks"
#: Size of a scratch disk whose entry gives none.
DEFAULT_SIZE = 1 << 30
#: Smallest size accepted: ext4 needs room for its journal and metadata.
MIN_SIZE = 16 << 20
#: The disk file's name inside the emptyDir directory.
DISK_FILE = "virtlet-scratch.img"
SERIAL_PREFIX = "scr-"
#: Longest annotation value read (64 entries of a 63-character name and a quantity fit).
MAX_VALUE = 8192
#: Kubernetes volume names are DNS-1123 labels.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)
MKFS_TIMEOUT = 120.0
#: ext4 without the features a minimal or older guest cannot mount: metadata checksums need the kernel's crc32c
#: (not in every initramfs: the tiny image lacks it) and ``orphan_file`` needs Linux 5.15.
MKFS_FEATURES = "^metadata_csum,^metadata_csum_seed,^orphan_file"


@dataclass(frozen=True)
class ScratchFile:
    """A scratch disk ready for the domain: its file, serial and filesystem UUID."""

    path: str
    serial: str
    fs_uuid: str
    guest_path: str


def parse_annotation(value: str | None, maximum: int) -> dict[str, int]:
    """``name[=size]`` entries separated by commas -> {volume name: bytes}."""
    if value is None or not value.strip():
        return {}
    what = f"annotation {ANNOTATION}"
    if len(value) > MAX_VALUE:
        raise errors.InvalidArgument(f"{what}: value is {len(value)} characters, at most {MAX_VALUE}")
    out: dict[str, int] = {}
    for entry in value.split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, _, size_text = entry.partition("=")
        name = name.strip()
        if not _NAME.fullmatch(name):
            raise errors.InvalidArgument(f"{what}: {name[:80]!r} is not an emptyDir volume name (a DNS-1123 "
                                         "label); expected entries like data or data=10Gi separated by commas")
        if name in out:
            raise errors.InvalidArgument(f"{what}: volume {name!r} is listed twice")
        size = DEFAULT_SIZE
        if size_text.strip():
            try:
                size = quantity.parse_bytes(size_text.strip(), maximum)
            except ValueError as exc:
                raise errors.InvalidArgument(
                    f"{what}: volume {name!r}: {exc}; expected a size such as 10Gi, at most "
                    f"{quantity.format_bytes(maximum)} on this node (its max_root_volume_size)") from None
        if size < MIN_SIZE:
            raise errors.InvalidArgument(f"{what}: volume {name!r}: {size} bytes is smaller than the "
                                         f"{quantity.format_bytes(MIN_SIZE)} a scratch disk needs")
        out[name] = size
    return out


def serial_for(guest_path: str) -> str:
    """``scr-`` + 16 hex digits of the SHA-256 of the container path (20 characters: virtio-blk's limit)."""
    return SERIAL_PREFIX + hashlib.sha256(guest_path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def fs_uuid_for(host_path: str) -> str:
    """The ext4 UUID of the disk in the emptyDir at ``host_path``: stable for the emptyDir's whole life."""
    digest = hashlib.sha256(b"virtlet-scratch\0" + host_path.encode("utf-8", "surrogateescape")).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def guest_entries(disks: list[ScratchDisk]) -> list[GuestShare]:
    """The guest's mount instructions: the same lines as shares, with ``UUID=<uuid>`` as the source."""
    return [GuestShare(tag=f"UUID={fs_uuid_for(d.host_path)}", fstype="ext4", guest_path=d.guest_path,
                       readonly=False) for d in disks]


def check_existing(disk: ScratchDisk) -> None:
    """A disk file already in the emptyDir (a restarted container) must be a regular file, not a link."""
    path = os.path.join(disk.host_path, DISK_FILE)
    try:
        st_ = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st_.st_mode):
        raise errors.InvalidArgument(f"annotation {ANNOTATION}: volume {disk.name!r}: {path!r} exists and is not "
                                     "a regular file; remove it or use another emptyDir")


def prepare(disk: ScratchDisk) -> ScratchFile:
    """Create and format the disk file (or keep the one a previous container of the pod made).

    The file is made and formatted as ``DISK_FILE.tmp`` and renamed into place when done, so a virtletd that
    dies meanwhile never leaves an unformatted ``DISK_FILE`` that a later container would keep."""
    path = os.path.join(disk.host_path, DISK_FILE)
    made = ScratchFile(path=path, serial=serial_for(disk.guest_path), fs_uuid=fs_uuid_for(disk.host_path),
                       guest_path=disk.guest_path)
    what = f"annotation {ANNOTATION}: volume {disk.name!r}"
    if os.path.lexists(path):
        check_existing(disk)
        return made
    tmp = path + ".tmp"
    try:
        os.unlink(tmp)  # a leftover of an interrupted create (unlink never follows a link)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise errors.InvalidArgument(f"{what}: cannot remove {tmp!r}: {exc.strerror}") from None
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise errors.InvalidArgument(f"{what}: cannot create {tmp!r}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, disk.size)  # sparse: the node's disk is used as the guest writes
        # mke2fs writes through our descriptor (/dev/fd/N): a path swapped meanwhile is never followed
        proc = subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-U", made.fs_uuid, "-m", "0", "-O", MKFS_FEATURES,
             "-E", "nodiscard,lazy_itable_init=1", f"/dev/fd/{fd}"],
            pass_fds=(fd,), capture_output=True, text=True, timeout=MKFS_TIMEOUT)
        if proc.returncode != 0:
            raise errors.Internal(f"{what}: mke2fs failed: {proc.stderr.strip()[:300]}")
        os.fsync(fd)
        os.rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return made
