"""The one fake libvirt of the unit tests: a connection and its domains, in memory, with the behaviours virtlet uses
(``vm/libvirt_host.py``, ``vm/guest.py``, ``vm/stats.py``) and failures a test can inject.

Use it through the real wrapper::

    conn = FakeConnection()
    host = LibvirtHost("fake:///", open_connection=conn.open)

Domain state follows libvirt: ``create`` runs a defined domain, ``shutdown`` presses the ACPI button (the guest
powers off at once unless ``acpi_ignored``), ``destroy`` kills QEMU, ``crash`` is QEMU killed behind libvirt's back,
``power_off`` the guest shutting itself down.  Each stop sends libvirt's lifecycle event (STOPPED with the detail
libvirt would give) to the registered callbacks synchronously, from the calling thread.

Failures: ``dom.fail["create"] = FakeLibvirtError(...)`` makes every later ``create`` raise it (until deleted);
``conn.fail["lookupByName"]`` does the same for connection calls.  ``conn.undefine_flags_supported = False`` is a
driver (as libvirt's test driver) that refuses the NVRAM/managed-save undefine flags.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

import libvirt


class FakeLibvirtError(libvirt.libvirtError):
    """A ``libvirt.libvirtError`` with a given error code (the real constructor reads libvirt's thread-local
    last error instead)."""

    def __init__(self, message: str, code: int = libvirt.VIR_ERR_INTERNAL_ERROR) -> None:
        Exception.__init__(self, message)
        self.err = (code, libvirt.VIR_FROM_DOMAIN, message, libvirt.VIR_ERR_ERROR, None, None, None, -1, -1)


def no_domain(name: str) -> FakeLibvirtError:
    return FakeLibvirtError(f"Domain not found: no domain with matching name '{name}'", libvirt.VIR_ERR_NO_DOMAIN)


def not_running(name: str) -> FakeLibvirtError:
    return FakeLibvirtError(f"Requested operation is not valid: domain '{name}' is not running",
                            libvirt.VIR_ERR_OPERATION_INVALID)


class FakeDomain:
    def __init__(self, conn: FakeConnection | None = None, name: str = "", xml: str = "") -> None:
        """A domain of ``conn`` (or one that ``conn.add_domain(name, dom=...)`` adds later)."""
        self.conn: FakeConnection = conn  # type: ignore[assignment]
        self._name = name
        self.xml = xml
        self.state_reason = (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN)
        self.fail: dict[str, libvirt.libvirtError] = {}
        self.acpi_ignored = False
        self.calls: list[str] = []
        # stats (vm/stats.py)
        self.cpu_ns = 0
        self.rss_kib = 150_000
        self.actual_kib = 262_144
        self.cgroup = True
        self.block = {"block.count": 1, "block.0.rd.bytes": 4096, "block.0.rd.reqs": 2, "block.0.wr.bytes": 512,
                      "block.0.wr.reqs": 1}

    # -- helpers ----------------------------------------------------------------------------------------
    def _call(self, method: str) -> None:
        self.calls.append(method)
        if method in self.fail:
            raise self.fail[method]
        if self._name not in self.conn.domains or self.conn.domains[self._name] is not self:
            raise no_domain(self._name)

    def _running(self) -> bool:
        return self.state_reason[0] == libvirt.VIR_DOMAIN_RUNNING

    def _stop(self, reason: int, detail: int) -> None:
        self.state_reason = (libvirt.VIR_DOMAIN_SHUTOFF, reason)
        self.conn.emit(self, libvirt.VIR_DOMAIN_EVENT_STOPPED, detail)

    # -- what a test does to a running VM -----------------------------------------------------------------
    def crash(self) -> None:
        """QEMU was killed (OOM killer, kill -9): libvirt notices the process is gone."""
        assert self._running(), f"{self._name} is not running"
        self._stop(libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED)

    def power_off(self) -> None:
        """The guest shut itself down (``poweroff`` inside the VM)."""
        assert self._running(), f"{self._name} is not running"
        self._stop(libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)

    def vanish_silently(self, reason: int = libvirt.VIR_DOMAIN_SHUTOFF_CRASHED) -> None:
        """The VM went down while nobody listened (virtletd was dead): no event is sent."""
        self.state_reason = (libvirt.VIR_DOMAIN_SHUTOFF, reason)

    # -- libvirt.virDomain ------------------------------------------------------------------------------
    def name(self) -> str:
        return self._name

    def isActive(self) -> int:
        self._call("isActive")
        return int(self._running())

    def state(self) -> list[int]:
        self._call("state")
        return list(self.state_reason)

    def create(self) -> int:
        self._call("create")
        if self._running():
            raise FakeLibvirtError("Requested operation is not valid: domain is already running",
                                   libvirt.VIR_ERR_OPERATION_INVALID)
        self.state_reason = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
        self.conn.emit(self, libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED)
        return 0

    def shutdown(self) -> int:
        self._call("shutdown")
        if not self._running():
            raise not_running(self._name)
        if not self.acpi_ignored:
            self._stop(libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN)
        return 0

    def destroy(self) -> int:
        self._call("destroy")
        if not self._running():
            raise not_running(self._name)
        self._stop(libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED)
        return 0

    def undefineFlags(self, flags: int = 0) -> int:
        self._call("undefineFlags")
        if flags and not self.conn.undefine_flags_supported:
            raise FakeLibvirtError("this function is not supported by the connection driver: virDomainUndefineFlags",
                                   libvirt.VIR_ERR_NO_SUPPORT)
        self.conn.forget(self)
        return 0

    def setMemoryFlags(self, kib: int, flags: int = 0) -> int:
        self._call("setMemoryFlags")
        self.memory_set = (kib, flags)
        return 0

    def setVcpusFlags(self, count: int, flags: int = 0) -> int:
        self._call("setVcpusFlags")
        self.vcpus_set = getattr(self, "vcpus_set", []) + [(count, flags)]
        return 0

    def setSchedulerParametersFlags(self, params: dict[str, int], flags: int = 0) -> int:
        self._call("setSchedulerParametersFlags")
        self.sched_set = getattr(self, "sched_set", []) + [(dict(params), flags)]
        return 0

    def pinVcpuFlags(self, vcpu: int, cpumap: tuple[bool, ...], flags: int = 0) -> int:
        self._call("pinVcpuFlags")
        self.vcpus_pinned = {**getattr(self, "vcpus_pinned", {}), vcpu: (tuple(cpumap), flags)}
        return 0

    def pinEmulator(self, cpumap: tuple[bool, ...], flags: int = 0) -> int:
        self._call("pinEmulator")
        self.emulator_pinned = (tuple(cpumap), flags)
        return 0

    def undefine(self) -> int:
        self._call("undefine")
        self.conn.forget(self)
        return 0

    def XMLDesc(self, flags: int = 0) -> str:
        self._call("XMLDesc")
        return self.xml

    def getCPUStats(self, total: bool) -> list[dict[str, int]]:
        self._call("getCPUStats")
        if not self._running():
            raise not_running(self._name)
        if not self.cgroup:
            raise FakeLibvirtError("Operation not supported: cgroup CPUACCT controller is not mounted",
                                   libvirt.VIR_ERR_OPERATION_UNSUPPORTED)
        return [{"cpu_time": self.cpu_ns, "user_time": 0, "system_time": 0}]

    def memoryStats(self) -> dict[str, int]:
        self._call("memoryStats")
        if not self._running():
            raise not_running(self._name)
        return {"actual": self.actual_kib, "rss": self.rss_kib, "last_update": 0}

    def connect(self) -> FakeConnection:
        return self.conn

    def info(self) -> list[int]:
        self._call("info")
        state = self.state_reason[0]
        return [state, self.actual_kib, self.actual_kib, 1, self.cpu_ns if self._running() else 0]


_NAME = re.compile(r"<name>([^<]+)</name>")


class FakeConnection:
    """A libvirt connection (``libvirt.virConnect``) with its domains."""

    def domainListGetStats(self, doms: list[FakeDomain], stats: int = 0) -> list[tuple[FakeDomain, dict[str, int]]]:
        return [(d, dict(d.block)) for d in doms if d._running()]

    def __init__(self) -> None:
        self.domains: dict[str, FakeDomain] = {}
        self.fail: dict[str, libvirt.libvirtError] = {}
        self.undefine_flags_supported = True
        self.alive = True
        self.opened = 0
        self._callbacks: dict[int, tuple[Callable[..., Any], Any]] = {}
        self._next_id = 1
        self._lock = threading.Lock()

    def open(self, uri: str) -> FakeConnection:
        """The ``open_connection`` of ``LibvirtHost``."""
        if "open" in self.fail:
            raise self.fail["open"]
        self.opened += 1
        self.alive = True
        return self

    def _call(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    # -- test helpers ---------------------------------------------------------------------------------
    def add_domain(self, name: str, xml: str = "", running: bool = False, dom: FakeDomain | None = None) -> FakeDomain:
        """A domain that exists already (made by an earlier virtletd, or by someone else)."""
        if dom is None:
            dom = FakeDomain()
        dom.conn, dom._name, dom.xml = self, name, xml or dom.xml or f"<domain><name>{name}</name></domain>"
        if running:
            dom.state_reason = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
        self.domains[name] = dom
        return dom

    def forget(self, dom: FakeDomain) -> None:
        """Undefined.  (libvirt keeps a running domain as a transient one until it stops; virtlet always destroys
        first, so the fake simply drops it.)"""
        self.domains.pop(dom.name(), None)

    def emit(self, dom: FakeDomain, event: int, detail: int) -> None:
        for callback, opaque in list(self._callbacks.values()):
            callback(self, dom, event, detail, opaque)

    # -- libvirt.virConnect -----------------------------------------------------------------------------
    def isAlive(self) -> int:
        return int(self.alive)

    def setKeepAlive(self, interval: int, count: int) -> int:
        return 0

    def getLibVersion(self) -> int:
        self._call("getLibVersion")
        return 9_000_000

    def domainEventRegisterAny(self, dom: Any, event_id: int, callback: Callable[..., Any],
                               opaque: Any) -> int:
        assert event_id == libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE
        with self._lock:
            cid = self._next_id
            self._next_id += 1
            self._callbacks[cid] = (callback, opaque)
        return cid

    def domainEventDeregisterAny(self, callback_id: int) -> int:
        self._callbacks.pop(callback_id, None)
        return 0

    def registerCloseCallback(self, callback: Callable[..., Any], opaque: Any) -> int:
        return 0

    def close(self) -> int:
        self.alive = False
        return 0

    def lookupByName(self, name: str) -> FakeDomain:
        self._call("lookupByName")
        try:
            return self.domains[name]
        except KeyError:
            raise no_domain(name) from None

    def defineXML(self, xml: str) -> FakeDomain:
        self._call("defineXML")
        match = _NAME.search(xml)
        if match is None:
            raise FakeLibvirtError("XML error: missing domain name", libvirt.VIR_ERR_XML_ERROR)
        name = match.group(1)
        dom = self.domains.get(name)
        if dom is None:
            dom = self.domains[name] = FakeDomain(self, name, xml)
        else:
            dom.xml = xml
        return dom

    def listAllDomains(self, flags: int = 0) -> list[FakeDomain]:
        self._call("listAllDomains")
        return list(self.domains.values())

    def getMaxVcpus(self, kind: str) -> int:
        return 8
