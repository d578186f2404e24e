"""CRI ``ContainerConfig.mounts`` -> a typed, validated ``MountPlan`` (no side effects: it only looks at paths).

Each CRI mount becomes one of:

- ``Share``: a host directory (emptyDir, hostPath dir, filesystem PVC, the kubelet's ConfigMap/Secret/projected/
  downwardAPI dirs) shared into the guest with virtiofs (or 9p) and mounted at the container path.  The host
  path is shared exactly as the kubelet gives it, so the kubelet's atomic ``..data`` symlink swap inside it is
  seen by the guest.
- ``FileCopy``: a single host file (``/etc/hosts``, ``/dev/termination-log``, subPath files) copied into the
  config drive at create time and written at the container path by the guest (see ``docs/volumes.md``).
- ``ScratchDisk``: an emptyDir named in ``VirtletScratchDisks`` (made by ``shares``).

Bad input raises ``errors.InvalidArgument`` naming the volume (its container path) before anything is made.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from virtlet import errors

#: At most this many directory shares per VM: each is a PCI device (and, for virtiofs, one virtiofsd process),
#: and the i440fx machine has 32 PCI slots, about 10 of them already used by virtlet's own devices.
MAX_SHARES = 16
#: At most this many CRI mounts of any kind (the kubelet passes 3 of its own: hosts, termination log, token).
MAX_MOUNTS = 64
#: Longest container path accepted (Linux PATH_MAX).
MAX_PATH = 4096
#: Largest single file copied into the config drive, and all copied files together: the seed is bounded.
MAX_FILE_BYTES = 256 * 1024
MAX_FILES_BYTES = 512 * 1024
#: Container paths the guest's own system needs: a share there would hide the guest's root or kernel files.
RESERVED_PATHS = ("/", "/proc", "/sys", "/dev", "/run", "/boot")
#: virtiofs tags are at most 36 bytes (the virtio-fs config space); ``vl:`` + 24 hex digits fits both drivers.
#: The ``:`` makes cloud-init's ``mounts`` module pass the tag through unchanged (it treats ``x:y`` as a network
#: source instead of looking for a block device called ``/dev/<tag>``).
TAG_PREFIX = "vl:"
#: The kubelet's directory of a pod's emptyDir volumes: ``pods/<uid>/volumes/kubernetes.io~empty-dir/<name>``.
EMPTYDIR_PLUGIN_DIR = "kubernetes.io~empty-dir"


@dataclass(frozen=True)
class Share:
    host_path: str
    guest_path: str
    readonly: bool
    tag: str


@dataclass(frozen=True)
class FileCopy:
    host_path: str
    guest_path: str
    readonly: bool
    kind: str  # "hosts" | "termination-log" | "file"


@dataclass(frozen=True)
class ScratchDisk:
    host_path: str  # the emptyDir directory (the disk file is created in it)
    guest_path: str
    name: str  # the emptyDir volume's name, as listed in the annotation
    size: int  # bytes


@dataclass
class MountPlan:
    shares: list[Share] = field(default_factory=list)
    files: list[FileCopy] = field(default_factory=list)
    scratch: list[ScratchDisk] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.shares or self.files or self.scratch)


@dataclass(frozen=True)
class CriMount:
    """The fields of a CRI ``Mount`` virtlet reads (free of protobuf types)."""

    container_path: str
    host_path: str
    readonly: bool = False


def share_tag(guest_path: str) -> str:
    """The stable, unique tag of the share mounted at ``guest_path`` (a hash: never the basename)."""
    return TAG_PREFIX + hashlib.sha256(guest_path.encode("utf-8", "surrogateescape")).hexdigest()[:24]


def check_guest_path(path: str) -> str:
    """A normalised container path, or InvalidArgument: absolute, no ``..``, no whitespace or control chars
    (fstab and the tiny guest's mount list are whitespace-separated), not a reserved system path."""
    what = f"volume mount {path[:200]!r}"
    if not path or len(path) > MAX_PATH:
        raise errors.InvalidArgument(f"{what}: container_path must be 1..{MAX_PATH} characters")
    if not path.startswith("/"):
        raise errors.InvalidArgument(f"{what}: container_path must be absolute (start with '/')")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 or ch == "\\" for ch in path):
        raise errors.InvalidArgument(f"{what}: container_path must not contain whitespace, control characters "
                                     "or backslashes (the guest mounts it through fstab)")
    parts = PurePosixPath(path).parts
    if ".." in parts:
        raise errors.InvalidArgument(f"{what}: container_path must not contain '..'")
    norm = str(PurePosixPath(*parts))
    return norm


