"""The state and helpers the VM manager's parts share (``virtlet.vm.manager`` composes them into ``VmManager``):
what CreateContainer hands over (``ContainerSpec``), the parts it composes (``VmParts``), per-container locks,
paths, the domain lookup, the log writers, and the two steps every path ends with (``_mark_exited``,
``_destroy_everything``).
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from virtlet import errors
from virtlet.console import writer as console_writer
from virtlet.locks import KeyedLocks
from virtlet.sandbox import podconfig
from virtlet.state import store as st
from virtlet.vm import designer, exec_channel
from virtlet.vm import guest as gu
from virtlet.vm import libvirt_host as lh
from virtlet.vm import stats as vmstats
from virtlet.vm.annotations import CpuResources
from virtlet.volumes import binds
from virtlet.volumes.devices import DeviceRequest
from virtlet.volumes.mounts import CriMount

if TYPE_CHECKING:  # types only: the image store is not imported at run time here
    from virtlet.images.store import ImageRecord


log = logging.getLogger("virtlet.vm.manager")


EXIT_OK = 0
EXIT_ERROR = 1
EXIT_KILLED = 137  # destroyed at the end of StopContainer's grace period: what containerd reports for a SIGKILL


@dataclass(frozen=True)
class ContainerSpec:
    """What CreateContainer gives the VM manager, free of protobuf types."""

    sandbox_id: str
    name: str
    attempt: int
    image: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    envs: list[tuple[str, str]] = field(default_factory=list)
    log_path: str = ""  # relative to the sandbox's log_directory
    memory_limit_bytes: int = 0
    cpu: CpuResources | None = None
    tty: bool = False
    stdin: bool = False
    config: bytes = b""
    mounts: tuple[CriMount, ...] = ()  # CRI mounts (virtlet.volumes.mounts)
    devices: list[DeviceRequest] = field(default_factory=list)  # CRI devices (block volumes, persistent root)


@dataclass(frozen=True)
class ResourceUpdate:
    """What UpdateContainerResources asks of a VM that QEMU can apply live; 0 = leave as it is (a quota < 0: no
    limit)."""

    memory_limit_bytes: int = 0
    cpu_shares: int = 0
    cpu_quota: int = 0
    cpu_period: int = 0
    cpuset_cpus: str = ""  # host CPUs to pin the VM to ("" = leave as it is)


class LogWriter(Protocol):
    """A container's console log writer (``virtlet.console.writer.ConsoleLogWriter``)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def reopen(self) -> None: ...


class VmParts(Protocol):
    """The pieces the manager composes (designed/validated elsewhere); see ``virtlet.vm.parts``."""

    host_cpus: int  # the node's CPUs: what cpuset lists and vCPU counts are checked against

    def validate(self, spec: ContainerSpec, sandbox: st.SandboxRecord) -> None: ...

    def prepare(self, cid: str, spec: ContainerSpec, sandbox: st.SandboxRecord, image: ImageRecord, cdir: Path,
                console_sock: Path, define: Callable[[str], None]) -> dict[str, Any]:
        """Make the container's files and its domain XML; ``define(xml)`` is called with the XML while the root
        overlay may still be in the making (the two overlap); returns, with both done, the record's extras."""

    def taps_before_start(self, sandbox: st.SandboxRecord) -> None: ...

    def after_start(self, sandbox: st.SandboxRecord) -> None: ...

    def after_exit(self, sandbox: st.SandboxRecord) -> None: ...

    def log_writer(self, raw: Path, cri_log: Path, state: Path) -> LogWriter: ...

    def image_status(self, name: str) -> ImageRecord | None: ...


class VmBase:
    def __init__(self, store: st.StateStore, host: lh.LibvirtHost, parts: VmParts, state_dir: Path,
                 run_dir: Path) -> None:
        self.store = store
        self.host = host
        self.parts = parts
        self.containers_dir = state_dir / "containers"
        self.console_dir = run_dir / "console"
        self.containers_dir.mkdir(parents=True, exist_ok=True)
        self.containers_dir.chmod(0o755)
        self.console_dir.mkdir(parents=True, exist_ok=True)
        self._lock = KeyedLocks()
        self._writers: dict[str, LogWriter] = {}
        self._stop_requested: set[str] = set()
        self._exited = threading.Condition()
        self.stats = vmstats.StatsSampler(lambda cid: self.host.lookup(self.domain_name(cid)))

    # -- helpers --------------------------------------------------------------------------------------

    def container_dir(self, cid: str) -> Path:
        return self.containers_dir / cid

    def console_socket(self, cid: str) -> Path:
        return self.console_dir / f"{cid}.sock"

    @staticmethod
    def domain_name(cid: str) -> str:
        return designer.domain_name(cid)

    def _guest(self, cid: str) -> gu.Guest | None:
        return gu.lookup(self.host, self.domain_name(cid))

    @staticmethod
    def _cid_of_domain(name: str) -> str | None:
        return designer.container_id_of(name)

    @staticmethod
    def _cri_log_path(sandbox: st.SandboxRecord, rec_log_path: str) -> Path | None:
        path = podconfig.container_log_path(sandbox.log_directory, rec_log_path)
        return Path(path) if path else None


    def _domain_active(self, cid: str) -> bool:
        guest = self._guest(cid)
        return guest is not None and guest.is_active()


    def _destroy_everything(self, cid: str) -> None:
        """Destroy + undefine the domain, stop the log writer, delete files.  Safe to repeat."""
        guest = self._guest(cid)
        if guest is not None:
            try:
                if guest.is_active():
                    guest.destroy()
            except errors.Internal as exc:
                log.warning("destroy of %s: %s", cid, exc)
            try:
                guest.undefine()
            except errors.Internal as exc:
                if self._guest(cid) is not None:
                    raise errors.Internal(f"container {cid}: {exc}") from exc
        self._stop_log_writer(cid)
        binds.release(self.container_dir(cid))  # read-only volume binds: unmounted before the rmtree
        shutil.rmtree(self.container_dir(cid), ignore_errors=True)
        for sock in (self.console_socket(cid), exec_channel.socket_path(self.console_socket(cid))):
            try:
                sock.unlink()
            except FileNotFoundError:
                pass


    def _mark_exited(self, cid: str, code: int, reason: str, message: str) -> None:
        rec = self.store.get_container(cid)
        if rec is None or rec.state == st.CONTAINER_EXITED:
            return
        self.store.update_container(cid, state=st.CONTAINER_EXITED, finished_at=st.now_ns(), exit_code=code,
                                    reason=reason, message=message)
        self._stop_log_writer(cid)
        log.info("container %s exited: %d %s (%s)", cid, code, reason, message)


    # -- logs -----------------------------------------------------------------------------------------
    def _start_log_writer(self, rec: st.ContainerRecord, sandbox: st.SandboxRecord) -> None:
        cri_log = self._cri_log_path(sandbox, rec.log_path)
        if cri_log is None or rec.id in self._writers:
            return
        cdir = self.container_dir(rec.id)
        cri_log.parent.mkdir(parents=True, exist_ok=True)
        writer = self.parts.log_writer(console_writer.raw_path(cdir), cri_log, cdir / "console-log.state")
        writer.start()
        self._writers[rec.id] = writer

    def _stop_log_writer(self, cid: str) -> None:
        writer = self._writers.pop(cid, None)
        if writer is not None:
            writer.stop()

