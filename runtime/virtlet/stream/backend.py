"""virtletd's side of the streaming server: VM consoles for attach, the guest agent for exec, the pod network for
port-forward, and the checks a CRI ``Attach``/``Exec``/``PortForward`` call makes before it hands out a URL.

Consoles: QEMU's serial socket takes one client, so one ``ConsoleHub`` per container is shared by all attach
sessions and closed when the last one leaves (``virsh console`` can connect again then).

Port-forward: the VM owns the pod IP, so a forwarded port is reached at the pod IP.  The connection is made
from inside the pod network namespace (no fork: ``socket_in_netns``); when the pod namespace has no route to
the pod IP (virtlet moves the address from the namespace to the VM), it is made from the host namespace, where
the CNI network routes pod IPs.  A refused or timed-out connection is an error for that stream only.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtlet import errors, preconditions
from virtlet.console.attach import ConsoleHub, ConsoleSession
from virtlet.network.nssocket import socket_in_netns
from virtlet.state import store as st
from virtlet.stream.model import AttachRequest, ExecRequest, ExecResultLike, GuestAgents, PortForwardRequest
from virtlet.vm import exec_channel as ec
from virtlet.vm import guest_agent as ga

log = logging.getLogger(__name__)

EXEC_AGENT_GRACE = 10.0  # seconds after the first connection in which a non-TTY exec waits for the exec agent

_NO_ROUTE = {errno.ENETUNREACH, errno.EADDRNOTAVAIL, errno.EHOSTUNREACH, errno.EINVAL}


class _CountedSession:
    """A console session that releases its hub's reference when closed."""

    def __init__(self, backend: VirtletBackend, cid: str, session: ConsoleSession) -> None:
        self._backend = backend
        self._cid = cid
        self._session = session
        self._closed = False

    def read(self, timeout: float | None = None) -> bytes | None:
        return self._session.read(timeout)

    def write(self, data: bytes) -> None:
        self._session.write(data)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._session.close()
            self._backend._release(self._cid)


