"""virtletd's Prometheus endpoint and the CRI metrics calls on a real VM pod (one TCG boot): the per-VM series
carry the pod's labels and grow, CRI calls are counted per method and code."""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull
from tests.integration.test_vm_network import pod_ip
from virtlet.cri.gen import api_pb2 as api
from virtlet.vm.manager import VmManager

pytestmark = [pytest.mark.libvirt, pytest.mark.network]

_SAMPLE = re.compile(r'^(?P<name>[a-z_:]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')


def metrics_url(daemon: VirtletdProcess) -> str:
    found = re.search(r"metrics endpoint listening on (http://\S+/metrics)", daemon.log_path.read_text())
    assert found, daemon.log()
    return found.group(1)


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = urllib.request.urlopen(url, timeout=60).read().decode()
    out = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or line.startswith("#"):
            continue
        labels = frozenset(tuple(kv.split("=", 1)) for kv in re.findall(r'[a-z_]+="[^"]*"', m["labels"] or ""))
        out[(m["name"], frozenset((k, v.strip('"')) for k, v in labels))] = float(m["value"])
    return out


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    hits = [v for (n, ls), v in samples.items() if n == name and want <= ls]
    assert len(hits) == 1, f"{name}{labels}: {hits} in {sorted(k for k in samples if k[0].startswith(name))}"
    return hits[0]


def check_cri_metrics(rt: Any, pod: Pod) -> None:
    """ListMetricDescriptors / ListPodSandboxMetrics over gRPC: cAdvisor names, labels matching their keys."""
    keys = {d.name: list(d.label_keys) for d in rt.ListMetricDescriptors(
        api.ListMetricDescriptorsRequest(), timeout=30).descriptors}
    pods = {p.pod_sandbox_id: p for p in rt.ListPodSandboxMetrics(api.ListPodSandboxMetricsRequest(),
                                                                   timeout=60).pod_metrics}
    mine = pods[pod.sandbox_id]
    net = {m.name: dict(zip(keys[m.name], m.label_values, strict=True)) | {"value": m.value.value}
           for m in mine.metrics}
    rx = net["container_network_receive_bytes_total"]
    assert rx["value"] > 0 and rx["interface"] == "eth0" and rx["pod"] == "vm-metrics"
    [vm] = mine.container_metrics
    assert vm.container_id == pod.container_id
    got = {m.name: dict(zip(keys[m.name], m.label_values, strict=True)) | {"value": m.value.value}
           for m in vm.metrics}
    for name in ("container_cpu_usage_seconds_total", "container_memory_working_set_bytes",
                 "container_fs_reads_bytes_total", "container_fs_reads_total"):
        assert got[name]["id"] == pod.container_id and got[name]["container"] == "vm", got[name]
        assert got[name]["namespace"] == "default" and got[name]["pod"] == "vm-metrics"
    assert got["container_memory_working_set_bytes"]["value"] > 0
    assert got["container_fs_reads_bytes_total"]["value"] > 0


class EventWatcher:
    """A GetContainerEvents subscriber on its own channel, collecting events in a thread."""

    def __init__(self, daemon: VirtletdProcess) -> None:
        self.events: queue.Queue[api.ContainerEventResponse] = queue.Queue()
        self.stream = daemon.runtime().GetContainerEvents(api.GetEventsRequest(), timeout=600)
        self.stream.initial_metadata()  # sent once subscribed: no event of what the test does next is missed
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for event in self.stream:
                self.events.put(event)
        except grpc.RpcError:
            pass  # cancelled by close()

    def next_for(self, cid: str, timeout: float = 120) -> api.ContainerEventResponse:
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(deadline - time.monotonic(), 0.1))
            if event.container_id == cid:
                return event

    def close(self) -> None:
        self.stream.cancel()
        self.thread.join(30)


