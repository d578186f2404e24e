"""VM containers: CreateContainer/Start/Stop/Remove/Status as domain operations on libvirt domains.

One VM per sandbox.  Files of a container live in ``<state_dir>/containers/<id>/`` (root overlay, config drive,
raw console log, log-writer state); its console socket in ``<run_dir>/console/<id>.sock``.  The record is
committed first and deleted last, so start-up recovery can always tell what is ours: a domain or directory that
belongs to no record is removed.

Exit codes: see ``virtlet.vm.exits`` (0 ``Completed`` for a guest that powered off, also on StopContainer; 137
``Error`` for a VM destroyed at the end of StopContainer's grace period; 1 ``Error`` for a QEMU that died).

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
  virtletd was dead is reported as stopped by StopContainer (0 ``Completed``), as without the crash; it records
  ``extra["stop_destroying"]`` before destroying a VM still on at the end of the grace period (137).
"""

from __future__ import annotations

from pathlib import Path

from virtlet import errors, preconditions
from virtlet.state import store as st
from virtlet.vm import guest_agent as ga
from virtlet.vm import libvirt_host as lh
from virtlet.vm import stats as vmstats
from virtlet.vm.base import EXIT_ERROR, EXIT_KILLED, EXIT_OK, ContainerSpec, ResourceUpdate, VmParts
from virtlet.vm.recovery import VmRecovery

__all__ = ["EXIT_ERROR", "EXIT_KILLED", "EXIT_OK", "ContainerSpec", "ResourceUpdate", "VmManager", "VmParts"]


class VmManager(VmRecovery):
    """The one entry point of VM containers (the CRI servicers, the daemon and the streaming backend use it).
    Its jobs live in the modules it is built from: ``base`` (shared state, helpers), ``exits`` (exit events,
    reconciliation), ``lifecycle`` (Create/Start/Stop/Remove), ``recovery`` (start-up recovery); the queries are
    here."""

    def __init__(self, store: st.StateStore, host: lh.LibvirtHost, parts: VmParts, state_dir: Path,
                 run_dir: Path) -> None:
        super().__init__(store, host, parts, state_dir, run_dir)
        host.subscribe(self._on_event)

    def reopen_log(self, cid: str) -> None:
        rec = self.store.require_container(cid)
        preconditions.container_running("ReopenContainerLog", cid, rec.state)
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
        guest = self._guest(cid)
        active = guest is not None and guest.is_active()
        if guest is None or not active:
            raise errors.FailedPrecondition(f"VM pod {pod}: the VM of container {cid} is not running")
        return ga.GuestAgent(guest.agent_transport(), pod, running=guest.is_active)

    def domain_xml(self, cid: str) -> str:
        guest = self._guest(cid)
        return guest.xml() if guest is not None else ""


    def shutdown(self) -> None:
        """virtletd is stopping: flush the log writers; the VMs keep running."""
        for cid in list(self._writers):
            self._stop_log_writer(cid)


