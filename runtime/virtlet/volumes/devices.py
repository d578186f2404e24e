"""CRI ``devices`` of a VM container -> block volumes: raw virtio (or virtio-scsi) disks with a stable serial.

The kubelet passes a PVC with ``volumeMode: Block`` as a device: ``host_path`` is the block device on the node,
``container_path`` the pod's ``devicePath``, ``permissions`` a cgroup-style ``rwm`` string.  For a VM:

- every device becomes a ``<disk type='block'>`` after the root disk (``vdb``, ``vdc``, ... or ``sdb``, ... with
  ``VirtletDiskDriver: scsi``), raw, ``cache='none' io='native'``, read-only when ``permissions`` lacks ``w``;
- its serial is ``vol-`` + 16 hex digits of the SHA-256 of the devicePath (20 characters, virtio-blk's limit):
  stable across pods and restarts, so the guest finds it as ``/dev/disk/by-id/virtio-<serial>`` and links it to
  the devicePath (see ``guest_map``);
- the device whose devicePath is ``/`` is the persistent root disk (``virtlet.volumes.persistent_root``).

Validation happens before anything is made: a missing host path, a path that is not a block device, two
devices on one devicePath, a devicePath that is not absolute, and more than ``MAX_BLOCK_VOLUMES`` devices are
INVALID_ARGUMENT naming the device.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from virtlet import errors

#: devicePath of the persistent root disk.
ROOT_PATH = "/"
#: Block volumes per VM (the root disk and the config drive not counted).  Each virtio-blk disk is one PCI
#: device on the i440fx machine's single PCI bus (32 slots, about 8 taken by the machine and virtlet's own
#: devices); the virtio-scsi variant has the same bound so a pod does not change meaning with the disk driver.
MAX_BLOCK_VOLUMES = 16
#: Longest devicePath accepted (Linux PATH_MAX).
MAX_DEVICE_PATH = 4096
SERIAL_PREFIX = "vol-"
#: The config-drive file mapping serials to devicePaths (read by the tiny guest's boot script).
GUEST_MAP_FILE = "virtlet/block-devices"


@dataclass(frozen=True)
class DeviceRequest:
    """One CRI ``Device``, free of protobuf types."""

    host_path: str
    container_path: str
    permissions: str = "rwm"


@dataclass(frozen=True)
class BlockVolume:
    """A validated block device for the VM."""

    host_path: str
    guest_path: str
    readonly: bool
    serial: str


@dataclass(frozen=True)
class DevicePlan:
    """What a container's devices become: the persistent root (or None) and the data volumes, in CRI order."""

    root: BlockVolume | None
    volumes: tuple[BlockVolume, ...]


