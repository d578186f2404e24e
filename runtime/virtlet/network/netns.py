"""Named network namespaces (``/var/run/netns/<name>``), made the way containerd makes its own.

Why not ``ip netns add``: on a host where ``/run/netns`` is not yet a mount point (every host after a boot),
``ip netns add`` bind-mounts ``/run/netns`` onto itself and makes it shared.  Namespaces that another runtime
(containerd, CRI-O) had already pinned there stay mounted *underneath* that new mount, so their files can never
be unlinked again (``unlinkat /run/netns/cni-…: device or resource busy``) and ordinary pods' teardown fails
as soon as the first VM pod starts.  This module never mounts anything on the directory itself:

- create: make ``/run/netns`` (0755) if missing, create an empty file ``/run/netns/<name>``, and bind-mount a
  new network namespace onto that file.  The namespace comes from a short-lived thread that calls
  ``unshare(CLONE_NEWNET)``: namespaces are per thread, so the new one is that thread's alone; the thread
  mounts ``/proc/<pid>/task/<tid>/ns/net`` onto the file, raises ``lo`` from inside (an ioctl on a socket it
  opens there) and ends.  The bind mount keeps the namespace alive.
- delete: lazy unmount (``MNT_DETACH``, so a process still inside does not make it fail) and unlink; a missing
  namespace, or a file left without its mount, is success.

How: ctypes (libc ``unshare``, ``mount``, ``umount2``) rather than util-linux ``unshare --net=FILE`` as a child.
virtletd already enters namespaces from short-lived threads (``network/nssocket.py``), so this adds no new kind
of risk; it needs no fork of the multi-threaded gRPC server and no helper binary whose version decides the
behaviour (util-linux's persistent-namespace handling has changed across releases); errors come back as
errno values we can name in a message; and ``lo`` goes up without another ``ip`` process.  The one rule that
matters: nothing but the dedicated thread ever runs in the new namespace, and that thread ends right after.

Every helper is idempotent: creating a namespace that exists and deleting one that is gone both succeed.
Callers serialise create/delete of one name (the sandbox manager holds a per-sandbox lock).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from virtlet import errors

log = logging.getLogger(__name__)

NETNS_DIR = Path("/var/run/netns")

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise errors.InvalidArgument(f"bad network namespace name {name!r}")


def path(name: str) -> Path:
    """The bind-mount path of the named namespace."""
    return NETNS_DIR / name


def _nsfs_dev() -> int:
    """The device number of the kernel's namespace filesystem (nsfs): every namespace file shares it."""
    return os.stat("/proc/self/ns/net").st_dev


def _is_netns(p: Path) -> bool:
    """Whether ``p`` is a namespace pinned by a bind mount (an unmounted leftover file is not)."""
    try:
        return os.stat(p).st_dev == _nsfs_dev()
    except OSError:
        return False


def exists(name: str) -> bool:
    return _is_netns(path(name))


def _oserror(call: str, target: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}({target}): {os.strerror(err)}")


def _ensure_dir() -> None:
    """``/run/netns`` as a plain 0755 directory; never a mount point of ours."""
    try:
        os.mkdir(NETNS_DIR, 0o755)
    except FileExistsError:
        return
    os.chmod(NETNS_DIR, 0o755)  # mkdir's mode is filtered by the umask; set it without touching the umask


def _set_lo_up() -> None:
    """Raise ``lo`` in the calling thread's network namespace."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req + b"\0" * 22)[:18])[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | IFF_UP) + b"\0" * 22)


def _new_netns_onto(target: Path) -> None:
    """In a dedicated thread: unshare a new network namespace, bind-mount it onto ``target``, raise lo."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise _oserror("unshare", "CLONE_NEWNET")
            source = f"/proc/{os.getpid()}/task/{threading.get_native_id()}/ns/net"
            if _libc.mount(source.encode(), str(target).encode(), None, MS_BIND, None) != 0:
                raise _oserror("mount", str(target))
            _set_lo_up()
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    # this thread is never reused: it ends right after, and its namespace lives on only through the mount
    thread = threading.Thread(target=run, name="netns-create", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]


def create(name: str) -> Path:
    """Create the namespace ``name`` unless it exists; return its path."""
    _check_name(name)
    target = path(name)
    if _is_netns(target):
        return target
    try:
        _ensure_dir()
        # an empty file left by a crash between open and mount is reused
        os.close(os.open(target, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444))
        _new_netns_onto(target)
    except OSError as exc:
        try:
            delete(name)
        except errors.VirtletError:
            pass
        raise errors.Internal(f"cannot create network namespace {name}: {exc}") from exc
    return target


def delete(name: str) -> None:
    """Delete the namespace ``name`` (lazy unmount, then unlink); a missing namespace is success."""
    _check_name(name)
    target = str(path(name)).encode()
    # a file may carry more than one mount (an older ``ip netns add`` and ours): take them all off
    for _ in range(8):
        if _libc.umount2(target, MNT_DETACH | UMOUNT_NOFOLLOW) != 0:
            err = ctypes.get_errno()
            if err in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more) / already gone
                break
            raise errors.Internal(f"cannot delete network namespace {name}: umount: {os.strerror(err)}")
    try:
        os.unlink(target)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.EBUSY and _dir_is_mount_point():
            # Someone ran `ip netns add` after this namespace was made: it bind-mounted /run/netns onto itself,
            # which hides our mount under the new one, where no path reaches it and the kernel refuses the unlink.
            # The namespace holds nothing of the pod any more (CNI DEL ran before); refusing here would keep the
            # pod from ever being removed.  It is released when that /run/netns mount goes (or at reboot).
            log.warning("network namespace %s is hidden under a later mount on %s (made by `ip netns add`); "
                        "its file stays until that mount is removed or the node reboots", name, NETNS_DIR)
            return
        raise errors.Internal(f"cannot delete network namespace {name}: unlink: {exc.strerror}") from exc


def _dir_is_mount_point() -> bool:
    """Whether something is mounted on the namespace directory itself (``os.path.ismount`` misses a bind mount of
    a directory onto itself, which is what ``ip netns add`` makes: same device)."""
    real = os.path.realpath(NETNS_DIR)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return any(line.split()[4] == real for line in f if len(line.split()) > 4)
    except OSError:
        return False


def list_names() -> list[str]:
    """Names of all named namespaces on the host."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir())
