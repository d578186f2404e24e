"""A ``MountPlan`` -> what the VM gets: ``<filesystem>`` devices, the guest's mount instructions (cloud-config
``mounts`` for real cloud-init, the ``virtlet/mounts`` file on the config drive for the tiny guest's per-boot
script) and ``write_files`` entries for single-file mounts.  Pure, except ``read_file_copies`` (reads the
host files at create time).  The format of ``virtlet/mounts`` is documented in ``docs/volumes.md``.

Driver choice (see ``docs/volumes.md``):

- ``share_driver: virtiofs`` (the default): shares use virtiofs, one virtiofsd per share started by libvirt;
  the domain gets a shared memfd memory backing.  When ``virtiofsd`` is not installed, 9p is used.
  libvirt 9.0 refuses ``<readonly/>`` on virtiofs, so a read-only share's source is a read-only bind mount
  of the host path (``virtlet.volumes.binds``): the host refuses writes whatever the guest does.
- ``share_driver: 9p``: every share uses 9p (QEMU serves it as its own user, ``accessmode`` passthrough);
  QEMU enforces ``<readonly/>``.
- Either way the guest also mounts a read-only share ``ro``.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from virtlet import errors
from virtlet.vm import domain_xml as dx
from virtlet.volumes.mounts import FileCopy, MountPlan, Share

SHARE_DRIVERS = ("virtiofs", "9p")
DEFAULT_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: The config drive file the tiny guest's per-boot script reads (``guest-images/tiny/virtlet-mounts``).
MOUNTS_FILE = "virtlet/mounts"
#: 9p mount options: the virtio transport, the Linux dialect, no guest cache (host changes show at once).
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=262144,cache=none"


@dataclass(frozen=True)
class GuestShare:
    """One share as the guest mounts it."""

    tag: str
    fstype: str  # "virtiofs" | "9p" | "ext4" (a scratch disk, ``virtlet.volumes.scratch``: tag is UUID=...)
    guest_path: str
    readonly: bool

    @property
    def cloud_init_source(self) -> str:
        """The source in a cloud-config ``mounts`` entry: the tag, except a scratch disk's ``UUID=<uuid>``, which
        cloud-init's ``mounts`` module would drop (it keeps only names of existing block devices or
        ``host:path`` sources): ``/dev/disk/by-uuid/<uuid>`` (udev's link) instead."""
        if self.tag.startswith("UUID="):
            return "/dev/disk/by-uuid/" + self.tag[len("UUID="):]
        return self.tag

    @property
    def options(self) -> str:
        base = NINEP_OPTIONS if self.fstype == "9p" else "defaults"
        return base + (",ro" if self.readonly else "") + ",nofail"


def pick_driver(configured: str, virtiofsd: str) -> str:
    """The driver read-write shares use: the configured one, 9p when virtiofsd is not there."""
    if configured not in SHARE_DRIVERS:
        raise errors.InvalidArgument(f"share_driver {configured!r} is not one of {SHARE_DRIVERS}")
    if configured == "virtiofs" and not os.access(virtiofsd, os.X_OK):
        return "9p"
    return configured


def guest_shares(plan: MountPlan, driver: str) -> list[GuestShare]:
    return [GuestShare(tag=s.tag, fstype=driver, guest_path=s.guest_path, readonly=s.readonly)
            for s in plan.shares]


def needs_ro_bind(share: Share, driver: str) -> bool:
    """A read-only virtiofs share is served from a read-only bind mount (see the module doc)."""
    return share.readonly and driver == "virtiofs"


def filesystem_devices(plan: MountPlan, driver: str, virtiofsd: str,
                       sources: Mapping[str, str] | None = None) -> list[dx.Filesystem]:
    """The ``<filesystem>`` devices; ``sources`` maps a share's tag to the directory actually shared (its
    read-only bind mount) when that is not the host path."""
    sources = sources or {}
    return [_device(share, driver, virtiofsd, sources.get(share.tag, share.host_path)) for share in plan.shares]


def _device(share: Share, driver: str, virtiofsd: str, source: str) -> dx.Filesystem:
    if driver == "virtiofs":
        return dx.Filesystem(source=source, target=share.tag, driver="virtiofs", accessmode="passthrough",
                             binary=virtiofsd)
    return dx.Filesystem(source=source, target=share.tag, driver="path", accessmode="passthrough",
                         readonly=share.readonly)


def mounts_file(shares: Sequence[GuestShare]) -> bytes:
    """``virtlet/mounts``: one ``share TAG FSTYPE OPTIONS PATH`` line per share (PATH last: it is the rest of the
    line; paths with whitespace are refused earlier)."""
    return "".join(f"share {g.tag} {g.fstype} {g.options} {g.guest_path}\n" for g in shares).encode()


def cloud_config(shares: Sequence[GuestShare], files: Sequence[tuple[FileCopy, bytes]]) -> dict[str, Any]:
    """The cloud-config virtlet adds for the volumes: ``mounts`` (cloud-init writes the fstab lines, makes the
    mount points and mounts them) and ``write_files`` for single-file mounts."""
    data: dict[str, Any] = {}
    if shares:
        data["mounts"] = [[g.cloud_init_source, g.guest_path, g.fstype, g.options, "0", "0"] for g in shares]
    if files:
        data["write_files"] = [{"path": f.guest_path, "encoding": "b64", "owner": "root:root",
                                "permissions": "0444" if f.readonly else "0644",
                                "content": base64.b64encode(content).decode()} for f, content in files]
        if any(f.kind == "hosts" for f, _ in files):
            data["manage_etc_hosts"] = False  # the kubelet's /etc/hosts wins over cloud-init's template
    return data


def read_file_copies(plan: MountPlan) -> list[tuple[FileCopy, bytes]]:
    """The content of each single-file mount, read now (bounded again: the file may have grown)."""
    from virtlet.volumes.mounts import MAX_FILE_BYTES

    out = []
    for f in plan.files:
        try:
            with open(f.host_path, "rb") as fh:
                content = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise errors.InvalidArgument(f"volume mount {f.guest_path!r}: cannot read {f.host_path!r}: "
                                         f"{exc.strerror}") from None
        if len(content) > MAX_FILE_BYTES:
            raise errors.InvalidArgument(f"volume mount {f.guest_path!r}: {f.host_path!r} is larger than "
                                         f"{MAX_FILE_BYTES} bytes")
        out.append((f, content))
    return out
