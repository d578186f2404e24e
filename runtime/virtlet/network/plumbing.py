"""Idempotent link helpers on pyroute2: one function per operation, each safe to repeat.

Creating what exists and deleting what is gone both succeed; netlink errno values are mapped to a few named
exceptions (all ``virtlet.errors`` types, so a CRI caller gets a sensible code); interface names are checked
against the kernel's 15-character limit before the kernel sees them.

``ns`` arguments are a network namespace *path* (``/var/run/netns/<id>``) or ``None`` for the host namespace.
pyroute2 is told never to create a namespace (``flags=0``): a missing namespace is an error here.
"""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute, NetlinkError, NetNS

from virtlet import errors
from virtlet.network import nssocket

IFNAMSIZ = 15

nssocket.install()  # no fork() inside virtletd's threads


class LinkNotFound(errors.NotFound):
    pass


class LinkExists(errors.AlreadyExists):
    pass


class NetnsNotFound(errors.NotFound):
    pass


class PlumbingError(errors.Internal):
    pass


def check_name(name: str) -> str:
    if not name or len(name) > IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise errors.InvalidArgument(
            f"interface name {name!r} is invalid (1..{IFNAMSIZ} chars, no '/' or spaces)")
    return name


def _map(exc: NetlinkError, what: str) -> errors.VirtletError:
    text = f"{what}: {os.strerror(exc.code) if exc.code else exc}"
    if exc.code == errno.ENODEV:
        return LinkNotFound(text)
    if exc.code == errno.EEXIST:
        return LinkExists(text)
    if exc.code in (errno.EPERM, errno.EACCES):
        return errors.PermissionDenied(text)
    return PlumbingError(text)


_sessions = threading.local()  # .cache: {ns or "": socket} of the innermost session() of this thread


@contextmanager
def session() -> Iterator[None]:
    """Reuse one netlink socket per namespace for every ``ipr`` call of this thread until the block ends.

    Opening a pyroute2 socket costs several ms (more for one in a pod namespace), and a pod's set-up or VM start
    makes a dozen calls: RunPodSandbox, StartContainer and StopPodSandbox run their steps in one session.
    Nested sessions share the outer one's sockets."""
    if getattr(_sessions, "cache", None) is not None:
        yield
        return
    _sessions.cache = {}
    try:
        yield
    finally:
        cache, _sessions.cache = _sessions.cache, None
        for sock in cache.values():
            sock.close()


def _open(ns: str | None) -> Any:
    if ns is None:
        return IPRoute()
    if not os.path.exists(ns):
        raise NetnsNotFound(f"network namespace {ns} does not exist")
    return NetNS(ns, flags=0)


@contextmanager
def ipr(ns: str | None = None) -> Iterator[Any]:
    """A netlink socket in the host namespace or in the namespace at path ``ns`` (the session's, when one is
    open: see ``session``)."""
    cache: dict[str, Any] | None = getattr(_sessions, "cache", None)
    if cache is None:
        sock = _open(ns)
        try:
            yield sock
        finally:
            sock.close()
        return
    key = ns or ""
    if key not in cache:
        cache[key] = _open(ns)
    elif ns is not None and not os.path.exists(ns):  # deleted during the session: as without one
        raise NetnsNotFound(f"network namespace {ns} does not exist")
    yield cache[key]


def _index(sock: Any, name: str) -> int | None:
    found = sock.link_lookup(ifname=check_name(name))
    return found[0] if found else None


def link_index(name: str, ns: str | None = None) -> int | None:
    with ipr(ns) as sock:
        return _index(sock, name)


def link_exists(name: str, ns: str | None = None) -> bool:
    return link_index(name, ns) is not None


def link_info(name: str, ns: str | None = None) -> dict[str, Any]:
    """mac, mtu, master ifindex (0 when none), kind and IPv4 addresses (CIDR) of a link."""
    with ipr(ns) as sock:
        idx = _index(sock, name)
        if idx is None:
            raise LinkNotFound(f"interface {name} not found in {ns or 'the host namespace'}")
        link = sock.get_links(idx)[0]
        linkinfo = link.get_attr("IFLA_LINKINFO")
        kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
        addrs = [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in sock.get_addr(index=idx, family=2)]
        return {"index": idx, "mac": link.get_attr("IFLA_ADDRESS"), "mtu": link.get_attr("IFLA_MTU"),
                "master": link.get_attr("IFLA_MASTER") or 0, "kind": kind, "ipv4": addrs}


def random_mac() -> str:
    """A random locally administered unicast MAC."""
    octets = [random.randint(0, 255) for _ in range(6)]
    octets[0] = (octets[0] & 0xFC) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def ensure_bridge(name: str, ns: str | None = None, mtu: int | None = None) -> None:
    """A bridge named ``name`` exists and is up (an existing non-bridge link of that name is an error)."""
    with ipr(ns) as sock:
        idx = _index(sock, name)
        if idx is None:
            try:
                sock.link("add", ifname=name, kind="bridge")
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise _map(exc, f"cannot create bridge {name}") from exc
            idx = _index(sock, name)
        attrs: dict[str, Any] = {"state": "up"}
        if mtu:
            attrs["mtu"] = mtu
        try:
            sock.link("set", index=idx, **attrs)
        except NetlinkError as exc:
            raise _map(exc, f"cannot bring up bridge {name}") from exc


