"""What virtletd composes: the streaming server with the VM backend, and the three CRI calls that issue URLs.

A streaming address that cannot be bound does not stop virtletd (VMs and CRI keep working); ``Attach``,
``Exec`` and ``PortForward`` then answer UNAVAILABLE naming the address and the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from virtlet import errors
from virtlet.state import store as st
from virtlet.stream.backend import VirtletBackend
from virtlet.stream.limits import DEFAULT, Limits
from virtlet.stream.model import AttachRequest, ExecRequest, GuestAgents, PortForwardRequest
from virtlet.stream.remotecommand import normalize
from virtlet.stream.server import StreamServer

log = logging.getLogger(__name__)


class StreamingService:
    """``start()``/``stop()`` with the daemon; ``attach_url``/``exec_url``/``port_forward_url`` for the CRI
    servicer.  ``vms`` gives a container's guest agent (for exec)."""

    def __init__(self, address: str, store: st.StateStore, console_dir: Path, *, ttl: float = 60.0,
                 vms: GuestAgents | None = None, limits: Limits = DEFAULT) -> None:
        self.address = address
        self.backend = VirtletBackend(store, console_dir, vms=vms)
        self.server = StreamServer(address, self.backend, ttl=ttl, limits=limits)
        self.error = ""
        self.running = False

    def start(self) -> None:
        try:
            self.server.start()
            self.running = True
        except errors.Unavailable as exc:
            self.error = str(exc)
            log.error("%s; attach and port-forward are unavailable", exc)

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False
        self.backend.close()

    def _require_running(self) -> None:
        if not self.running:
            raise errors.Unavailable(self.error or f"the streaming server on {self.address} is not running")

    def attach_url(self, container_id: str, *, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> str:
        req = normalize(AttachRequest(container_id, stdin, stdout, stderr, tty))
        self.backend.check_attach(req)
        self._require_running()
        return self.server.attach_url(req)

    def exec_url(self, container_id: str, cmd: list[str], *, stdin: bool, stdout: bool, stderr: bool,
                 tty: bool = False) -> str:
        req = ExecRequest(container_id, tuple(cmd), stdin, stdout, stderr and not tty, tty)  # a tty has no stderr
        self.backend.check_exec(req)
        self._require_running()
        return self.server.exec_url(req)

    def port_forward_url(self, sandbox_id: str, ports: Iterable[int]) -> str:
        req = PortForwardRequest(sandbox_id, tuple(int(p) for p in ports))
        self.backend.check_port_forward(req)
        self._require_running()
        return self.server.port_forward_url(req)
