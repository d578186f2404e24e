"""virtletd's Prometheus endpoint (docs/metrics.md): per-VM usage series and CRI call latency/error counters.

- CRI calls are counted by the interceptor (``virtlet.cri.interceptor``) through ``CallMetrics.observe``: one
  histogram of durations and one counter of calls per method and gRPC code.  The ``method`` label is the short
  name of a method virtletd serves (gRPC answers unknown methods before any handler, so the label set is bounded).
- VM series are read at scrape time (``VmCollector``) through the same sampler the CRI stats calls use
  (``virtlet.vm.stats``), so they mean what ContainerStats means.  A scrape of N running VMs costs N libvirt
  stats calls; nothing samples in the background.
- The endpoint is plain HTTP on ``metrics_address`` (default 127.0.0.1:9474: loopback only, since pod names and
  namespaces are in the labels; an operator opens it to a scraper on purpose).  An empty address turns it off.
  When the address cannot be bound virtletd keeps serving CRI and logs the error: metrics are not worth a node's
  pods.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from virtlet.state import store as st
from virtlet.vm import stats as vmstats

log = logging.getLogger(__name__)

# VM calls take seconds to minutes (boots under TCG, grace periods): buckets up to 5 minutes
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
VM_LABELS = ("namespace", "pod", "container", "container_id")
POD_LABELS = ("namespace", "pod", "pod_sandbox_id", "interface")


class Sampler(Protocol):
    def sandbox_stats(self, rec: st.SandboxRecord) -> vmstats.SandboxSample: ...


class VmCollector(Collector):
    """The per-VM series of every READY sandbox's running containers, sampled when scraped."""

    def __init__(self, store: st.StateStore, sampler: Sampler) -> None:
        self.store = store
        self.sampler = sampler

    def collect(self) -> Iterator[Any]:
        def counter(name: str, doc: str, labels: tuple[str, ...] = VM_LABELS) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=list(labels))

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=list(VM_LABELS))

        cpu = counter("virtlet_vm_cpu_seconds", "CPU time of the VM's QEMU process (all vCPUs and QEMU threads)")
        rss = gauge("virtlet_vm_memory_rss_bytes", "resident memory of the VM's QEMU process")
        avail = gauge("virtlet_vm_memory_available_bytes", "configured (balloon) memory minus resident memory")
        rd_bytes = counter("virtlet_vm_disk_read_bytes", "bytes read by the VM from all its disks")
        wr_bytes = counter("virtlet_vm_disk_written_bytes", "bytes written by the VM to all its disks")
        reads = counter("virtlet_vm_disk_reads", "read requests of the VM on all its disks")
        writes = counter("virtlet_vm_disk_writes", "write requests of the VM on all its disks")
        layer = gauge("virtlet_vm_writable_layer_bytes", "disk space of the VM's own overlay and config drive")
        rx = counter("virtlet_pod_network_receive_bytes", "bytes received on the pod's CNI interface",
                     POD_LABELS)
        tx = counter("virtlet_pod_network_transmit_bytes", "bytes sent on the pod's CNI interface", POD_LABELS)
        for rec in self.store.list_sandboxes():
            if rec.state != st.SANDBOX_READY:
                continue
            try:
                sample = self.sampler.sandbox_stats(rec)
            except Exception as exc:  # one pod's failure must not empty the whole scrape
                log.warning("metrics: cannot sample sandbox %s: %s", rec.id, exc)
                continue
            if sample.network is not None:
                iface = sample.network.default_interface
                labels = [rec.namespace, rec.name, rec.id, iface.name]
                rx.add_metric(labels, iface.rx_bytes)
                tx.add_metric(labels, iface.tx_bytes)
            for c in sample.containers:
                labels = [rec.namespace, rec.name, c.record.name, c.record.id]
                layer.add_metric(labels, c.writable_layer.used_bytes)
                if c.cpu is not None:
                    cpu.add_metric(labels, c.cpu.usage_core_nano_seconds / 1e9)
                if c.memory is not None:
                    rss.add_metric(labels, c.memory.rss_bytes)
                    avail.add_metric(labels, c.memory.available_bytes)
                if c.disk is not None:
                    rd_bytes.add_metric(labels, c.disk.read_bytes)
                    wr_bytes.add_metric(labels, c.disk.write_bytes)
                    reads.add_metric(labels, c.disk.reads)
                    writes.add_metric(labels, c.disk.writes)
        yield from (cpu, rss, avail, rd_bytes, wr_bytes, reads, writes, layer, rx, tx)


class CallMetrics:
    """Latency histogram and call counter per CRI method; ``observe`` is the interceptor's hook."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram("virtlet_cri_request_duration_seconds", "duration of CRI calls by method",
                                  ["method"], buckets=LATENCY_BUCKETS, registry=registry)
        self.requests = Counter("virtlet_cri_requests", "CRI calls by method and gRPC status code",
                                ["method", "code"], registry=registry)
        self.errors = Counter("virtlet_cri_request_errors", "CRI calls that did not answer OK, by method and code",
                              ["method", "code"], registry=registry)

    def observe(self, method: str, code: str, seconds: float) -> None:
        name = method.rsplit("/", 1)[-1]
        self.duration.labels(name).observe(seconds)
        self.requests.labels(name, code).inc()
        if code != "OK":
            self.errors.labels(name, code).inc()


class MetricsEndpoint:
    """``/metrics`` over HTTP on ``address`` (HOST:PORT; empty: off).  Its own registry: no process-wide state,
    only the process_* series of virtletd itself besides virtlet's own."""

    def __init__(self, address: str, store: st.StateStore, sampler: Sampler) -> None:
        from prometheus_client.process_collector import ProcessCollector

        self.address = address
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.calls = CallMetrics(self.registry)
        self.registry.register(VmCollector(store, sampler))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.url = ""

    @property
    def observe(self) -> Callable[[str, str, float], None]:
        return self.calls.observe

    def start(self) -> None:
        if not self.address:
            log.info("metrics endpoint off (metrics_address is empty)")
            return
        host, _, port = self.address.rpartition(":")
        host = host.strip("[]")
        try:
            self._server, self._thread = start_http_server(int(port), addr=host, registry=self.registry)
        except OSError as exc:
            log.error("metrics endpoint: cannot listen on %s (%s); virtletd serves CRI without /metrics",
                      self.address, exc)
            return
        bound = self._server.server_address
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}/metrics"
        log.info("metrics endpoint listening on %s", self.url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