def serial_for(guest_path: str) -> str:
    """The disk serial of the device at ``guest_path``: ``vol-`` + 16 hex digits (20 characters)."""
    return SERIAL_PREFIX + hashlib.sha256(guest_path.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _describe(dev: DeviceRequest) -> str:
    return f"device {dev.host_path!r} -> {dev.container_path!r}"


def check_block_device(path: str, what: str) -> None:
    """``path`` exists and is a block device (following symlinks, as the kubelet's device paths are)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise errors.InvalidArgument(f"{what}: host path {path!r} does not exist") from None
    except OSError as exc:
        raise errors.InvalidArgument(f"{what}: host path {path!r} cannot be read: {exc.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise errors.InvalidArgument(f"{what}: host path {path!r} is not a block device; only block volumes "
                                     "(volumeMode: Block) can be passed to a VM as devices")


def plan_devices(devices: Iterable[DeviceRequest]) -> DevicePlan:
    """Validate the container's devices and turn them into a ``DevicePlan`` (no side effects)."""
    devices = list(devices)
    if len(devices) > MAX_BLOCK_VOLUMES + 1:  # bounded before any per-device work
        raise errors.InvalidArgument(f"the container has {len(devices)} devices; a VM takes at most "
                                     f"{MAX_BLOCK_VOLUMES} block volumes besides its persistent root")
    seen: dict[str, DeviceRequest] = {}
    for dev in devices:
        what = _describe(dev)
        path = dev.container_path
        if not path.startswith("/") or len(path) > MAX_DEVICE_PATH or "\x00" in path or "\n" in path:
            raise errors.InvalidArgument(f"{what}: container_path (devicePath) must be an absolute path without "
                                         f"newlines, at most {MAX_DEVICE_PATH} bytes")
        if not dev.host_path.startswith("/") or "\x00" in dev.host_path or len(dev.host_path) > MAX_DEVICE_PATH:
            raise errors.InvalidArgument(f"{what}: host_path must be an absolute path")
        norm = os.path.normpath(path) if path != "/" else "/"
        if norm in seen:
            raise errors.InvalidArgument(f"{what}: devicePath {norm!r} is used by two devices "
                                         f"({seen[norm].host_path!r} and {dev.host_path!r})")
        seen[norm] = dev
    data = [d for d in devices if os.path.normpath(d.container_path) != ROOT_PATH]
    if len(data) > MAX_BLOCK_VOLUMES:
        raise errors.InvalidArgument(f"the container has {len(data)} block devices; a VM takes at most "
                                     f"{MAX_BLOCK_VOLUMES} besides its persistent root")
    hosts: dict[str, DeviceRequest] = {}
    for dev in devices:
        check_block_device(dev.host_path, _describe(dev))
        real = os.path.realpath(dev.host_path)
        if real in hosts:  # one device as two disks: two writers the guest cannot coordinate
            raise errors.InvalidArgument(f"{_describe(dev)}: host device {real!r} is also passed as "
                                         f"{hosts[real].container_path!r}")
        hosts[real] = dev
    root = next((d for d in devices if os.path.normpath(d.container_path) == ROOT_PATH), None)
    if root is not None and "w" not in root.permissions:
        raise errors.InvalidArgument(f"{_describe(root)}: a persistent root disk must be writable "
                                     "(permissions without 'w')")
    return DevicePlan(
        root=_volume(root) if root is not None else None,
        volumes=tuple(_volume(d) for d in data))


def _volume(dev: DeviceRequest) -> BlockVolume:
    guest = os.path.normpath(dev.container_path) if dev.container_path != "/" else "/"
    return BlockVolume(host_path=dev.host_path, guest_path=guest, readonly="w" not in dev.permissions,
                       serial=serial_for(guest))


def guest_map(volumes: Sequence[BlockVolume]) -> bytes:
    """The config drive's ``virtlet/block-devices`` file: one ``<serial> <devicePath>`` line per volume.

    Read by the guest's boot script, which links the disk with that serial to the devicePath (docs/volumes.md).
    """
    return "".join(f"{v.serial} {v.guest_path}\n" for v in volumes).encode()


def link_script(volumes: Sequence[BlockVolume]) -> str:
    """A POSIX shell snippet (cloud-init ``bootcmd``, every boot) that links each volume's disk, found by its
    serial in ``/dev/disk/by-id`` (``virtio-<serial>``, or ``scsi-..._<serial>``), to its devicePath; it waits
    up to ~10 s for udev to make the links."""
    lines = []
    for v in volumes:
        q = "'" + v.guest_path.replace("'", "'\\''") + "'"
        lines.append(f"d=; for i in $(seq 1 50); do for f in /dev/disk/by-id/*; do case $f in "
                     f"*/virtio-{v.serial} | *_{v.serial}) d=$(readlink -f \"$f\") ;; esac; done; "
                     f"[ -b \"$d\" ] && break; sleep 0.2; done; "
                     f"[ -b \"$d\" ] && mkdir -p \"$(dirname {q})\" && ln -sfn \"$d\" {q}")
    return "\n".join(lines)
