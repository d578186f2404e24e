"""Resource usage of VM containers and their pod sandboxes, sampled from libvirt, files and netlink.

The CRI stats RPCs (the kubelet's summary API, ``kubectl top``) want cgroup-like numbers; a VM pod has none of
its own, so this module maps what the host can see of a VM onto them and returns plain dataclasses (the CRI
servicer turns them into protobuf).  What each number means:

- cpu ``usage_core_nano_seconds``: the domain's total CPU time (libvirt ``getCPUStats(True)`` ``cpu_time``: all
  vCPU threads plus QEMU's own threads), falling back to ``info()``'s cpuTime where the cgroup counter is missing.
- cpu ``usage_nano_cores``: the rate between this sample and the previous one of the same container, kept in
  memory here; absent on a container's first sample (and after its counter went backwards).
- memory: libvirt's memory stats are KiB.  ``rss`` is the resident size of the QEMU process: what the host pays
  for the VM (touched guest RAM plus QEMU's overhead), so it is ``rss_bytes``, ``usage_bytes`` and
  ``working_set_bytes`` alike (anonymous memory: there is no page cache to subtract).  ``actual`` is the
  configured (balloon) size; ``available_bytes`` = ``actual - rss`` (0 when QEMU's overhead made rss larger),
  the same "limit minus working set" a cgroup would report.
- writable layer: the directory holding the VM's overlay is the "filesystem"; ``used_bytes`` is what the
  container's qcow2 overlay and cloud-init ISO occupy on disk (``st_blocks * 512``, not their apparent size);
  ``inodes_used`` counts those files.
- disk I/O: libvirt's bulk block stats (``VIR_DOMAIN_STATS_BLOCK``) summed over every disk of the domain (root
  overlay, config drive, volumes): bytes and requests read and written since QEMU started (they restart at 0
  when the VM restarts, as a counter of a new container would).
- sandbox network: the counters of the CNI interface (``eth0``) in the pod netns, read over netlink (see
  ``plumbing.link_counters``).  Everything the VM sends or receives off-pod passes that interface.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from virtlet import errors
from virtlet.state import store as st

log = logging.getLogger(__name__)

KIB = 1024
_GONE_STATES = (libvirt.VIR_DOMAIN_NOSTATE, libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED)


@dataclass(frozen=True)
class CpuSample:
    timestamp: int  # ns since the epoch
    usage_core_nano_seconds: int
    usage_nano_cores: int | None  # None: no earlier sample to compute a rate from


@dataclass(frozen=True)
class MemorySample:
    timestamp: int
    working_set_bytes: int
    usage_bytes: int
    rss_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class FsSample:
    timestamp: int
    mountpoint: str
    used_bytes: int
    inodes_used: int


@dataclass(frozen=True)
class DiskSample:
    timestamp: int
    read_bytes: int
    reads: int
    write_bytes: int
    writes: int


@dataclass(frozen=True)
class ContainerSample:
    record: st.ContainerRecord
    writable_layer: FsSample
    cpu: CpuSample | None = None  # None: not running, or its domain vanished while sampling
    memory: MemorySample | None = None
    disk: DiskSample | None = None  # None: as cpu, or libvirt has no block stats for the domain


@dataclass(frozen=True)
class InterfaceSample:
    name: str
    rx_bytes: int
    rx_errors: int
    tx_bytes: int
    tx_errors: int


@dataclass(frozen=True)
class NetworkSample:
    timestamp: int
    default_interface: InterfaceSample


@dataclass(frozen=True)
class SandboxSample:
    record: st.SandboxRecord
    cpu: CpuSample | None = None
    memory: MemorySample | None = None
    network: NetworkSample | None = None
    containers: list[ContainerSample] = field(default_factory=list)


class _DomainGone(Exception):
    pass


def _default_link_reader(netns_path: str, ifname: str) -> dict[str, int]:
    from virtlet.network import plumbing  # pyroute2 only where a pod network is read

    return plumbing.link_counters(ifname, netns_path)


def _cpu_time_ns(dom: Any) -> int:
    try:
        return int(dom.getCPUStats(True)[0]["cpu_time"])
    except libvirt.libvirtError:
        # no CPU accounting cgroup for this domain: libvirt's per-process counter is the same total
        state, _max_mem, _mem, _vcpus, cpu_time = dom.info()
        if state in _GONE_STATES:
            raise _DomainGone() from None
        return int(cpu_time)


def _memory(raw: dict[str, int], timestamp: int) -> MemorySample | None:
    if "rss" not in raw:
        return None
    rss = int(raw["rss"]) * KIB
    actual = int(raw.get("actual", 0)) * KIB
    return MemorySample(timestamp=timestamp, working_set_bytes=rss, usage_bytes=rss, rss_bytes=rss,
                        available_bytes=max(actual - rss, 0))


def _disk(dom: Any, timestamp: int) -> DiskSample | None:
    try:
        stats = dom.connect().domainListGetStats([dom], libvirt.VIR_DOMAIN_STATS_BLOCK)
    except libvirt.libvirtError as exc:
        log.debug("no block stats: %s", exc)
        return None
    if not stats:
        return None
    raw = stats[0][1]

    def total(key: str) -> int:
        return sum(int(raw.get(f"block.{i}.{key}", 0)) for i in range(int(raw.get("block.count", 0))))

    return DiskSample(timestamp=timestamp, read_bytes=total("rd.bytes"), reads=total("rd.reqs"),
                      write_bytes=total("wr.bytes"), writes=total("wr.reqs"))


def writable_layer(rec: st.ContainerRecord, timestamp: int) -> FsSample:
    """Disk the container's own files occupy (its overlay and config drive; the base image is shared)."""
    root = rec.extra.get("root", "")
    mountpoint = str(Path(root).parent) if root else str(rec.extra.get("dir", ""))
    used = inodes = 0
    for name in ("root", "config_drive"):
        path = rec.extra.get(name)
        if not path:
            continue
        try:
            used += os.stat(path).st_blocks * 512
            inodes += 1
        except OSError:  # removed under us, or never made
            continue
    return FsSample(timestamp=timestamp, mountpoint=mountpoint, used_bytes=used, inodes_used=inodes)


