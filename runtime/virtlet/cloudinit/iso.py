"""Writing a seed as an ISO 9660 image with Joliet and Rock Ridge, in Python (pycdlib; no genisoimage).

cloud-init finds the seed by its volume label (``cidata`` / ``config-2``) and reads long, lower-case names
through Rock Ridge or Joliet; the plain ISO 9660 names are only the mandatory 8.3 fallback.  The image is
written to a temporary file next to ``dest`` and renamed into place, so a crash never leaves half an ISO.
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
        try:
            iso.write(str(tmp))
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
