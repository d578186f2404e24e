"""VM containers: CreateContainer/Start/Stop/Remove/Status as domain operations on libvirt domains.

One VM per sandbox.  Files of a container live in ``<state_dir>/containers/<id>/`` (root overlay, config drive,
raw console log, log-writer state); its console socket in ``<run_dir>/console/<id>.sock``.  The record is
committed first and deleted last, so start-up recovery can always tell what is ours: a domain or directory that
belongs to no record is removed.

Exit codes: guest powered off -> 0 ``Completed``; stopped by StopContainer -> 0 ``Completed``; QEMU killed or
crashed (or the domain destroyed behind our back) -> 1 ``Error`` with libvirt's reason in the message.

Crash safety (a SIGKILL of virtletd at any step; the named failpoints in ``virtlet.failpoints`` sit between the
steps, and ``recover`` finishes or undoes each one at start-up):
- CreateContainer commits the record with ``extra["creating"]`` and clears it as its last step.  A record still
  marked ``creating`` belongs to a call that never replied: the kubelet has no id for it, so recovery removes the
  domain, the files and the record.
- The kubelet retries CreateContainer after a timeout with the same metadata, and after a failed start it creates
  the next attempt; it never starts a container it did not see created.  containerd answers a reserved name with an
  error and lets the kubelet's garbage collection remove the stale container; a VM pod runs one container, so that
  stale CREATED container would block the pod here.  virtletd therefore *replaces* a container that is CREATED
  and never started when a new CreateContainer arrives for its sandbox: the retry succeeds and nothing is listed
  twice.  A RUNNING container is never replaced (the one-live-container rule refuses the call).
- StartContainer killed after QEMU started leaves the record CREATED with the domain running: recovery adopts it
  as RUNNING (taps moved into the pod netns, log writer started), so the VM stays on the pod network and the
  kubelet's retried StartContainer succeeds.  Killed before QEMU started: recovery deletes the taps it made in the
  host netns; the record stays CREATED.
- StopContainer records ``extra["stop_requested"]`` before the ACPI request, so a VM that went down while
  virtletd was dead is reported as stopped by StopContainer (0 ``Completed``), as without the crash.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import libvirt

from virtlet import errors, failpoints
from virtlet.sandbox import podconfig
from virtlet.state import store as st
from virtlet.vm import designer
from virtlet.vm import guest_agent as ga
from virtlet.vm import libvirt_host as lh
from virtlet.vm import stats as vmstats

log = logging.getLogger(__name__)


def _undefine(dom: Any) -> None:
    """Undefine with its NVRAM and managed save; a driver that does not know those flags (libvirt's test driver,
    which the CRI fuzzer uses) gets a plain undefine: the VM then has neither."""
    try:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG):
            raise
        dom.undefine()

EXIT_OK = 0
EXIT_ERROR = 1


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
    cpu: Any = None  # virtlet.vm.annotations.CpuResources
    tty: bool = False
    stdin: bool = False
    config: bytes = b""


class VmParts(Protocol):
    """The pieces the manager composes (designed/validated elsewhere); see ``virtlet.vm.parts``."""

    def prepare(self, cid: str, spec: ContainerSpec, sandbox: st.SandboxRecord, image: Any, cdir: Path,
                console_sock: Path) -> tuple[str, dict[str, Any]]: ...

    def taps_before_start(self, sandbox: st.SandboxRecord) -> None: ...

    def after_start(self, sandbox: st.SandboxRecord) -> None: ...

    def after_exit(self, sandbox: st.SandboxRecord) -> None: ...

    def log_writer(self, raw: Path, cri_log: Path, state: Path) -> Any: ...

    def image_status(self, name: str) -> Any: ...


class VmManager:
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
        self._locks: dict[str, threading.RLock] = {}
        self._locks_guard = threading.Lock()
        self._writers: dict[str, Any] = {}
        self._stop_requested: set[str] = set()
        self._exited = threading.Condition()
        self.stats = vmstats.StatsSampler(lambda cid: self.host.lookup(self.domain_name(cid)))
        host.subscribe(self._on_event)

    # -- helpers --------------------------------------------------------------------------------------
    def _lock(self, cid: str) -> threading.RLock:
        with self._locks_guard:
            return self._locks.setdefault(cid, threading.RLock())

    def container_dir(self, cid: str) -> Path:
        return self.containers_dir / cid

    def console_socket(self, cid: str) -> Path:
        return self.console_dir / f"{cid}.sock"

    @staticmethod
    def domain_name(cid: str) -> str:
        return designer.domain_name(cid)

    @staticmethod
    def _cid_of_domain(name: str) -> str | None:
        return designer.container_id_of(name)

    @staticmethod
    def _cri_log_path(sandbox: st.SandboxRecord, rec_log_path: str) -> Path | None:
        path = podconfig.container_log_path(sandbox.log_directory, rec_log_path)
        return Path(path) if path else None

    # -- CreateContainer ------------------------------------------------------------------------------
    def create(self, spec: ContainerSpec) -> st.ContainerRecord:
        sandbox = self.store.require_sandbox(spec.sandbox_id)
        if sandbox.state != st.SANDBOX_READY:
            raise errors.FailedPrecondition(
                f"pod sandbox {spec.sandbox_id} is not ready (state {sandbox.state}); cannot create a VM in it")
        if not spec.image:
            raise errors.InvalidArgument("container config: image.image is required")
        image = self.parts.image_status(spec.image)
        if image is None:
            raise errors.NotFound(f"image {spec.image!r} is not present; pull it first (PullImage)")
        cid = str(uuid.uuid4())
        cdir = self.container_dir(cid)
        rec = st.ContainerRecord(
            id=cid, sandbox_id=spec.sandbox_id, name=spec.name, attempt=spec.attempt, state=st.CONTAINER_CREATED,
            created_at=st.now_ns(), image=spec.image, image_ref=image.digest, log_path=spec.log_path,
            labels=dict(spec.labels), annotations=dict(spec.annotations), config=spec.config,
            extra={"domain": self.domain_name(cid), "dir": str(cdir), "image_path": str(image.path),
                   "creating": True})
        self._replace_unstarted(spec.sandbox_id)
        with self._lock(cid):
            self.store.add_container(rec)  # checks: sandbox READY, no other live container
            try:
                failpoints.hit("container.create.after_record")
                cdir.mkdir(parents=True)
                cdir.chmod(0o755)
                xml, extra = self.parts.prepare(cid, spec, sandbox, image, cdir, self.console_socket(cid))
                failpoints.hit("container.create.after_prepare")
                self._undefine_exited_domains(spec.sandbox_id)
                failpoints.hit("container.before_define")
                self.host.define(xml)
                failpoints.hit("container.create.after_define")
                done = {k: v for k, v in {**rec.extra, **extra}.items() if k != "creating"}
                rec = self.store.update_container(cid, extra=done)
            except BaseException:
                self._destroy_everything(cid)
                self.store.delete_container(cid)
                raise
        log.info("container %s created in sandbox %s (domain %s)", cid, spec.sandbox_id, self.domain_name(cid))
        return rec

    def _replace_unstarted(self, sandbox_id: str) -> None:
        """Remove containers of the sandbox that are CREATED and were never started (see the module doc: the
        kubelet gave up on them, and a VM pod holds one container)."""
        for old in self.store.list_containers(sandbox_id):
            if old.state == st.CONTAINER_CREATED:
                log.warning("CreateContainer in sandbox %s replaces container %s (%s attempt %d), created and never "
                            "started (a timed-out or retried CreateContainer)", sandbox_id, old.id, old.name,
                            old.attempt)
                with self._lock(old.id):  # waits for a create of it still in progress
                    current = self.store.get_container(old.id)
                    if current is not None and current.state == st.CONTAINER_CREATED:
                        self.remove(old.id)

    def _undefine_exited_domains(self, sandbox_id: str) -> None:
        """A restarted container reuses the pod's domain UUID (= SMBIOS UUID): the exited one's domain must go
        first.  Its record, files and log stay until the kubelet removes the container."""
        for old in self.store.list_containers(sandbox_id):
            if old.state != st.CONTAINER_EXITED:
                continue
            dom = self.host.lookup(self.domain_name(old.id))
            if dom is not None and not dom.isActive():
                try:
                    _undefine(dom)
                except libvirt.libvirtError as exc:
                    log.warning("cannot undefine exited domain of %s: %s", old.id, exc)

    # -- StartContainer -------------------------------------------------------------------------------
    def start(self, cid: str) -> None:
        with self._lock(cid):
            rec = self.store.require_container(cid)
            if rec.state == st.CONTAINER_RUNNING:
                return
            if rec.state != st.CONTAINER_CREATED:
                raise errors.FailedPrecondition(f"container {cid} is {rec.state}; only a CREATED container starts")
            sandbox = self.store.require_sandbox(rec.sandbox_id)
            dom = self.host.lookup(self.domain_name(cid))
            if dom is None:
                raise errors.FailedPrecondition(f"container {cid}: its libvirt domain is gone; remove it")
            self._start_log_writer(rec, sandbox)
            failpoints.hit("container.start.after_log_writer")
            if self._domain_active(cid):  # started by an earlier call whose reply was lost: adopt it
                self._adopt_running(cid, sandbox)
                return
            self.parts.taps_before_start(sandbox)
            failpoints.hit("container.start.after_taps")
            try:
                dom.create()
            except libvirt.libvirtError as exc:
                self.parts.after_exit(sandbox)
                self.store.update_container(cid, state=st.CONTAINER_EXITED, finished_at=st.now_ns(),
                                            exit_code=EXIT_ERROR, reason="StartError",
                                            message=f"libvirt could not start the VM: {exc}")
                self._stop_log_writer(cid)
                raise errors.Internal(f"container {cid}: libvirt could not start the VM: {exc}") from exc
            failpoints.hit("container.start.after_domain_start")
            self._adopt_running(cid, sandbox)

    def _adopt_running(self, cid: str, sandbox: st.SandboxRecord) -> None:
        """The domain of a CREATED container runs: put its taps on the pod network, record RUNNING."""
        self.parts.after_start(sandbox)  # idempotent: taps already in the pod netns stay
        failpoints.hit("container.start.after_attach")
        self.store.update_container(cid, state=st.CONTAINER_RUNNING, started_at=st.now_ns())
        # an exit event may have raced with the update above: make the state agree with libvirt
        self._reconcile(cid)

    # -- StopContainer --------------------------------------------------------------------------------
    def stop(self, cid: str, timeout: int) -> None:
        with self._lock(cid):
            rec = self.store.get_container(cid)
            if rec is None or rec.state in (st.CONTAINER_EXITED,):
                return
            if rec.state == st.CONTAINER_CREATED:
                self.store.update_container(cid, state=st.CONTAINER_EXITED, finished_at=st.now_ns(),
                                            exit_code=EXIT_OK, reason="Completed", message="never started")
                return
            self._stop_requested.add(cid)
            if not rec.extra.get("stop_requested"):
                rec = self.store.update_container(cid, extra={**rec.extra, "stop_requested": True})
            dom = self.host.lookup(self.domain_name(cid))
            if dom is not None and dom.isActive():
                try:
                    dom.shutdown()  # ACPI power button
                except libvirt.libvirtError as exc:
                    log.info("ACPI shutdown of %s refused (%s); destroying", cid, exc)
                failpoints.hit("container.stop.after_shutdown_request")
                deadline = time.monotonic() + max(timeout, 0)
                while time.monotonic() < deadline and self._domain_active(cid):
                    with self._exited:
                        self._exited.wait(0.5)
                if self._domain_active(cid):
                    log.info("container %s did not shut down within %ss; destroying the VM", cid, timeout)
                    try:
                        dom.destroy()
                    except libvirt.libvirtError as exc:
                        if self._domain_active(cid):
                            raise errors.Internal(f"cannot destroy VM of container {cid}: {exc}") from exc
                failpoints.hit("container.stop.after_domain_stopped")
            self._mark_exited(cid, EXIT_OK, "Completed", "stopped by StopContainer")

    def _domain_active(self, cid: str) -> bool:
        dom = self.host.lookup(self.domain_name(cid))
        try:
            return bool(dom is not None and dom.isActive())
        except libvirt.libvirtError:
            return False

    # -- RemoveContainer ------------------------------------------------------------------------------
    def remove(self, cid: str) -> None:
        with self._lock(cid):
            rec = self.store.get_container(cid)
            if rec is None:
                self._destroy_everything(cid)  # idempotent: leftovers of an unknown id go too
                return
            self._stop_requested.add(cid)
            self._destroy_everything(cid)
            failpoints.hit("container.remove.after_destroy")
            if rec.state in (st.CONTAINER_RUNNING, st.CONTAINER_CREATED):
                self._mark_exited(cid, EXIT_OK, "Completed", "removed")
                sandbox = self.store.get_sandbox(rec.sandbox_id)
                if sandbox is not None:
                    self.parts.after_exit(sandbox)
            self.store.delete_container(cid)
            self._stop_requested.discard(cid)
            self.stats.forget(cid)

    def remove_all_in_sandbox(self, sandbox_id: str) -> None:
        for rec in self.store.list_containers(sandbox_id):
            self.remove(rec.id)

    def stop_all_in_sandbox(self, sandbox_id: str) -> None:
        for rec in self.store.list_containers(sandbox_id):
            if rec.state in (st.CONTAINER_RUNNING, st.CONTAINER_CREATED):
                self.stop(rec.id, 10)

    def _destroy_everything(self, cid: str) -> None:
        """Destroy + undefine the domain, stop the log writer, delete files.  Safe to repeat."""
        dom = self.host.lookup(self.domain_name(cid))
        if dom is not None:
            try:
                if dom.isActive():
                    dom.destroy()
            except libvirt.libvirtError as exc:
                log.warning("destroy of %s: %s", cid, exc)
            try:
                _undefine(dom)
            except libvirt.libvirtError as exc:
                if self.host.lookup(self.domain_name(cid)) is not None:
                    raise errors.Internal(f"cannot undefine VM of container {cid}: {exc}") from exc
        self._stop_log_writer(cid)
        shutil.rmtree(self.container_dir(cid), ignore_errors=True)
        try:
            self.console_socket(cid).unlink()
        except FileNotFoundError:
            pass

    # -- state from libvirt ---------------------------------------------------------------------------
    def _on_event(self, ev: lh.DomainEvent) -> None:
        cid = self._cid_of_domain(ev.name)
        if cid is None or ev.event != lh.STOPPED:
            return
        threading.Thread(target=self._handle_stopped, args=(cid, ev.detail), daemon=True,
                         name=f"exit-{cid[:8]}").start()

    def _handle_stopped(self, cid: str, detail: int) -> None:
        with self._exited:
            self._exited.notify_all()
        with self._lock(cid):
            rec = self.store.get_container(cid)
            if rec is None or rec.state != st.CONTAINER_RUNNING:
                return
            if cid in self._stop_requested:
                return  # StopContainer/RemoveContainer record the outcome themselves
            code, reason, message = self._exit_from_detail(detail)
            if rec.extra.get("stop_requested"):  # a StopContainer of an earlier virtletd was under way
                code, reason, message = EXIT_OK, "Completed", "stopped by StopContainer"
            self._mark_exited(cid, code, reason, message)
            sandbox = self.store.get_sandbox(rec.sandbox_id)
            if sandbox is not None:
                self.parts.after_exit(sandbox)

    @staticmethod
    def _exit_from_detail(detail: int) -> tuple[int, str, str]:
        if detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN:
            return EXIT_OK, "Completed", "the guest powered off"
        return EXIT_ERROR, "Error", f"the VM stopped: {lh.describe_stopped_detail(detail)}"

    @staticmethod
    def _exit_from_reason(reason: int) -> tuple[int, str, str]:
        if reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN:
            return EXIT_OK, "Completed", "the guest powered off"
        return EXIT_ERROR, "Error", f"the VM stopped: {lh.describe_shutoff_reason(reason)}"

    def _mark_exited(self, cid: str, code: int, reason: str, message: str) -> None:
        rec = self.store.get_container(cid)
        if rec is None or rec.state == st.CONTAINER_EXITED:
            return
        self.store.update_container(cid, state=st.CONTAINER_EXITED, finished_at=st.now_ns(), exit_code=code,
                                    reason=reason, message=message)
        self._stop_log_writer(cid)
        log.info("container %s exited: %d %s (%s)", cid, code, reason, message)

    def _reconcile(self, cid: str) -> None:
        """Make a RUNNING record agree with libvirt (after start, and at start-up recovery)."""
        rec = self.store.get_container(cid)
        if rec is None or rec.state != st.CONTAINER_RUNNING:
            return
        dom = self.host.lookup(self.domain_name(cid))
        if dom is None:
            code, why, message = EXIT_ERROR, "Error", "the VM's libvirt domain disappeared"
        else:
            state, reason = dom.state()
            if state not in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED):
                return
            code, why, message = self._exit_from_reason(reason)
        if rec.extra.get("stop_requested"):  # a StopContainer (or Remove) was under way: its outcome
            code, why, message = EXIT_OK, "Completed", "stopped by StopContainer"
        self._mark_exited(cid, code, why, message)
        sandbox = self.store.get_sandbox(rec.sandbox_id)
        if sandbox is not None:
            self.parts.after_exit(sandbox)  # the taps of a VM that is gone

    # -- logs -----------------------------------------------------------------------------------------
    def _start_log_writer(self, rec: st.ContainerRecord, sandbox: st.SandboxRecord) -> None:
        cri_log = self._cri_log_path(sandbox, rec.log_path)
        if cri_log is None or rec.id in self._writers:
            return
        cdir = self.container_dir(rec.id)
        cri_log.parent.mkdir(parents=True, exist_ok=True)
        writer = self.parts.log_writer(cdir / "console.raw", cri_log, cdir / "console-log.state")
        writer.start()
        self._writers[rec.id] = writer

    def _stop_log_writer(self, cid: str) -> None:
        writer = self._writers.pop(cid, None)
        if writer is not None:
            writer.stop()

    def reopen_log(self, cid: str) -> None:
        rec = self.store.require_container(cid)
        if rec.state != st.CONTAINER_RUNNING:
            raise errors.FailedPrecondition(f"container {cid} is not running; its log is closed")
        writer = self._writers.get(cid)
        if writer is not None:
            writer.reopen()

    # -- queries --------------------------------------------------------------------------------------
    def qemu_pid(self, cid: str) -> int:
        pidfile = Path("/run/libvirt/qemu") / f"{self.domain_name(cid)}.pid"
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return 0

    def container_stats(self, rec: st.ContainerRecord) -> vmstats.ContainerSample:
        return self.stats.container(rec)

    def sandbox_stats(self, rec: st.SandboxRecord) -> vmstats.SandboxSample:
        return self.stats.sandbox(rec, self.store.list_containers(rec.id))

    def guest_agent(self, cid: str) -> ga.GuestAgent:
        """The guest agent of a running VM (``FailedPrecondition`` when its domain is not running)."""
        rec = self.store.require_container(cid)
        sandbox = self.store.get_sandbox(rec.sandbox_id)
        pod = f"{sandbox.namespace}/{sandbox.name}" if sandbox is not None else rec.name
        dom = self.host.lookup(self.domain_name(cid))
        try:
            active = dom is not None and dom.isActive()
        except libvirt.libvirtError:
            active = False
        if not active:
            raise errors.FailedPrecondition(f"VM pod {pod}: the VM of container {cid} is not running")
        return ga.GuestAgent(ga.libvirt_transport(dom), pod)

    def domain_xml(self, cid: str) -> str:
        dom = self.host.lookup(self.domain_name(cid))
        return dom.XMLDesc(0) if dom is not None else ""

    # -- start-up recovery ----------------------------------------------------------------------------
    def recover(self) -> None:
        known = {rec.id: rec for rec in self.store.list_containers()}
        for name in self.host.domain_names():
            cid = self._cid_of_domain(name)
            if cid is not None and cid not in known and self._is_ours(name):
                log.warning("removing domain %s: it belongs to no known container", name)
                self._destroy_everything(cid)
        for path in self.containers_dir.iterdir():
            if path.name not in known:
                log.warning("removing %s: it belongs to no known container", path)
                shutil.rmtree(path, ignore_errors=True)
        for sock in self.console_dir.glob("*.sock"):
            if sock.stem not in known:
                sock.unlink(missing_ok=True)
        for rec in list(known.values()):
            if rec.state == st.CONTAINER_CREATED and rec.extra.get("creating"):
                log.warning("removing container %s: its CreateContainer never replied", rec.id)
                self._destroy_everything(rec.id)
                self.store.delete_container(rec.id)
                del known[rec.id]
        for rec in known.values():
            sandbox = self.store.get_sandbox(rec.sandbox_id)
            if rec.state == st.CONTAINER_CREATED and sandbox is not None and self._domain_active(rec.id):
                log.warning("container %s: its StartContainer never replied but the VM runs; adopting it", rec.id)
                self._start_log_writer(rec, sandbox)
                self._adopt_running(rec.id, sandbox)
                continue
            if rec.state == st.CONTAINER_RUNNING:
                self._reconcile(rec.id)
                rec = self.store.require_container(rec.id)
                sandbox = self.store.get_sandbox(rec.sandbox_id)
                if rec.state == st.CONTAINER_RUNNING and sandbox is not None:
                    self._start_log_writer(rec, sandbox)
                    self.parts.after_start(sandbox)  # idempotent: taps a killed virtletd left in the host netns
                    log.info("container %s found running again", rec.id)
            elif rec.state == st.CONTAINER_CREATED and self.host.lookup(self.domain_name(rec.id)) is None:
                self._mark_exited(rec.id, EXIT_ERROR, "Error", "the VM's libvirt domain disappeared")
            elif rec.state == st.CONTAINER_CREATED and sandbox is not None:
                self.parts.after_exit(sandbox)  # taps a StartContainer killed before QEMU started left behind

    def _is_ours(self, name: str) -> bool:
        """A virtlet domain is this virtletd's when its files live under our containers dir (or it carries no
        virtlet metadata at all, as a half-made domain may not).  Another virtletd with its own state dir on the
        same libvirt (tests, a second instance) keeps its domains."""
        dom = self.host.lookup(name)
        if dom is None:
            return False
        try:
            meta = designer.virtlet_metadata(dom.XMLDesc(0))
        except (libvirt.libvirtError, ValueError) as exc:
            log.warning("cannot read domain %s: %s", name, exc)
            return False
        overlay = (meta or {}).get("overlay", "")
        if not overlay:
            return True
        if Path(overlay).parent.parent == self.containers_dir:
            return True
        log.info("leaving domain %s alone: its files are under %s, not %s", name, overlay, self.containers_dir)
        return False

    def shutdown(self) -> None:
        """virtletd is stopping: flush the log writers; the VMs keep running."""
        for cid in list(self._writers):
            self._stop_log_writer(cid)


