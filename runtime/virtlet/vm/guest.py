"""One libvirt domain, as the VM manager uses it (nova's ``Guest`` pattern).

The VM manager never touches ``libvirt.virDomain`` nor ``libvirt.libvirtError``: it asks ``lookup``/``define`` for
a ``Guest`` and calls its verbs.  libvirt's errors are mapped to virtlet's error vocabulary here, once:

- ``start``, ``shutdown``, ``destroy``, ``undefine`` and ``xml`` raise ``errors.Internal`` with libvirt's message
  (the caller decides whether a failure matters: e.g. a refused ACPI shutdown is followed by a destroy);
- ``is_active`` answers False when libvirt cannot say (a domain that vanished under us is not running);
- ``exit_reason`` is None while the domain runs (or is paused), else why it is off.

A domain event (``libvirt_host.DomainEvent``) is turned into the same ``ExitReason`` by ``exit_of_event``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import libvirt

from virtlet import errors
from virtlet.vm import agent_transport
from virtlet.vm import guest_agent as ga
from virtlet.vm import libvirt_host as lh


@dataclass(frozen=True)
class ExitReason:
    """Why a domain is off.  ``powered_off``: the guest shut itself down (a clean exit); otherwise QEMU was
    killed, crashed, or the domain was destroyed, and ``description`` says which (libvirt's reason, in words)."""

    powered_off: bool
    description: str


def exit_of_event(ev: lh.DomainEvent) -> ExitReason | None:
    """The exit a lifecycle event reports, or None when the event is not a stop."""
    if ev.event != lh.STOPPED:
        return None
    return ExitReason(powered_off=ev.detail == libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN,
                      description=lh.describe_stopped_detail(ev.detail))


_OFF_STATES = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)


class Guest:
    """A wrapper of one ``libvirt.virDomain``."""

    def __init__(self, dom: Any) -> None:
        self._dom = dom

    @property
    def name(self) -> str:
        return str(self._dom.name())

    def is_active(self) -> bool:
        try:
            return bool(self._dom.isActive())
        except libvirt.libvirtError:
            return False

    def exit_reason(self) -> ExitReason | None:
        """None while the domain runs; why it is off otherwise."""
        try:
            state, reason = self._dom.state()
        except libvirt.libvirtError as exc:
            raise errors.Internal(f"libvirt cannot tell the state of domain {self.name}: {exc}") from exc
        if state not in _OFF_STATES:
            return None
        return ExitReason(powered_off=reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN,
                          description=lh.describe_shutoff_reason(reason))

    def start(self) -> None:
        try:
            self._dom.create()
        except libvirt.libvirtError as exc:
            raise errors.Internal(f"libvirt could not start the VM: {exc}") from exc

    def shutdown(self) -> None:
        """Press the ACPI power button (the guest decides whether and when to go down)."""
        try:
            self._dom.shutdown()
        except libvirt.libvirtError as exc:
            raise errors.Internal(f"libvirt refused the ACPI shutdown: {exc}") from exc

    def destroy(self) -> None:
        """Kill QEMU at once."""
        try:
            self._dom.destroy()
        except libvirt.libvirtError as exc:
            raise errors.Internal(f"libvirt could not destroy the VM: {exc}") from exc

    def undefine(self) -> None:
        """Undefine with its NVRAM and managed save; a driver that does not know those flags (libvirt's test
        driver, which the CRI fuzzer uses) gets a plain undefine: the VM then has neither."""
        try:
            try:
                self._dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() not in (libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_INVALID_ARG):
                    raise
                self._dom.undefine()
        except libvirt.libvirtError as exc:
            raise errors.Internal(f"libvirt could not undefine the VM: {exc}") from exc

    def _affect(self) -> int:
        """libvirt flags for a change: the running VM and its definition, or only the definition when it is off."""
        live = libvirt.VIR_DOMAIN_AFFECT_LIVE if self.is_active() else 0
        return int(live | libvirt.VIR_DOMAIN_AFFECT_CONFIG)

    def set_memory(self, kib: int) -> None:
        """Set the balloon target (the guest's usable memory) to ``kib``, at most the domain's ``<memory>``."""
        try:
            self._dom.setMemoryFlags(kib, self._affect())
        except libvirt.libvirtError as exc:
            raise errors.Internal(f"libvirt could not set the VM's memory: {exc}") from exc

    def set_vcpus(self, count: int) -> None:
        """Hot-plug vCPUs up to ``count`` (at most the domain's maximum) in the running VM and its definition."""
        try:
            self._dom.setVcpusFlags(count, self._affect())
        except libvirt.libvirtError as exc:
            raise errors.Internal(f"libvirt could not set the VM's vCPUs to {count}: {exc}") from exc

    def set_cpu_tune(self, params: dict[str, int]) -> None:
        """Scheduler parameters (``cpu_shares``, ``global_quota``, ``global_period``) of the whole VM."""
        try:  # libvirt takes the live and the persistent change one at a time here
            if self.is_active():
                self._dom.setSchedulerParametersFlags(params, libvirt.VIR_DOMAIN_AFFECT_LIVE)
            self._dom.setSchedulerParametersFlags(params, libvirt.VIR_DOMAIN_AFFECT_CONFIG)
        except libvirt.libvirtError as exc:
            raise errors.Internal(f"libvirt could not set the VM's CPU parameters: {exc}") from exc

    def set_cpu_pinning(self, host_cpus: frozenset[int], node_cpus: int, max_vcpus: int) -> None:
        """Pin every vCPU (up to ``max_vcpus``, the hot-pluggable ones too) and QEMU's emulator threads to
        ``host_cpus``, in the running VM and its definition (what ``<vcpu cpuset=...>`` does at create)."""
        cpumap = tuple(cpu in host_cpus for cpu in range(node_cpus))
        try:
            flags = self._affect()
            for vcpu in range(max_vcpus):
                self._dom.pinVcpuFlags(vcpu, cpumap, flags)
            self._dom.pinEmulator(cpumap, flags)
        except libvirt.libvirtError as exc:
            raise errors.Internal(f"libvirt could not pin the VM to host CPUs: {exc}") from exc

    def xml(self) -> str:
        try:
            return str(self._dom.XMLDesc(0))
        except libvirt.libvirtError as exc:
            raise errors.Internal(f"libvirt cannot describe domain {self.name}: {exc}") from exc

    def agent_transport(self) -> ga.Transport:
        """The QEMU guest agent of this domain (``virtlet.vm.guest_agent``)."""
        return agent_transport.libvirt_transport(self._dom)


def lookup(host: lh.LibvirtHost, name: str) -> Guest | None:
    """The guest called ``name``, or None when libvirt has no such domain (``errors.Unavailable`` when libvirt
    cannot be asked)."""
    dom = host.lookup(name)
    return Guest(dom) if dom is not None else None


def define(host: lh.LibvirtHost, xml: str) -> Guest:
    """Define (not start) a domain; ``errors.Internal`` when libvirt refuses the XML."""
    return Guest(host.define(xml))
