"""The bounds of the streaming server (issue 13): time, bytes and connections a peer can hold.

A streaming URL is handed to whoever the kubelet (or ``crictl``) gives it to, and the port is reachable by any
host process before the token is checked, so every resource a connection can take is bounded:

- ``head_timeout``: total time (not per read) to receive the HTTP request head; a slowloris client sending a
  byte every few seconds is cut off after it, whatever it sends.  ``max_head``: bytes in that head.
- ``max_connections``: connections open at once (waiting for a head or upgraded); past it a new connection is
  answered ``503 Service Unavailable`` with ``Retry-After`` and closed at once.
- ``idle_timeout``: an upgraded connection with no frame in either direction for this long is closed (4 h, the
  kubelet's ``--streaming-connection-idle-timeout`` default).
- ``send_timeout``: a peer that takes none of our bytes for this long (its TCP window stays full) is dropped;
  the same bound applies to a VM port that does not read what port-forward sends it.
- ``max_frame``: a SPDY frame or WebSocket message longer than this is refused from its length field, before
  any of it is read or allocated (Kubernetes clients send 32 KiB chunks).
- ``stream_buffer``: bytes buffered for one SPDY stream (or WebSocket stdin) that its consumer has not taken;
  when full, reading from that connection pauses (back-pressure through TCP to the sender), and a stream whose
  consumer takes nothing for ``send_timeout`` is reset.
- ``max_streams``: open SPDY streams per connection (port-forward opens two per forwarded connection); past it
  a new stream is refused with RST_STREAM REFUSED_STREAM.
"""

from __future__ import annotations

import select
import socket
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    head_timeout: float = 10.0
    max_head: int = 64 * 1024
    max_connections: int = 128
    idle_timeout: float = 4 * 3600.0
    send_timeout: float = 60.0
    max_frame: int = 1 << 20
    stream_buffer: int = 1 << 20
    max_streams: int = 256


DEFAULT = Limits()


class IdleTimeout(Exception):
    """No traffic in either direction for the idle timeout."""


class Activity:
    """When a connection last moved bytes; ``wait_readable`` blocks until ``sock`` has bytes (or EOF) and raises
    ``IdleTimeout`` once nothing moved either way for ``idle_timeout`` seconds."""

    def __init__(self, sock: socket.socket, idle_timeout: float) -> None:
        self.sock = sock
        self.idle_timeout = idle_timeout
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def wait_readable(self) -> None:
        while True:
            left = self.last + self.idle_timeout - time.monotonic()
            if left <= 0:
                raise IdleTimeout(f"no traffic for {self.idle_timeout:g}s")
            try:
                ready, _, _ = select.select([self.sock], [], [], left)
            except (OSError, ValueError):  # closed under us: let recv report it
                return
            if ready:
                return