def _check_host_path(m: CriMount, guest: str) -> os.stat_result:
    what = f"volume mount {guest!r}"
    if not m.host_path.startswith("/") or "\0" in m.host_path or len(m.host_path) > MAX_PATH:
        raise errors.InvalidArgument(f"{what}: host_path {m.host_path[:200]!r} must be an absolute path")
    try:
        return os.stat(m.host_path)  # follows symlinks, like a bind mount does
    except FileNotFoundError:
        raise errors.InvalidArgument(f"{what}: host_path {m.host_path!r} does not exist") from None
    except OSError as exc:
        raise errors.InvalidArgument(f"{what}: host_path {m.host_path!r}: {exc.strerror}") from None


def _file_kind(guest: str, host: str) -> str:
    """``hosts`` for the kubelet's /etc/hosts; ``termination-log`` for the file the kubelet makes in
    ``pods/<uid>/containers/<name>/`` (whatever ``terminationMessagePath`` is); ``file`` for the rest."""
    if guest == "/etc/hosts":
        return "hosts"
    if Path(host).parent.parent.name == "containers":
        return "termination-log"
    return "file"


def emptydir_name(host_path: str) -> str | None:
    """The volume name of a kubelet emptyDir directory (``.../volumes/kubernetes.io~empty-dir/<name>``)."""
    p = Path(host_path)
    return p.name if p.parent.name == EMPTYDIR_PLUGIN_DIR else None


def plan_mounts(mounts: list[CriMount], scratch: Mapping[str, int] | None = None) -> MountPlan:
    """Validate ``mounts`` and sort them into shares, file copies and scratch disks.

    ``scratch`` maps emptyDir volume names (``VirtletScratchDisks``) to disk sizes in bytes; CRI mounts carry no
    volume name, so an emptyDir is recognised by the kubelet's directory layout (``emptydir_name``).
    """
    if len(mounts) > MAX_MOUNTS:
        raise errors.InvalidArgument(f"container config: {len(mounts)} mounts, more than the {MAX_MOUNTS} allowed")
    scratch = scratch or {}
    plan = MountPlan()
    seen: dict[str, str] = {}
    copied = 0
    for m in mounts:
        guest = check_guest_path(m.container_path)
        if guest in seen:
            raise errors.InvalidArgument(
                f"volume mount {guest!r}: two mounts on one container path (host paths {seen[guest]!r} and "
                f"{m.host_path!r})")
        seen[guest] = m.host_path
        st_ = _check_host_path(m, guest)
        if stat.S_ISDIR(st_.st_mode):
            if guest in RESERVED_PATHS:
                raise errors.InvalidArgument(
                    f"volume mount {guest!r}: the guest needs this path itself; mount the volume elsewhere")
            name = emptydir_name(m.host_path)
            if name is not None and name in scratch:
                plan.scratch.append(ScratchDisk(host_path=m.host_path, guest_path=guest, name=name,
                                                size=scratch[name]))
            else:
                plan.shares.append(Share(host_path=m.host_path, guest_path=guest, readonly=m.readonly,
                                         tag=share_tag(guest)))
        elif stat.S_ISREG(st_.st_mode):
            if st_.st_size > MAX_FILE_BYTES:
                raise errors.InvalidArgument(
                    f"volume mount {guest!r}: the file {m.host_path!r} is {st_.st_size} bytes; single files are "
                    f"copied into the VM's config drive and may be at most {MAX_FILE_BYTES} bytes (mount its "
                    "directory instead)")
            copied += st_.st_size
            plan.files.append(FileCopy(host_path=m.host_path, guest_path=guest, readonly=m.readonly,
                                       kind=_file_kind(guest, m.host_path)))
        else:
            raise errors.InvalidArgument(
                f"volume mount {guest!r}: host_path {m.host_path!r} is neither a directory nor a regular file "
                "(block volumes are CRI devices, not mounts)")
    if len(plan.shares) > MAX_SHARES:
        raise errors.InvalidArgument(
            f"container config: {len(plan.shares)} directory volumes, more than the {MAX_SHARES} a VM may share")
    if copied > MAX_FILES_BYTES:
        raise errors.InvalidArgument(
            f"container config: the single-file mounts add up to {copied} bytes, more than the {MAX_FILES_BYTES} "
            "bytes copied into a VM's config drive")
    tags = [s.tag for s in plan.shares]
    if len(set(tags)) != len(tags):  # a 96-bit hash collision: never expected, but never a silent mix-up
        raise errors.InvalidArgument("container config: two volume mounts hash to the same share tag")
    missing = sorted(set(scratch) - {s.name for s in plan.scratch})
    if missing:
        name = missing[0]
        raise errors.InvalidArgument(
            f"annotation VirtletScratchDisks: volume {name!r} is not an emptyDir directory mounted in the container")
    return plan
