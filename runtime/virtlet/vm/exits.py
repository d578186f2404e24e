"""How a VM's exit becomes its container's state: libvirt's lifecycle events (a QEMU that dies is noticed at
once) and the reconciliation of a RUNNING record with the domain (after a start, and at start-up recovery).

Exit codes (as containerd reports a container's; docs/vm-pods.md "Exit codes"): guest powered off -> 0
``Completed``; stopped by StopContainer and off within the grace period -> 0 ``Completed``; still on at the end of
the grace period and destroyed -> 137 ``Error`` (containerd's code for a SIGKILL) with a message saying so; QEMU
killed or crashed (or the domain destroyed behind our back) -> 1 ``Error`` with libvirt's reason in the message.
A guest that powered off (by itself, or on StopContainer's ACPI press within the grace period, as a process that
handles SIGTERM reports its own code to containerd) after writing ``exit-code N`` to its ``cloud.virtlet.exit``
port reports N instead of 0 (``virtlet.vm.guest_exit``): 0 ``Completed``, other ``Error``.
"""

from __future__ import annotations

import threading

from virtlet.state import store as st
from virtlet.vm import guest as gu
from virtlet.vm import guest_exit
from virtlet.vm import libvirt_host as lh
from virtlet.vm.base import EXIT_ERROR, EXIT_KILLED, EXIT_OK, VmBase


class VmExits(VmBase):
    # -- state from libvirt ---------------------------------------------------------------------------
    def _on_event(self, ev: lh.DomainEvent) -> None:
        cid = self._cid_of_domain(ev.name)
        exit_reason = gu.exit_of_event(ev)
        if cid is None or exit_reason is None:
            return
        threading.Thread(target=self._handle_stopped, args=(cid, exit_reason), daemon=True,
                         name=f"exit-{cid[:8]}").start()

    def _handle_stopped(self, cid: str, exit_reason: gu.ExitReason) -> None:
        with self._exited:
            self._exited.notify_all()
        with self._lock(cid):
            rec = self.store.get_container(cid)
            if rec is None or rec.state != st.CONTAINER_RUNNING:
                return
            if cid in self._stop_requested:
                return  # StopContainer/RemoveContainer record the outcome themselves
            code, reason, message = self._exit_status(rec, exit_reason)
            if rec.extra.get("stop_requested"):  # a StopContainer of an earlier virtletd was under way
                code, reason, message = self._stopped_status(rec)
            self._mark_exited(cid, code, reason, message)
            sandbox = self.store.get_sandbox(rec.sandbox_id)
            if sandbox is not None:
                self.parts.after_exit(sandbox)

    def _exit_status(self, rec: st.ContainerRecord, exit_reason: gu.ExitReason) -> tuple[int, str, str]:
        """(exit code, reason, message) of a VM that went down by itself."""
        if exit_reason.powered_off:
            return self._guest_reported(rec) or (EXIT_OK, "Completed", "the guest powered off")
        return EXIT_ERROR, "Error", f"the VM stopped: {exit_reason.description}"

    def _guest_reported(self, rec: st.ContainerRecord) -> tuple[int, str, str] | None:
        """The exit code the guest wrote to its ``cloud.virtlet.exit`` port before powering off, if any."""
        code = guest_exit.read_reported(guest_exit.exit_file(self.container_dir(rec.id)), rec.name)
        if code is None:
            return None
        message = f"the guest reported exit code {code} (on its {guest_exit.CHANNEL_NAME} port) and powered off"
        return code, "Completed" if code == 0 else "Error", message

    def _stopped_status(self, rec: st.ContainerRecord) -> tuple[int, str, str]:
        """(exit code, reason, message) of a VM StopContainer stopped: off within the grace period -> 0 (or the
        code the guest reported), destroyed at its end (``extra["stop_destroying"]``, recorded before the destroy
        so a restarted virtletd knows) -> 137 whatever the guest wrote."""
        grace = rec.extra.get("stop_destroying")
        if grace is None:
            return self._guest_reported(rec) or (EXIT_OK, "Completed", "stopped by StopContainer")
        return (EXIT_KILLED, "Error", f"the guest did not power off within StopContainer's grace period of {grace}s "
                "after the ACPI power button; the VM was destroyed (exit code 137, as for a SIGKILL)")

    def _reconcile(self, cid: str) -> None:
        """Make a RUNNING record agree with libvirt (after start, and at start-up recovery)."""
        rec = self.store.get_container(cid)
        if rec is None or rec.state != st.CONTAINER_RUNNING:
            return
        guest = self._guest(cid)
        if guest is None:
            code, why, message = EXIT_ERROR, "Error", "the VM's libvirt domain disappeared"
        else:
            exit_reason = guest.exit_reason()
            if exit_reason is None:
                return
            code, why, message = self._exit_status(rec, exit_reason)
        if rec.extra.get("stop_requested"):  # a StopContainer (or Remove) was under way: its outcome
            code, why, message = self._stopped_status(rec)
        self._mark_exited(cid, code, why, message)
        sandbox = self.store.get_sandbox(rec.sandbox_id)
        if sandbox is not None:
            self.parts.after_exit(sandbox)  # the taps of a VM that is gone

