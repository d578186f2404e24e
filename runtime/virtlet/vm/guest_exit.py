"""A guest's own exit code: what a VM pod that runs as a Job reports when it is done.

The domain has one more virtio-serial port, named ``cloud.virtlet.exit`` (``CHANNEL_NAME``), whose host side is a
file in the container's directory (``exit_file``).  Before it powers off, the guest writes ``exit-code N\\n`` to
``/dev/virtio-ports/cloud.virtlet.exit`` (the tiny image's ``virtlet-exit N`` does it, then powers off).  When the
guest has powered off, virtletd reads that file and ContainerStatus reports N: 0 -> ``Completed``, anything else
-> ``Error`` with a message saying the guest reported it (``virtlet.vm.exits``).

Bounded and strict: at most ``MAX_BYTES`` bytes are read, only the first line counts, and it must be exactly
``exit-code N`` with N in 0..255; anything else (an empty file, garbage, a number out of range) is ignored with a
log line and the exit is reported as if nothing was written.  The report counts only when the guest powered
off: a VM destroyed at the end of StopContainer's grace period is 137 and a QEMU crash keeps libvirt's reason,
whatever the guest wrote.  The file is emptied at each StartContainer, so a stale report never outlives its run.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

log = logging.getLogger(__name__)

#: The virtio-serial port name the guest sees (``/sys/class/virtio-ports/vportNpM/name``, udev's
#: ``/dev/virtio-ports/<name>`` link).
CHANNEL_NAME = "cloud.virtlet.exit"
#: The host side of the port, in the container's directory.
FILE_NAME = "guest-exit"
#: Read at most this much of what the guest wrote.
MAX_BYTES = 64

_LINE = re.compile(rb"exit-code ([0-9]{1,3})")


def exit_file(container_dir: Path) -> Path:
    """The host file the guest's ``cloud.virtlet.exit`` port writes to."""
    return container_dir / FILE_NAME


def reset(path: Path) -> None:
    """Empty the file before a start (a report of an earlier run must not count); absent is fine (libvirt makes
    it).  Never follows a symlink; a non-regular file there is left alone (and will not be read either)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("cannot empty the guest exit-code file %s: %s", path, exc)
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def parse(data: bytes) -> int | None:
    """The code in the first line of ``data`` (``exit-code N``, N 0..255), None when there is none."""
    line = data[:MAX_BYTES].split(b"\n", 1)[0].rstrip(b"\r")
    match = _LINE.fullmatch(line)
    if match is None:
        return None
    code = int(match.group(1))
    return code if code <= 255 else None


def read_reported(path: Path, pod: str) -> int | None:
    """The exit code the guest reported in ``path``, None (logged when something unusable was there) otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("VM pod %s: cannot read the guest's exit-code file %s: %s", pod, path, exc)
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            log.warning("VM pod %s: %s is not a regular file; the guest's exit code is ignored", pod, path)
            return None
        data = os.read(fd, MAX_BYTES)
    finally:
        os.close(fd)
    if not data:
        return None
    code = parse(data)
    if code is None:
        log.warning("VM pod %s: the guest wrote %r to its %s port, not 'exit-code N' (N 0..255) on the first line; "
                    "ignored", pod, data[:MAX_BYTES], CHANNEL_NAME)
    return code
