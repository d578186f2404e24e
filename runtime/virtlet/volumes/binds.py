"""Read-only bind mounts that make ``readOnly`` directory volumes read-only on the host side.

libvirt 9.0 refuses ``<readonly/>`` on a virtiofs share, and a read-only mount inside the guest can be undone
by the guest's root.  So a read-only volume is shared from a read-only bind mount of its host path, made in
the container's directory (``<container dir>/ro/<n>``): virtiofsd then gets EROFS for any write, whatever the
guest does.  A bind mount shows the same directory, so the kubelet's ``..data`` swap inside it is still seen.

``release`` unmounts them; ``VmManager`` calls it before it deletes the container directory (which is then
safe even if an unmount failed: ``shutil.rmtree`` cannot delete through a read-only mount).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

from virtlet import errors

log = logging.getLogger("virtlet.volumes")

RO_DIR = "ro"
_TIMEOUT = 30


def _mount(*args: str) -> None:
    try:
        res = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise errors.Internal(f"mount {' '.join(args)}: {exc}") from exc
    if res.returncode != 0:
        raise errors.Internal(f"mount {' '.join(args)}: {res.stderr.strip()[:500]}")


def bind_readonly(source: str, cdir: Path, index: int) -> str:
    """Bind ``source`` read-only at ``cdir/ro/<index>``; returns that path (the share's source)."""
    target = cdir / RO_DIR / str(index)
    target.mkdir(parents=True, exist_ok=True)
    _mount("--bind", source, str(target))
    try:
        _mount("-o", "remount,bind,ro", str(target))
    except errors.Internal:
        release(cdir)
        raise
    return str(target)


def _mount_points() -> set[str]:
    """Every mount point of this mount namespace (``/proc/self/mountinfo``, field 5, octal escapes undone)."""
    points = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) > 4:
                points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def _is_mount_point(path: Path) -> bool:
    return os.path.realpath(path) in _mount_points()


def release(cdir: Path) -> None:
    """Unmount every read-only bind of the container (safe to repeat, and for a container without any)."""
    base = cdir / RO_DIR
    try:
        entries = sorted(base.iterdir())
    except FileNotFoundError:
        return
    for target in entries:
        while _is_mount_point(target):  # a bind on the same filesystem: os.path.ismount cannot tell
            res = subprocess.run(["umount", str(target)], capture_output=True, text=True, timeout=_TIMEOUT,
                                 check=False)
            if res.returncode != 0:  # busy (virtiofsd still exiting): detach it, the kernel frees it later
                res = subprocess.run(["umount", "-l", str(target)], capture_output=True, text=True,
                                     timeout=_TIMEOUT, check=False)
                if res.returncode != 0:
                    log.warning("cannot unmount %s: %s", target, res.stderr.strip())
                    break
        try:
            target.rmdir()
        except OSError as exc:
            log.warning("cannot remove %s: %s", target, exc)