def ensure_tap(name: str, ns: str | None = None) -> None:
    """A persistent tap named ``name`` exists (it outlives QEMU; :func:`delete_link` removes it)."""
    with ipr(ns) as sock:
        if _index(sock, name) is not None:
            return
        try:
            sock.link("add", ifname=name, kind="tuntap", mode="tap")
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise _map(exc, f"cannot create tap {name}") from exc


def delete_link(name: str, ns: str | None = None) -> None:
    """Delete a link; a missing link (or a missing namespace) is success."""
    if ns is not None and not os.path.exists(ns):
        return
    with ipr(ns) as sock:
        idx = _index(sock, name)
        if idx is None:
            return
        try:
            sock.link("del", index=idx)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:
                raise _map(exc, f"cannot delete {name}") from exc


def move_to_netns(name: str, target_ns: str, ns: str | None = None) -> None:
    """Move link ``name`` from ``ns`` into ``target_ns``; a link already in the target is success."""
    check_name(name)
    if link_exists(name, target_ns):
        return
    with ipr(ns) as sock:
        idx = _index(sock, name)
        if idx is None:
            raise LinkNotFound(
                f"interface {name} is neither in {ns or 'the host namespace'} nor in {target_ns}")
        fd = os.open(target_ns, os.O_RDONLY)
        try:
            sock.link("set", index=idx, net_ns_fd=fd)
        except NetlinkError as exc:
            raise _map(exc, f"cannot move {name} into {target_ns}") from exc
        finally:
            os.close(fd)


def set_link(name: str, ns: str | None = None, *, mac: str | None = None, mtu: int | None = None,
             master: str | None = None, up: bool | None = None) -> None:
    """Set attributes of a link (MAC changes take the link down and up again around the change)."""
    with ipr(ns) as sock:
        idx = _index(sock, name)
        if idx is None:
            raise LinkNotFound(f"interface {name} not found in {ns or 'the host namespace'}")
        try:
            if mac is not None:
                current = sock.get_links(idx)[0].get_attr("IFLA_ADDRESS")
                if current.lower() != mac.lower():
                    was_up = bool(sock.get_links(idx)[0]["flags"] & 1)
                    sock.link("set", index=idx, state="down")
                    sock.link("set", index=idx, address=mac)
                    if was_up and up is None:
                        sock.link("set", index=idx, state="up")
            if mtu is not None:
                sock.link("set", index=idx, mtu=mtu)
            if master is not None:
                midx = _index(sock, master)
                if midx is None:
                    raise LinkNotFound(f"bridge {master} not found in {ns or 'the host namespace'}")
                sock.link("set", index=idx, master=midx)
            if up is not None:
                sock.link("set", index=idx, state="up" if up else "down")
        except NetlinkError as exc:
            raise _map(exc, f"cannot configure {name}") from exc


def flush_ipv4(name: str, ns: str | None = None) -> None:
    """Remove every IPv4 address of a link (its routes go with them)."""
    with ipr(ns) as sock:
        idx = _index(sock, name)
        if idx is None:
            raise LinkNotFound(f"interface {name} not found in {ns or 'the host namespace'}")
        for addr in sock.get_addr(index=idx, family=2):
            try:
                sock.addr("del", index=idx, address=addr.get_attr("IFA_ADDRESS"), prefixlen=addr["prefixlen"])
            except NetlinkError as exc:
                if exc.code != errno.EADDRNOTAVAIL:
                    raise _map(exc, f"cannot remove an address of {name}") from exc


def flush_ipv6_global(name: str, ns: str | None = None) -> None:
    """Remove the global IPv6 addresses of a link (the link-local one stays: it is the bridge port's own)."""
    with ipr(ns) as sock:
        idx = _index(sock, name)
        if idx is None:
            raise LinkNotFound(f"interface {name} not found in {ns or 'the host namespace'}")
        for addr in sock.get_addr(index=idx, family=10):
            if addr["scope"] != 0:  # RT_SCOPE_UNIVERSE only
                continue
            try:
                sock.addr("del", index=idx, address=addr.get_attr("IFA_ADDRESS"), prefixlen=addr["prefixlen"])
            except NetlinkError as exc:
                if exc.code != errno.EADDRNOTAVAIL:
                    raise _map(exc, f"cannot remove an address of {name}") from exc


def list_links(prefix: str = "", ns: str | None = None) -> list[str]:
    """Names of the links in a namespace starting with ``prefix`` (a missing namespace has none)."""
    if ns is not None and not os.path.exists(ns):
        return []
    with ipr(ns) as sock:
        names = [link.get_attr("IFLA_IFNAME") for link in sock.get_links()]
    return sorted(n for n in names if n and n.startswith(prefix))


def link_counters(name: str, ns: str | None = None) -> dict[str, int]:
    """rx/tx byte and error counters of a link (the kernel's 64-bit ``IFLA_STATS64``).

    Read over netlink, not from ``/sys/class/net``: sysfs shows the links of the namespace that *mounted* it, so
    even a thread that entered the pod netns would read the host's counters there."""
    with ipr(ns) as sock:
        idx = _index(sock, name)
        if idx is None:
            raise LinkNotFound(f"interface {name} not found in {ns or 'the host namespace'}")
        link = sock.get_links(idx)[0]
        stats = link.get_attr("IFLA_STATS64") or link.get_attr("IFLA_STATS")
        if stats is None:
            raise PlumbingError(f"the kernel gave no counters for {name} in {ns or 'the host namespace'}")
        return {key: int(stats[key]) for key in ("rx_bytes", "rx_errors", "tx_bytes", "tx_errors")}
