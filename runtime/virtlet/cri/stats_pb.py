"""CRI protobuf messages from the plain samples of ``virtlet.vm.stats``.  Only conversion lives here: what the
numbers mean for a VM is documented (and decided) in ``virtlet.vm.stats``."""

from __future__ import annotations

from virtlet.cri.gen import api_pb2 as api
from virtlet.vm import stats as vmstats


def _u64(value: int) -> api.UInt64Value:
    return api.UInt64Value(value=max(int(value), 0))


def cpu_usage(sample: vmstats.CpuSample) -> api.CpuUsage:
    msg = api.CpuUsage(timestamp=sample.timestamp, usage_core_nano_seconds=_u64(sample.usage_core_nano_seconds))
    if sample.usage_nano_cores is not None:
        msg.usage_nano_cores.CopyFrom(_u64(sample.usage_nano_cores))
    return msg


def memory_usage(sample: vmstats.MemorySample) -> api.MemoryUsage:
    return api.MemoryUsage(timestamp=sample.timestamp, working_set_bytes=_u64(sample.working_set_bytes),
                           available_bytes=_u64(sample.available_bytes), usage_bytes=_u64(sample.usage_bytes),
                           rss_bytes=_u64(sample.rss_bytes))


def container_stats(sample: vmstats.ContainerSample) -> api.ContainerStats:
    rec = sample.record
    layer = sample.writable_layer
    msg = api.ContainerStats(
        attributes=api.ContainerAttributes(
            id=rec.id, metadata=api.ContainerMetadata(name=rec.name, attempt=rec.attempt), labels=rec.labels,
            annotations=rec.annotations),
        writable_layer=api.FilesystemUsage(
            timestamp=layer.timestamp, fs_id=api.FilesystemIdentifier(mountpoint=layer.mountpoint),
            used_bytes=_u64(layer.used_bytes), inodes_used=_u64(layer.inodes_used)))
    if sample.cpu is not None:
        msg.cpu.CopyFrom(cpu_usage(sample.cpu))
    if sample.memory is not None:
        msg.memory.CopyFrom(memory_usage(sample.memory))
    return msg


def sandbox_stats(sample: vmstats.SandboxSample) -> api.PodSandboxStats:
    rec = sample.record
    msg = api.PodSandboxStats(attributes=api.PodSandboxAttributes(
        id=rec.id, metadata=api.PodSandboxMetadata(name=rec.name, namespace=rec.namespace, uid=rec.uid,
                                                   attempt=rec.attempt),
        labels=rec.labels, annotations=rec.annotations))
    if sample.cpu is not None:
        msg.linux.cpu.CopyFrom(cpu_usage(sample.cpu))
    if sample.memory is not None:
        msg.linux.memory.CopyFrom(memory_usage(sample.memory))
    if sample.network is not None:
        iface = sample.network.default_interface
        msg.linux.network.timestamp = sample.network.timestamp
        usage = api.NetworkInterfaceUsage(
            name=iface.name, rx_bytes=_u64(iface.rx_bytes), rx_errors=_u64(iface.rx_errors),
            tx_bytes=_u64(iface.tx_bytes), tx_errors=_u64(iface.tx_errors))
        msg.linux.network.default_interface.CopyFrom(usage)
        msg.linux.network.interfaces.append(usage)  # the summary API lists interfaces from here
    if sample.containers:
        msg.linux.containers.extend(container_stats(c) for c in sample.containers)
    return msg
