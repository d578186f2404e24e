"""What a streaming URL stands for, and what the server needs from the rest of virtletd.

The server and protocol handlers only see these types, so tests can put a fake console or a fake pod network
behind them and virtletd puts its VMs (``backend.VirtletBackend``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    stdin: bool = False
    stdout: bool = True
    stderr: bool = False
    tty: bool = False


@dataclass(frozen=True)
class PortForwardRequest:
    sandbox_id: str
    ports: tuple[int, ...] = ()


class ConsoleSessionLike(Protocol):
    def read(self, timeout: float | None = None) -> bytes | None: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class Backend(Protocol):
    """Where attach and port-forward lead."""

    def open_console(self, container_id: str) -> ConsoleSessionLike:
        """A session on the container's console (raise a ``VirtletError`` saying why not)."""

    def dial(self, sandbox_id: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection to ``port`` of the pod (raise ``OSError``/``VirtletError`` saying why not)."""
