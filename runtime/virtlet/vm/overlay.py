"""qcow2 overlays: a VM's writable root disk on top of a stored image, which is never copied nor written.

The overlay's backing file is the image store's path, so creating a VM costs a few KiB and no copy; QEMU
writes only to the overlay.  ``VirtletRootVolumeSize`` grows the overlay's virtual size (never shrinks it
below the image, which would cut the guest's filesystem).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from virtlet import errors

BASE_FORMATS = ("qcow2", "raw")
QEMU_IMG_TIMEOUT_S = 60


def _qemu_img(args: list[str], what: str) -> str:
    return _finish(_spawn(args), args, what)


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    try:
        return subprocess.Popen(["qemu-img", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise errors.FailedPrecondition(
            "qemu-img is not installed on this node (package qemu-utils)") from exc


def _finish(proc: subprocess.Popen[str], args: list[str], what: str) -> str:
    try:
        out, err = proc.communicate(timeout=QEMU_IMG_TIMEOUT_S)
    except BaseException as exc:  # timed out, or the caller interrupted: never leave qemu-img running
        proc.kill()
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise errors.Internal(f"{what}: qemu-img did not finish in {QEMU_IMG_TIMEOUT_S} s") from exc
        raise
    if proc.returncode != 0:
        raise errors.Internal(f"{what}: qemu-img {args[0]} failed: {err.strip()}")
    return out


def image_info(path: Path, fmt: str | None = None) -> dict[str, Any]:
    """``qemu-img info`` of ``path`` as a dict; ``-U`` so a disk in use by a running VM can be read too.

    Give ``fmt`` when it is known: a raw disk whose content looks like another format must not be probed.
    """
    if not path.exists():
        raise errors.NotFound(f"disk image {path} does not exist")
    args = ["info", "--output=json", "-U", *(["-f", fmt] if fmt else []), str(path)]
    info: dict[str, Any] = json.loads(_qemu_img(args, f"reading {path}"))
    return info


def virtual_size(path: Path, fmt: str | None = None) -> int:
    """The disk size the guest sees, in bytes."""
    return int(image_info(path, fmt)["virtual-size"])


def backing_file(path: Path) -> str | None:
    """The backing file an overlay names, None for a standalone image."""
    value = image_info(path).get("backing-filename")
    return str(value) if value else None


def create_overlay(base: Path, base_format: str, dest: Path, size_bytes: int | None = None,
                   base_size: int = 0) -> None:
    """Create the qcow2 ``dest`` backed by ``base``; its virtual size is ``size_bytes`` when that is larger.

    ``base_size`` is ``base``'s virtual size when the caller knows it (the image store's record of an image,
    which is never written after the pull): it saves a ``qemu-img info`` run (about 25 ms) in CreateContainer.

    ``dest`` must not exist (an overlay in use must never be replaced); a half-made ``dest`` is removed.
    """
    start_overlay(base, base_format, dest, size_bytes, base_size).wait()


class PendingOverlay:
    """A ``qemu-img create`` still running: CreateContainer builds the config drive and the domain meanwhile
    (the qemu-img run, about 8 ms, is most of what CreateContainer waits for)."""

    def __init__(self, proc: subprocess.Popen[str], args: list[str], dest: Path, what: str) -> None:
        self._proc, self._args, self.dest, self._what = proc, args, dest, what

    def wait(self) -> None:
        """Until the overlay is made; its error is raised and a half-made ``dest`` removed."""
        try:
            _finish(self._proc, self._args, self._what)
        except BaseException:
            self.dest.unlink(missing_ok=True)
            raise

    def abandon(self) -> None:
        """The caller failed meanwhile: wait for qemu-img without raising (the caller's clean-up removes
        ``dest``, which must not be written after that)."""
        try:
            self.wait()
        except Exception:
            pass


def start_overlay(base: Path, base_format: str, dest: Path, size_bytes: int | None = None,
                  base_size: int = 0) -> PendingOverlay:
    """:func:`create_overlay` started; :meth:`PendingOverlay.wait` finishes it.  Bad arguments raise here."""
    if base_format not in BASE_FORMATS:
        raise errors.InvalidArgument(f"image format {base_format!r} is not supported; expected one of "
                                     f"{', '.join(BASE_FORMATS)}")
    base = base.absolute()
    if base_size <= 0:
        base_size = virtual_size(base, base_format)
    if dest.exists():
        raise errors.AlreadyExists(f"overlay {dest} already exists; remove the container that owns it first")
    args = ["create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(dest)]
    if size_bytes is not None and size_bytes > base_size:
        args.append(str(size_bytes))
    # The guest's disk is private from its first byte: made 0600 here, qemu-img keeps the mode of the file it
    # truncates, and libvirt hands it to QEMU's user while the VM runs.
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    try:
        proc = _spawn(args)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return PendingOverlay(proc, args, dest, f"creating overlay {dest} on {base}")
