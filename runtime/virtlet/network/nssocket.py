"""Sockets inside another network namespace without fork().

pyroute2 opens a namespace's netlink socket in a forked child process.  virtletd is a multi-threaded gRPC
server, and a fork() there crashes the child (gRPC's fork handlers: "child process is dead, status: -11").
Network namespaces are per thread, so the socket is made instead in a short-lived thread that enters the
namespace with setns(2) and ends right after: no fork, and no other thread ever changes namespace.
``install()`` makes pyroute2 use this for every ``NetNS``/``IPRoute(netns=...)`` socket.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from typing import Any

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_installed = False


def _netns_path(netns: str) -> str:
    return netns if netns.startswith("/") else f"/var/run/netns/{netns}"


def socket_in_netns(netns: str, family: int, socket_type: int, proto: int = 0) -> socket.socket:
    """A new socket created inside the network namespace ``netns`` (a path or an ``ip netns`` name)."""
    made: list[socket.socket] = []
    failed: list[BaseException] = []

    def enter_and_create() -> None:
        try:
            fd = os.open(_netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            made.append(socket.socket(family, socket_type, proto))
        except BaseException as exc:  # handed to the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=enter_and_create, name="netns-socket", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


def install() -> None:
    """Route pyroute2's namespace sockets through ``socket_in_netns`` (idempotent)."""
    global _installed
    if _installed:
        return
    from pyroute2 import netns as p2netns

    original = p2netns.create_socket

    def create_socket(netns: str | None = None, family: int = socket.AF_INET, socket_type: int = socket.SOCK_STREAM,
                      proto: int = 0, fileno: int | None = None, flags: int = os.O_CREAT, libc: Any = None,
                      timeout: Any = None) -> socket.socket:
        if netns is None or fileno is not None:
            sock: socket.socket = original(netns=netns, family=family, socket_type=socket_type, proto=proto,
                                           fileno=fileno, flags=flags, libc=libc)
            return sock
        return socket_in_netns(netns, family, socket_type, proto)

    p2netns.create_socket = create_socket
    _installed = True
