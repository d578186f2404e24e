"""Writing a seed as an ISO 9660 image with Joliet and Rock Ridge, in Python (pycdlib; no genisoimage).

cloud-init finds the seed by its volume label (``cidata`` / ``config-2``) and reads long, lower-case names
through Rock Ridge or Joliet; the plain ISO 9660 names are only the mandatory 8.3 fallback.  The image is
written to a temporary file next to ``dest`` and renamed into place, so a crash never leaves half an ISO.

The seed holds the pod's user-data and environment, which may be secrets: the file is created mode 0600 (never
through a world-readable moment).  libvirt's dynamic ownership hands it to the QEMU user while the VM runs.
Its size is bounded (``MAX_ISO_BYTES``) before it is renamed into place.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path, PurePosixPath

import pycdlib

from virtlet import errors
from virtlet.cloudinit.model import SeedFiles

_ISO_CHARS = re.compile(r"[^A-Z0-9_]")

#: Mode of the written ISO: owner (root, or QEMU's user while the VM runs) only.
ISO_MODE = 0o600
#: Largest ISO written: the rendered seed's own bound (1 MiB) plus room for ISO 9660/Joliet/Rock Ridge tables.
MAX_ISO_BYTES = 2 * 1024 * 1024


def write_iso(files: SeedFiles, dest: Path) -> None:
    """Write ``files`` as an ISO at ``dest`` (replaced if present); the volume id is the seed's label."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=files.volume_label, sys_ident="LINUX", joliet=3, rock_ridge="1.09")
    try:
        made: set[PurePosixPath] = set()
        for rel in sorted(files.files):
            path = PurePosixPath(rel)
            if path.is_absolute() or ".." in path.parts or not path.parts:
                raise errors.Internal(f"seed file name {rel!r} must be a relative path inside the seed")
            for depth in range(1, len(path.parts)):
                parent = PurePosixPath(*path.parts[:depth])
                if parent not in made:
                    iso.add_directory(
                        _iso_path(parent),
                        rr_name=parent.name,
                        joliet_path="/" + str(parent),
                        file_mode=0o40555,
                    )
                    made.add(parent)
            data = files.files[rel]
            iso.add_fp(
                io.BytesIO(data),
                len(data),
                _iso_path(path) + ";1",
                rr_name=path.name,
                joliet_path="/" + str(path),
                file_mode=0o100444,
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)  # a leftover of a crashed writer with this pid: O_EXCL below needs it gone
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, ISO_MODE)
            with os.fdopen(fd, "wb") as out:
                iso.write_fp(out)
                size = out.tell()
            if size > MAX_ISO_BYTES:
                raise errors.InvalidArgument(
                    f"the cloud-init seed ISO would be {size} bytes, more than the {MAX_ISO_BYTES} bytes allowed; "
                    "make VirtletCloudInitUserData, VirtletCloudInitMetaData or the container's environment smaller")
            os.chmod(tmp, ISO_MODE)  # whatever the umask
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    finally:
        iso.close()


def _iso_path(path: PurePosixPath) -> str:
    """The ISO 9660 level-3 name of each component: upper case, ``[A-Z0-9_]`` only, ``.`` kept for files."""
    parts = []
    for i, part in enumerate(path.parts):
        is_file = i == len(path.parts) - 1 and path.suffix
        if is_file:
            stem, _, ext = part.rpartition(".")
            parts.append(_ISO_CHARS.sub("_", stem.upper())[:30] + "." + _ISO_CHARS.sub("_", ext.upper())[:3])
        else:
            parts.append(_ISO_CHARS.sub("_", part.upper())[:31] or "_")
    return "/" + "/".join(parts)
