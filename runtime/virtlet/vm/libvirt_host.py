"""A thin wrapper around the libvirt connection: reconnects, lifecycle events, domain state.

libvirt's event loop runs in one daemon thread; lifecycle callbacks are handed to the subscriber (the VM manager)
as ``DomainEvent`` values, so a QEMU that dies is noticed at once, without polling.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import libvirt

from virtlet import errors

log = logging.getLogger(__name__)

_event_loop_started = False
_event_loop_lock = threading.Lock()


def _ensure_event_loop() -> None:
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # pragma: no cover - keep the loop alive
                    log.exception("libvirt event loop iteration failed")

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


# silence libvirt's default error printer: errors reach us as exceptions
libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


@dataclass(frozen=True)
class DomainEvent:
    name: str
    event: int
    detail: int


STOPPED = libvirt.VIR_DOMAIN_EVENT_STOPPED

_SHUTOFF_REASONS = {
    libvirt.VIR_DOMAIN_SHUTOFF_UNKNOWN: "unknown",
    libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN: "guest shut down",
    libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_SHUTOFF_CRASHED: "QEMU crashed or was killed",
    libvirt.VIR_DOMAIN_SHUTOFF_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_SHUTOFF_SAVED: "saved",
    libvirt.VIR_DOMAIN_SHUTOFF_FAILED: "failed to start",
    libvirt.VIR_DOMAIN_SHUTOFF_FROM_SNAPSHOT: "reverted to snapshot",
}
_STOPPED_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "guest shut down",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "QEMU crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "QEMU process ended unexpectedly (killed or crashed)",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "reverted to snapshot",
}


def describe_shutoff_reason(reason: int) -> str:
    return _SHUTOFF_REASONS.get(reason, f"reason {reason}")


def describe_stopped_detail(detail: int) -> str:
    return _STOPPED_DETAILS.get(detail, f"detail {detail}")


class LibvirtHost:
    """One libvirt connection, reopened on demand after libvirtd restarts."""

    def __init__(self, uri: str, open_connection: Callable[[str], libvirt.virConnect] | None = None) -> None:
        """``open_connection`` replaces ``libvirt.open`` (the unit tests' fake libvirt, ``tests/fakes/libvirt.py``);
        with it, libvirt's own event loop is not started: the fake delivers its events itself."""
        self.uri = uri
        self._open = open_connection
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.RLock()
        self._subscribers: list[Callable[[DomainEvent], None]] = []
        self._callback_id: int | None = None
        self.last_error = ""

    # -- connection -----------------------------------------------------------------------------------
    def connect(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                self._conn = None
            try:
                if self._open is not None:
                    conn = self._open(self.uri)
                else:
                    _ensure_event_loop()
                    conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                self.last_error = str(exc)
                raise errors.Unavailable(f"cannot connect to libvirt at {self.uri}: {exc}") from exc
            try:
                conn.setKeepAlive(5, 3)
            except libvirt.libvirtError:  # local drivers (test:///) have no keepalive
                pass
            self._callback_id = conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None)
            conn.registerCloseCallback(self._on_close, None)
            self._conn = conn
            self.last_error = ""
            log.info("connected to libvirt at %s", self.uri)
            return conn

    def alive(self) -> tuple[bool, str]:
        """(connected?, message) for the Status RPC's RuntimeReady condition."""
        try:
            conn = self.connect()
            conn.getLibVersion()
            return True, ""
        except errors.Unavailable as exc:
            return False, str(exc)
        except libvirt.libvirtError as exc:
            with self._lock:
                self._conn = None
            return False, f"libvirt at {self.uri} does not answer: {exc}"

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._callback_id is not None:
                        self._conn.domainEventDeregisterAny(self._callback_id)
                    self._conn.close()
                except libvirt.libvirtError:
                    pass
                self._conn = None

    def _on_close(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        log.warning("libvirt connection closed (reason %d); will reconnect", reason)
        with self._lock:
            self._conn = None

    # -- events ---------------------------------------------------------------------------------------
    def subscribe(self, callback: Callable[[DomainEvent], None]) -> None:
        self._subscribers.append(callback)

    def _on_lifecycle(self, _conn: libvirt.virConnect, dom: libvirt.virDomain, event: int, detail: int,
                      _opaque: object) -> None:
        ev = DomainEvent(name=dom.name(), event=event, detail=detail)
        for callback in list(self._subscribers):
            try:
                callback(ev)
            except Exception:
                log.exception("domain event handler failed for %s", ev)

    # -- domains --------------------------------------------------------------------------------------
    def lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.connect().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise errors.Unavailable(f"libvirt lookup of domain {name} failed: {exc}") from exc

    def define(self, xml: str) -> libvirt.virDomain:
        try:
            return self.connect().defineXML(xml)
        except libvirt.libvirtError as exc:
            raise errors.Internal(f"libvirt refused the domain definition: {exc}") from exc

    def domain_names(self) -> list[str]:
        conn = self.connect()
        return [d.name() for d in conn.listAllDomains()]

    def capabilities_max_vcpus(self) -> int:
        try:
            return int(self.connect().getMaxVcpus("qemu"))
        except libvirt.libvirtError:
            return 1