def test_prometheus_series_of_a_running_vm_pod(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                                               tiny_image: Path) -> None:
    """One boot for the Prometheus endpoint, the CRI metrics calls and GetContainerEvents (item 4/5 of issue 17);
    the VM is stopped by destroying its domain behind virtletd's back, so the STOPPED event comes from libvirt's
    lifecycle events."""
    url = metrics_url(vm_virtletd)
    watcher = EventWatcher(vm_virtletd)
    assert url.startswith("http://127.0.0.1:")
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    image = image_server.name("files/tiny.qcow2")
    _pull(vm_virtletd, image)
    pod = Pod(vm_virtletd, world_dir, "vm-metrics", memory=128 << 20, image=image)
    rt = pod.rt
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        pod.wait_log(MARKER)
        vm = {"namespace": pod.sandbox_config.metadata.namespace, "pod": "vm-metrics", "container": "vm",
              "container_id": pod.container_id}
        first = scrape(url)
        assert value(first, "virtlet_vm_cpu_seconds_total", **vm) > 0
        assert value(first, "virtlet_vm_memory_rss_bytes", **vm) > 0
        assert value(first, "virtlet_vm_disk_read_bytes_total", **vm) > 0  # the guest booted from its disk
        assert value(first, "virtlet_vm_disk_reads_total", **vm) > 0
        value(first, "virtlet_vm_disk_written_bytes_total", **vm)
        value(first, "virtlet_vm_disk_writes_total", **vm)
        assert value(first, "virtlet_vm_writable_layer_bytes", **vm) > 0
        ok_starts = value(first, "virtlet_cri_requests_total", method="StartContainer", code="OK")
        assert ok_starts == 1
        assert value(first, "virtlet_cri_request_duration_seconds_count", method="StartContainer") == 1

        subprocess.run(["busybox", "ping", "-c", "3", "-W", "5", pod_ip(pod)], check=True, capture_output=True,
                       timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            rt.ContainerStatus(api.ContainerStatusRequest(container_id="no-such-container"), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        time.sleep(1)
        second = scrape(url)
        pod_net = {"namespace": vm["namespace"], "pod": "vm-metrics", "pod_sandbox_id": pod.sandbox_id,
                   "interface": "eth0"}
        assert value(second, "virtlet_vm_cpu_seconds_total", **vm) > value(first, "virtlet_vm_cpu_seconds_total", **vm)
        assert value(second, "virtlet_pod_network_receive_bytes_total", **pod_net) > 0
        assert value(second, "virtlet_pod_network_transmit_bytes_total", **pod_net) > 0
        assert value(second, "virtlet_cri_request_errors_total", method="ContainerStatus", code="NOT_FOUND") == 1
        assert value(second, "virtlet_cri_requests_total", method="ContainerStatus", code="NOT_FOUND") == 1

        check_cri_metrics(rt, pod)

        created = watcher.next_for(pod.container_id)
        assert created.container_event_type == api.CONTAINER_CREATED_EVENT
        assert created.pod_sandbox_status.id == pod.sandbox_id
        assert created.pod_sandbox_status.state == api.SANDBOX_READY
        started = watcher.next_for(pod.container_id)
        assert started.container_event_type == api.CONTAINER_STARTED_EVENT
        assert started.created_at >= created.created_at

        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", VmManager.domain_name(pod.container_id)],
                       check=True, capture_output=True, timeout=60)
        stopped_event = watcher.next_for(pod.container_id)
        assert stopped_event.container_event_type == api.CONTAINER_STOPPED_EVENT
        [status] = [c for c in stopped_event.containers_statuses if c.id == pod.container_id]
        assert status.state == api.CONTAINER_EXITED and status.exit_code != 0
        stopped = scrape(url)
        assert not [k for k in stopped if k[0].startswith("virtlet_vm_cpu") and ("container_id", pod.container_id)
                    in k[1]]  # no usage series for a stopped VM

        rt.RemoveContainer(api.RemoveContainerRequest(container_id=pod.container_id), timeout=120)
        deleted = watcher.next_for(pod.container_id)
        assert deleted.container_event_type == api.CONTAINER_DELETED_EVENT
        assert pod.container_id not in [c.id for c in deleted.containers_statuses]
        pod.container_id = ""
    finally:
        watcher.close()
        pod.stop_and_remove()
