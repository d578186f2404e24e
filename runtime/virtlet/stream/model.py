"""What a streaming URL stands for, and what the server needs from the rest of virtletd.

The server and protocol handlers only see these types, so tests can put a fake console or a fake pod network
behind them and virtletd puts its VMs (``backend.VirtletBackend``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import threading

    from virtlet.vm.exec_channel import ExecChannel


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    stdin: bool = False
    stdout: bool = True
    stderr: bool = False
    tty: bool = False


@dataclass(frozen=True)
class ExecRequest:
    """A command; with ``tty`` it runs on a pty in the guest (the exec channel only, ``virtlet.stream.execute``)."""

    container_id: str
    cmd: tuple[str, ...]
    stdin: bool = False
    stdout: bool = True
    stderr: bool = True
    tty: bool = False


@dataclass(frozen=True)
class PortForwardRequest:
    sandbox_id: str
    ports: tuple[int, ...] = ()


class ConsoleSessionLike(Protocol):
    def read(self, timeout: float | None = None) -> bytes | None: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class ExecResultLike(Protocol):
    @property
    def exit_code(self) -> int: ...

    @property
    def stdout(self) -> bytes: ...

    @property
    def stderr(self) -> bytes: ...


class ExecAgent(Protocol):
    """A running VM's guest agent (``virtlet.vm.guest_agent.GuestAgent``), as far as exec uses it."""

    def exec(self, argv: Sequence[str], stdin: bytes | None = None, timeout: float | None = None,
             alive: Callable[[], bool] | None = None, max_output: int | None = None,
             agent_wait: float = 0.0) -> ExecResultLike: ...


class GuestAgents(Protocol):
    """What the streaming backend needs of the VM manager (``VmManager``): a container's guest agent."""

    def guest_agent(self, cid: str) -> ExecAgent: ...


class Backend(Protocol):
    """Where attach, exec and port-forward lead."""

    def open_console(self, container_id: str) -> ConsoleSessionLike:
        """A session on the container's console (raise a ``VirtletError`` saying why not)."""

    def run_exec(self, container_id: str, cmd: tuple[str, ...], stdin: bytes | None,
                 alive: Callable[[], bool]) -> ExecResultLike:
        """Run ``cmd`` to its end (raise a ``VirtletError`` saying why it cannot run)."""

    def exec_channel(self, container_id: str, *, tty: bool, gone: threading.Event) -> ExecChannel | None:
        """The container's exec channel once its agent answered, None when the guest has none (then
        ``run_exec``); a ``VirtletError`` when the container cannot exec at all."""

    def dial(self, sandbox_id: str, port: int, timeout: float = 10.0) -> socket.socket:
        """A TCP connection to ``port`` of the pod (raise ``OSError``/``VirtletError`` saying why not)."""