def sum_cpu(samples: Iterable[CpuSample]) -> CpuSample | None:
    samples = list(samples)
    if not samples:
        return None
    rates = [s.usage_nano_cores for s in samples if s.usage_nano_cores is not None]
    return CpuSample(timestamp=max(s.timestamp for s in samples),
                     usage_core_nano_seconds=sum(s.usage_core_nano_seconds for s in samples),
                     usage_nano_cores=sum(rates) if rates else None)


def sum_memory(samples: Iterable[MemorySample]) -> MemorySample | None:
    samples = list(samples)
    if not samples:
        return None
    return MemorySample(timestamp=max(s.timestamp for s in samples),
                        working_set_bytes=sum(s.working_set_bytes for s in samples),
                        usage_bytes=sum(s.usage_bytes for s in samples), rss_bytes=sum(s.rss_bytes for s in samples),
                        available_bytes=sum(s.available_bytes for s in samples))


class StatsSampler:
    """Samples containers and sandboxes.  ``lookup`` maps a container id to its libvirt domain (or None);
    ``read_link(netns_path, ifname)`` returns the link's counters.  One sampler per virtletd: it remembers the
    last CPU sample of every running container to compute ``usage_nano_cores``."""

    def __init__(self, lookup: Callable[[str], Any],
                 read_link: Callable[[str, str], dict[str, int]] = _default_link_reader,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.lookup = lookup
        self.read_link = read_link
        self.clock = clock
        self._previous: dict[str, tuple[int, int]] = {}  # container id -> (timestamp ns, cpu time ns)
        self._lock = threading.Lock()

    def forget(self, cid: str) -> None:
        with self._lock:
            self._previous.pop(cid, None)

    # -- containers -----------------------------------------------------------------------------------
    def container(self, rec: st.ContainerRecord) -> ContainerSample:
        layer = writable_layer(rec, self.clock())
        if rec.state != st.CONTAINER_RUNNING:
            self.forget(rec.id)
            return ContainerSample(record=rec, writable_layer=layer)
        try:
            cpu, memory, disk = self._usage(rec.id)
        except (libvirt.libvirtError, _DomainGone) as exc:
            # the VM stopped between listing and sampling: report what is still true (its files)
            log.debug("no CPU/memory for container %s: its domain is gone (%s)", rec.id, str(exc) or "not running")
            self.forget(rec.id)
            return ContainerSample(record=rec, writable_layer=layer)
        return ContainerSample(record=rec, writable_layer=layer, cpu=cpu, memory=memory, disk=disk)

    def _usage(self, cid: str) -> tuple[CpuSample, MemorySample | None, DiskSample | None]:
        dom = self.lookup(cid)
        if dom is None:
            raise _DomainGone()
        raw_memory = dom.memoryStats()  # raises on a domain that is not running
        cpu_ns = _cpu_time_ns(dom)
        now = self.clock()
        return self._cpu(cid, now, cpu_ns), _memory(raw_memory, now), _disk(dom, now)

    def _cpu(self, cid: str, now: int, cpu_ns: int) -> CpuSample:
        with self._lock:
            previous = self._previous.get(cid)
            self._previous[cid] = (now, cpu_ns)
        rate = None
        if previous is not None and now > previous[0] and cpu_ns >= previous[1]:
            rate = (cpu_ns - previous[1]) * 1_000_000_000 // (now - previous[0])
        return CpuSample(timestamp=now, usage_core_nano_seconds=cpu_ns, usage_nano_cores=rate)

    # -- sandboxes ------------------------------------------------------------------------------------
    def sandbox(self, rec: st.SandboxRecord, containers: list[st.ContainerRecord]) -> SandboxSample:
        """A READY sandbox: sums over its running containers, its network, its containers' samples.  A sandbox
        that is not ready has no VM and no network to measure: attributes only."""
        if rec.state != st.SANDBOX_READY:
            return SandboxSample(record=rec)
        samples = [self.container(c) for c in containers]
        return SandboxSample(
            record=rec, cpu=sum_cpu(s.cpu for s in samples if s.cpu is not None),
            memory=sum_memory(s.memory for s in samples if s.memory is not None),
            network=self._network(rec), containers=samples)

    def _network(self, rec: st.SandboxRecord) -> NetworkSample | None:
        name = rec.network.default_veth if rec.network is not None else ""
        if not name or not rec.netns:
            return None  # no CNI interface (e.g. a loopback-only network)
        try:
            counters = self.read_link(rec.netns, name)
        except errors.NotFound as exc:
            log.debug("no network stats for sandbox %s: %s", rec.id, exc)
            return None
        return NetworkSample(timestamp=self.clock(), default_interface=InterfaceSample(
            name=name, rx_bytes=counters["rx_bytes"], rx_errors=counters["rx_errors"],
            tx_bytes=counters["tx_bytes"], tx_errors=counters["tx_errors"]))