class VirtletBackend:
    """Attach, exec and port-forward for the containers and sandboxes in ``store``.  ``vms`` gives the guest
    agent of a container (the ``VmManager``); without it exec answers UNAVAILABLE."""

    def __init__(self, store: st.StateStore, console_dir: Path, *, host_fallback: bool = True,
                 vms: GuestAgents | None = None) -> None:
        self.store = store
        self.vms = vms
        self.console_dir = Path(console_dir)
        self.host_fallback = host_fallback
        self._lock = threading.Lock()
        self._hubs: dict[str, tuple[ConsoleHub, int]] = {}
        self._channels: dict[str, tuple[ec.ExecChannel, float]] = {}  # container id -> (channel, connected at)

    # -- checks at CRI time ---------------------------------------------------------------------------
    def check_attach(self, req: AttachRequest) -> None:
        """NOT_FOUND / FAILED_PRECONDITION / INVALID_ARGUMENT before a URL is issued."""
        if not req.container_id:
            raise errors.InvalidArgument("Attach: container_id is required")
        preconditions.require_stdio("Attach", req.stdin, req.stdout, req.stderr)
        preconditions.container_running("Attach", req.container_id,
                                        self.store.require_container(req.container_id).state)

    def check_exec(self, req: ExecRequest) -> None:
        if not req.container_id:
            raise errors.InvalidArgument("Exec: container_id is required")
        preconditions.require_cmd("Exec", req.cmd)
        ec.encode_open(req.cmd, tty=req.tty, stdin=req.stdin)  # INVALID_ARGUMENT: NUL bytes, over 32 KiB
        preconditions.container_running("Exec", req.container_id,
                                        self.store.require_container(req.container_id).state)

    def check_port_forward(self, req: PortForwardRequest) -> None:
        if not req.sandbox_id:
            raise errors.InvalidArgument("PortForward: pod_sandbox_id is required")
        for port in req.ports:
            if not 0 < port < 65536:
                raise errors.InvalidArgument(f"PortForward: port {port} is not in 1-65535")
        preconditions.sandbox_ready("PortForward", req.sandbox_id, self.store.require_sandbox(req.sandbox_id).state)

    # -- attach -----------------------------------------------------------------------------------------
    def open_console(self, container_id: str) -> _CountedSession:
        preconditions.container_running("Attach", container_id, self.store.require_container(container_id).state)
        with self._lock:
            hub, count = self._hubs.get(container_id, (None, 0))
            if hub is None or not hub.connected:
                hub = ConsoleHub(self.console_dir / f"{container_id}.sock")
                hub.start(timeout=5.0)
                count = 0
            self._hubs[container_id] = (hub, count + 1)
            session = hub.attach()
        return _CountedSession(self, container_id, session)

    def _release(self, container_id: str) -> None:
        with self._lock:
            hub, count = self._hubs.get(container_id, (None, 0))
            if hub is None:
                return
            if count <= 1:
                del self._hubs[container_id]
            else:
                self._hubs[container_id] = (hub, count - 1)
                return
        hub.close()

    def close(self) -> None:
        with self._lock:
            hubs, self._hubs = [h for h, _ in self._hubs.values()], {}
            channels, self._channels = [c for c, _ in self._channels.values()], {}
        for hub in hubs:
            hub.close()
        for channel in channels:
            channel.close()

    # -- exec -------------------------------------------------------------------------------------------
    def exec_channel(self, container_id: str, *, tty: bool, gone: threading.Event) -> ec.ExecChannel | None:
        """The VM's exec channel (one connection per VM, shared by its sessions) once the guest's agent said
        HELLO.  A VM still booting is waited for, counted from virtletd's first connection to the VM's channel:
        with a TTY (nothing else can serve it) up to ``ga.AGENT_WAIT_DEFAULT`` s, without one
        ``EXEC_AGENT_GRACE`` s, then None (the guest-agent path, or the TTY refusal).  So a guest without the
        agent costs that wait once, not on every exec; the client leaving ends the wait."""
        preconditions.container_running("Exec", container_id, self.store.require_container(container_id).state)
        path = ec.socket_path(self.console_dir / f"{container_id}.sock")
        with self._lock:
            known, since = self._channels.get(container_id, (None, 0.0))
        if known is not None and not known.closed.is_set():
            channel = known
        else:
            # connected outside the lock: a VM whose socket does not accept at once holds up only this exec
            fresh = ec.ExecChannel(path)
            try:
                fresh.connect()
            except errors.Unavailable as exc:
                log.info("exec in %s: %s; using the guest agent", container_id, exc)
                return None
            with self._lock:
                known, since = self._channels.get(container_id, (None, 0.0))
                if known is not None and not known.closed.is_set():
                    channel = known  # another exec connected meanwhile: use its channel
                else:
                    # channels of stopped or removed VMs are closed (QEMU hung up): dropped here, so the map
                    # stays as large as the number of running VMs that were exec'd into
                    self._channels = {k: v for k, v in self._channels.items() if not v[0].closed.is_set()}
                    channel, since = fresh, time.monotonic()
                    self._channels[container_id] = (channel, since)
            if channel is not fresh:
                fresh.close()
        deadline = since + (ga.AGENT_WAIT_DEFAULT if tty else EXEC_AGENT_GRACE)
        while not channel.wait_ready(min(0.5, max(0.0, deadline - time.monotonic()))):
            if gone.is_set() or time.monotonic() >= deadline or channel.closed.is_set():
                return None
        return channel

    def run_exec(self, container_id: str, cmd: tuple[str, ...], stdin: bytes | None,
                 alive: Callable[[], bool]) -> ExecResultLike:
        """Run ``cmd`` in the VM through its guest agent, without a time limit (a client that leaves ends it)."""
        if self.vms is None:
            raise errors.Unavailable("virtletd runs without a VM manager; exec is unavailable")
        preconditions.container_running("Exec", container_id, self.store.require_container(container_id).state)
        # a VM still booting: wait for its agent to connect (at most ga.AGENT_WAIT_DEFAULT s, or until the client
        # leaves), as ExecSync does
        return self.vms.guest_agent(container_id).exec(list(cmd), stdin, timeout=None, alive=alive,
                                                       agent_wait=ga.AGENT_WAIT_DEFAULT)

    # -- port-forward -----------------------------------------------------------------------------------
    def pod_ip(self, rec: st.SandboxRecord) -> str:
        ips = rec.network.pod_ips if rec.network is not None else []
        if not ips:
            raise errors.FailedPrecondition(f"pod sandbox {rec.id} has no IP address; nothing to forward to")
        v4 = [ip for ip in ips if ipaddress.ip_address(ip).version == 4]
        return (v4 or ips)[0]

    def dial(self, sandbox_id: str, port: int, timeout: float = 10.0) -> socket.socket:
        rec = self.store.require_sandbox(sandbox_id)
        preconditions.sandbox_ready("PortForward", sandbox_id, rec.state)
        ip = self.pod_ip(rec)
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        attempts: list[Any] = [rec.netns] if rec.netns else []
        if self.host_fallback:
            attempts.append(None)
        last: OSError | None = None
        for netns in attempts:
            sock = socket_in_netns(netns, family, socket.SOCK_STREAM) if netns else socket.socket(
                family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect((ip, port))
            except OSError as exc:
                sock.close()
                last = exc
                if exc.errno in _NO_ROUTE and netns:
                    log.debug("pod netns %s has no route to %s (%s); trying the host namespace", netns, ip, exc)
                    continue
                break
            sock.settimeout(None)
            return sock
        assert last is not None
        reason = "connection refused (nothing listens on it in the VM?)" if isinstance(
            last, ConnectionRefusedError) else str(last) or type(last).__name__
        raise errors.Unavailable(f"cannot connect to {ip}:{port}: {reason}")
