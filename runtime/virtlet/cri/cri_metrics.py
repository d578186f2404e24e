"""ListMetricDescriptors / ListPodSandboxMetrics: the cAdvisor-named container metrics a kubelet serves on
``/metrics/cadvisor`` when it takes stats from the CRI, filled from the same samples as ContainerStats
(``virtlet.vm.stats``, where what each number means for a VM is decided).

Decisions (docs/metrics.md):
- Only the metrics libvirt and the pod netns can fill: CPU time, memory (working set, RSS, usage), disk I/O
  (bytes and requests, summed over the VM's disks), network (bytes and errors on the pod's CNI interface).
- Label keys follow cAdvisor's container labels: ``container``, ``id``, ``image``, ``name``, ``namespace``,
  ``pod``; network metrics add ``interface``.  ``id`` and ``name`` are the container id (the sandbox id for the
  pod-level network series, whose ``container`` and ``image`` are empty, like cAdvisor's pod-level series).
- The CRI carries integer values: ``container_cpu_usage_seconds_total`` is whole seconds (the unit its name
  promises, since the kubelet exposes the value as it is); ContainerStats has the nanoseconds.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.ports import Containers
from virtlet.state import store as st
from virtlet.vm import stats as vmstats

LABELS = ["container", "id", "image", "name", "namespace", "pod"]
NET_LABELS = [*LABELS, "interface"]

# name -> (help, type, label keys)
DESCRIPTORS: dict[str, tuple[str, api.MetricType, list[str]]] = {
    "container_cpu_usage_seconds_total": ("Cumulative cpu time consumed in seconds (the VM's QEMU process).",
                                          api.COUNTER, LABELS),
    "container_memory_working_set_bytes": ("Current working set in bytes (resident memory of QEMU).", api.GAUGE,
                                           LABELS),
    "container_memory_rss": ("Size of RSS in bytes.", api.GAUGE, LABELS),
    "container_memory_usage_bytes": ("Current memory usage in bytes.", api.GAUGE, LABELS),
    "container_fs_reads_bytes_total": ("Cumulative count of bytes read (all the VM's disks).", api.COUNTER, LABELS),
    "container_fs_writes_bytes_total": ("Cumulative count of bytes written (all the VM's disks).", api.COUNTER,
                                        LABELS),
    "container_fs_reads_total": ("Cumulative count of reads completed.", api.COUNTER, LABELS),
    "container_fs_writes_total": ("Cumulative count of writes completed.", api.COUNTER, LABELS),
    "container_network_receive_bytes_total": ("Cumulative count of bytes received.", api.COUNTER, NET_LABELS),
    "container_network_transmit_bytes_total": ("Cumulative count of bytes transmitted.", api.COUNTER, NET_LABELS),
    "container_network_receive_errors_total": ("Cumulative count of errors encountered while receiving.",
                                               api.COUNTER, NET_LABELS),
    "container_network_transmit_errors_total": ("Cumulative count of errors encountered while transmitting.",
                                                api.COUNTER, NET_LABELS),
}


def descriptors() -> list[api.MetricDescriptor]:
    return [api.MetricDescriptor(name=name, help=doc, label_keys=keys)
            for name, (doc, _type, keys) in DESCRIPTORS.items()]


def _metric(name: str, timestamp: int, labels: list[str], value: int) -> api.Metric:
    return api.Metric(name=name, timestamp=timestamp, metric_type=DESCRIPTORS[name][1], label_values=labels,
                      value=api.UInt64Value(value=max(int(value), 0)))


def _container(sample: vmstats.ContainerSample, namespace: str, pod: str) -> api.ContainerMetrics:
    rec = sample.record
    labels = [rec.name, rec.id, rec.image, rec.id, namespace, pod]
    out = api.ContainerMetrics(container_id=rec.id)
    if sample.cpu is not None:
        out.metrics.append(_metric("container_cpu_usage_seconds_total", sample.cpu.timestamp, labels,
                                   sample.cpu.usage_core_nano_seconds // 1_000_000_000))
    if sample.memory is not None:
        m = sample.memory
        out.metrics.extend([
            _metric("container_memory_working_set_bytes", m.timestamp, labels, m.working_set_bytes),
            _metric("container_memory_rss", m.timestamp, labels, m.rss_bytes),
            _metric("container_memory_usage_bytes", m.timestamp, labels, m.usage_bytes)])
    if sample.disk is not None:
        d = sample.disk
        out.metrics.extend([
            _metric("container_fs_reads_bytes_total", d.timestamp, labels, d.read_bytes),
            _metric("container_fs_writes_bytes_total", d.timestamp, labels, d.write_bytes),
            _metric("container_fs_reads_total", d.timestamp, labels, d.reads),
            _metric("container_fs_writes_total", d.timestamp, labels, d.writes)])
    return out


def pod_metrics(sample: vmstats.SandboxSample) -> api.PodSandboxMetrics:
    rec = sample.record
    out = api.PodSandboxMetrics(pod_sandbox_id=rec.id)
    if sample.network is not None:
        iface = sample.network.default_interface
        labels = ["", rec.id, "", rec.id, rec.namespace, rec.name, iface.name]
        ts = sample.network.timestamp
        out.metrics.extend([
            _metric("container_network_receive_bytes_total", ts, labels, iface.rx_bytes),
            _metric("container_network_transmit_bytes_total", ts, labels, iface.tx_bytes),
            _metric("container_network_receive_errors_total", ts, labels, iface.rx_errors),
            _metric("container_network_transmit_errors_total", ts, labels, iface.tx_errors)])
    out.container_metrics.extend(_container(c, rec.namespace, rec.name) for c in sample.containers
                                 if c.cpu is not None)
    return out


class MetricsCalls:
    """The CRI metrics calls, mixed into ``RuntimeServicer`` (which provides ``store`` and ``_vms``)."""

    store: st.StateStore
    _vms: Callable[[], Containers]

    def ListMetricDescriptors(self, request: api.ListMetricDescriptorsRequest,
                              context: grpc.ServicerContext) -> api.ListMetricDescriptorsResponse:
        return api.ListMetricDescriptorsResponse(descriptors=descriptors())

    def ListPodSandboxMetrics(self, request: api.ListPodSandboxMetricsRequest,
                              context: grpc.ServicerContext) -> api.ListPodSandboxMetricsResponse:
        """Every READY pod (a pod that is not ready has no VM and no network to measure)."""
        vms = self._vms()
        return api.ListPodSandboxMetricsResponse(pod_metrics=[
            pod_metrics(vms.sandbox_stats(rec)) for rec in self.store.list_sandboxes()
            if rec.state == st.SANDBOX_READY])
