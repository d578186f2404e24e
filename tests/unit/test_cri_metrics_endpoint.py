"""The Prometheus side of virtlet.cri.metrics with fakes: CRI call counting and the per-VM collector."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from virtlet.cri.metrics import CallMetrics, VmCollector
from virtlet.state import store as st
from virtlet.vm import stats as vmstats


def test_calls_counted_by_short_method_and_code() -> None:
    reg = CollectorRegistry()
    calls = CallMetrics(reg)
    calls.observe("/runtime.v1.RuntimeService/StartContainer", "OK", 2.0)
    calls.observe("/runtime.v1alpha2.RuntimeService/StartContainer", "NOT_FOUND", 0.01)
    get = reg.get_sample_value
    assert get("virtlet_cri_requests_total", {"method": "StartContainer", "code": "OK"}) == 1
    assert get("virtlet_cri_request_errors_total", {"method": "StartContainer", "code": "NOT_FOUND"}) == 1
    assert get("virtlet_cri_request_errors_total", {"method": "StartContainer", "code": "OK"}) is None
    assert get("virtlet_cri_request_duration_seconds_count", {"method": "StartContainer"}) == 2
    assert get("virtlet_cri_request_duration_seconds_bucket", {"method": "StartContainer", "le": "1.0"}) == 1


class Sampler:
    def __init__(self) -> None:
        self.fail: set[str] = set()

    def sandbox_stats(self, rec: st.SandboxRecord) -> vmstats.SandboxSample:
        if rec.id in self.fail:
            raise RuntimeError("libvirt went away")
        c = st.ContainerRecord(id=f"c-{rec.id}", sandbox_id=rec.id, name="vm", attempt=0,
                               state=st.CONTAINER_RUNNING, created_at=0, image="i", image_ref="r", log_path="l")
        layer = vmstats.FsSample(timestamp=1, mountpoint="/x", used_bytes=4096, inodes_used=2)
        sample = vmstats.ContainerSample(
            record=c, writable_layer=layer, cpu=vmstats.CpuSample(1, 2_500_000_000, None),
            memory=vmstats.MemorySample(1, 100, 100, 100, 50), disk=vmstats.DiskSample(1, 10, 1, 20, 2))
        net = vmstats.NetworkSample(1, vmstats.InterfaceSample("eth0", 7, 0, 8, 0))
        return vmstats.SandboxSample(record=rec, network=net, containers=[sample])


def test_vm_series_of_ready_pods_and_a_failing_pod_skipped(tmp_path: Path) -> None:
    store = st.StateStore(tmp_path / "v.db")
    for sid, state in (("s1", st.SANDBOX_READY), ("s2", st.SANDBOX_READY), ("s3", st.SANDBOX_NOTREADY)):
        store.add_sandbox(st.SandboxRecord(id=sid, name=f"p{sid}", namespace="ns", uid=sid, attempt=0,
                                           state=state, created_at=0, runtime_handler="virtlet", netns=""))
    sampler = Sampler()
    sampler.fail.add("s2")
    reg = CollectorRegistry()
    reg.register(VmCollector(store, sampler))
    vm = {"namespace": "ns", "pod": "ps1", "container": "vm", "container_id": "c-s1"}
    get = reg.get_sample_value
    assert get("virtlet_vm_cpu_seconds_total", vm) == 2.5
    assert get("virtlet_vm_disk_written_bytes_total", vm) == 20
    assert get("virtlet_vm_memory_available_bytes", vm) == 50
    assert get("virtlet_pod_network_receive_bytes_total",
               {"namespace": "ns", "pod": "ps1", "pod_sandbox_id": "s1", "interface": "eth0"}) == 7
    assert get("virtlet_vm_cpu_seconds_total", {**vm, "pod": "ps2", "container_id": "c-s2"}) is None
    assert get("virtlet_vm_cpu_seconds_total", {**vm, "pod": "ps3", "container_id": "c-s3"}) is None
