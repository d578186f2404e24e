"""CRI stats of a real VM pod: a tiny guest under libvirt/QEMU (TCG) on a real CNI bridge network.  CPU time
grows and gives a rate, QEMU's RSS and the overlay's disk use are reported, and the pod netns' interface counts
the ping from the host."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull
from tests.integration.test_vm_network import pod_ip
from virtlet.cri.gen import api_pb2 as api

pytestmark = [pytest.mark.libvirt, pytest.mark.network]


def test_stats_of_a_running_vm_pod(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                                   tiny_image: Path) -> None:
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    image = image_server.name("files/tiny.qcow2")
    _pull(vm_virtletd, image)
    pod = Pod(vm_virtletd, world_dir, "vm-stats", memory=128 << 20, image=image)
    pod.sandbox_config.labels["app"] = "vm-stats"
    rt = pod.rt
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        pod.wait_log(MARKER)
        flt = api.ContainerStatsFilter(pod_sandbox_id=pod.sandbox_id)

        first = rt.ListContainerStats(api.ListContainerStatsRequest(filter=flt), timeout=30).stats
        assert [s.attributes.id for s in first] == [pod.container_id]
        time.sleep(1)  # let the guest burn some CPU time between the samples
        second = rt.ListContainerStats(api.ListContainerStatsRequest(filter=flt), timeout=30).stats[0]
        assert second.cpu.usage_core_nano_seconds.value > first[0].cpu.usage_core_nano_seconds.value > 0
        assert second.cpu.timestamp > first[0].cpu.timestamp
        assert second.cpu.usage_nano_cores.value > 0
        assert second.memory.rss_bytes.value > 0
        assert second.memory.working_set_bytes.value == second.memory.rss_bytes.value
        assert second.writable_layer.used_bytes.value > 0
        assert second.writable_layer.fs_id.mountpoint.endswith(pod.container_id)

        one = rt.ContainerStats(api.ContainerStatsRequest(container_id=pod.container_id), timeout=30).stats
        assert one.attributes.id == pod.container_id and one.attributes.metadata.name == "vm"
        assert one.cpu.usage_core_nano_seconds.value >= second.cpu.usage_core_nano_seconds.value

        ip = pod_ip(pod)
        subprocess.run(["busybox", "ping", "-c", "3", "-W", "5", ip], check=True, capture_output=True, timeout=60)
        sandbox = rt.PodSandboxStats(api.PodSandboxStatsRequest(pod_sandbox_id=pod.sandbox_id), timeout=30).stats
        assert sandbox.attributes.id == pod.sandbox_id and sandbox.attributes.metadata.name == "vm-stats"
        iface = sandbox.linux.network.default_interface
        assert iface.name == "eth0"
        assert iface.rx_bytes.value > 0 and iface.tx_bytes.value > 0
        assert sandbox.linux.cpu.usage_core_nano_seconds.value > 0
        assert sandbox.linux.memory.rss_bytes.value > 0
        assert [c.attributes.id for c in sandbox.linux.containers] == [pod.container_id]

        listed = rt.ListPodSandboxStats(api.ListPodSandboxStatsRequest(
            filter=api.PodSandboxStatsFilter(label_selector={"app": "vm-stats"})), timeout=30).stats
        assert [s.attributes.id for s in listed] == [pod.sandbox_id]
        assert listed[0].linux.network.default_interface.rx_bytes.value >= iface.rx_bytes.value

        rt.StopContainer(api.StopContainerRequest(container_id=pod.container_id, timeout=5), timeout=120)
        stopped = rt.ContainerStats(api.ContainerStatsRequest(container_id=pod.container_id), timeout=30).stats
        assert not stopped.HasField("cpu") and stopped.writable_layer.used_bytes.value > 0
    finally:
        pod.stop_and_remove()
