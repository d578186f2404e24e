"""Local TCP listeners that carry each accepted connection somewhere else.

``PortForwardListener`` sends them through a CRI port-forward URL (one SPDY connection, a stream pair per
local connection: how ``virtletctl ssh`` reaches port 22 of the VM); ``UnixRelay`` to a unix socket (the VM's
VNC display, which libvirt serves on a socket only root and QEMU reach), accepting only connections of the
user who runs virtletctl; ``TcpRelay`` to a plain host address (VNC of domains defined by older versions).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from virtlet.stream.client import PortForwardClient


class _Listener:
    def __init__(self, handle: Callable[[socket.socket], None], local_port: int = 0,
                 host: str = "127.0.0.1") -> None:
        self._handle = handle
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, local_port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="local-listener")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


class PortForwardListener(_Listener):
    """``127.0.0.1:<port>`` forwarded to ``remote_port`` of a pod through ``url`` (a CRI PortForward URL)."""

    def __init__(self, url: str, remote_port: int, local_port: int = 0) -> None:
        self.client = PortForwardClient(url)
        super().__init__(lambda c: self.client.serve_local(c, remote_port), local_port)

    def close(self) -> None:
        super().close()
        self.client.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while chunk := src.recv(65536):
            dst.sendall(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


class TcpRelay(_Listener):
    """``127.0.0.1:<port>`` relayed to ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int], local_port: int = 0) -> None:
        self.target = target
        super().__init__(self._relay, local_port)

    def _relay(self, conn: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            conn.close()
            return
        _splice(conn, upstream)


def _splice(conn: socket.socket, upstream: socket.socket) -> None:
    """Copy both ways until both sides are done, then close both."""
    upstream.settimeout(None)
    t = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
    t.start()
    _pipe(conn, upstream)
    t.join()
    conn.close()
    upstream.close()


def _hex_endpoint(addr: tuple[str, int]) -> str:
    """``127.0.0.1:5900`` as /proc/net/tcp writes it (address in host byte order, little-endian here)."""
    packed = socket.inet_aton(addr[0])
    return f"{int.from_bytes(packed, 'little'):08X}:{addr[1]:04X}"


def loopback_peer_uid(conn: socket.socket, proc_net_tcp: Path = Path("/proc/net/tcp")) -> int | None:
    """The uid owning the other end of an accepted IPv4 loopback connection (None when not found).

    The client's socket is the one whose local address is our peer and whose remote address is us; its
    owner is in the ``uid`` column."""
    local = _hex_endpoint(conn.getpeername())
    remote = _hex_endpoint(conn.getsockname())
    try:
        lines = proc_net_tcp.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if len(cols) > 7 and cols[1] == local and cols[2] == remote:
            return int(cols[7])
    return None


class UnixRelay(_Listener):
    """``127.0.0.1:<port>`` relayed to the unix socket ``path``, for connections of ``allowed_uid`` only (the
    port is on loopback, where every local user and every hostNetwork pod could otherwise reach it)."""

    def __init__(self, path: str, local_port: int = 0, allowed_uid: int | None = None) -> None:
        self.path = path
        self.allowed_uid = os.geteuid() if allowed_uid is None else allowed_uid
        super().__init__(self._relay, local_port)

    def _relay(self, conn: socket.socket) -> None:
        uid = loopback_peer_uid(conn)
        if uid != self.allowed_uid:
            conn.close()
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.settimeout(10)
            upstream.connect(self.path)
        except OSError:
            upstream.close()
            conn.close()
            return
        _splice(conn, upstream)
