"""vCPU hot-plug through UpdateContainerResources on a real QEMU/TCG VM (issue 17): a CPU limit above the VM's
vCPUs adds vCPUs live up to ``VirtletMaxVCPUs``; beyond it FAILED_PRECONDITION and nothing changes."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull, served_tiny  # noqa: F401  (fixture)
from virtlet.cri.gen import api_pb2 as api

pytestmark = [pytest.mark.libvirt, pytest.mark.network]


def _vcpus(domain: str) -> dict[str, int]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "vcpucount", domain], capture_output=True, text=True,
                         check=True).stdout
    return {f"{m[0]} {m[1]}": int(m[2]) for m in re.findall(r"(maximum|current)\s+(live|config)\s+(\d+)", out)}


def _update(pod: Pod, quota: int) -> None:
    pod.rt.UpdateContainerResources(api.UpdateContainerResourcesRequest(
        container_id=pod.container_id, linux=api.LinuxContainerResources(cpu_quota=quota, cpu_period=100_000)),
        timeout=60)


def test_cpu_limit_hot_plugs_vcpus(vm_virtletd: VirtletdProcess, world_dir: Path,
                                   served_tiny: str) -> None:  # noqa: F811
    _pull(vm_virtletd, served_tiny)
    pod = Pod(vm_virtletd, world_dir, "vm-vcpu", image=served_tiny, memory=128 << 20,
              annotations={"VirtletMaxVCPUs": "2"})
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        domain = f"virtlet-{pod.container_id}"
        assert (_vcpus(domain)["maximum live"], _vcpus(domain)["current live"]) == (2, 1)
        pod.wait_log(MARKER)
        _update(pod, 150_000)  # 1.5 CPUs: 2 vCPUs
        assert _vcpus(domain)["current live"] == 2
        assert _vcpus(domain)["current config"] == 2  # the definition too
        res = pod.status().status.resources.linux
        assert (res.cpu_quota, res.cpu_period) == (150_000, 100_000)
        extra = json.loads(pod.status(verbose=True).info["info"])["extra"]
        assert (extra["vcpus"], extra["max_vcpus"]) == (2, 2)
        # the guest has the new CPU, and online (virtletd asked its guest agent to online it: within the call, or,
        # when the busy guest had not seen the CPU yet, from a background thread afterwards)
        cpu = "/sys/devices/system/cpu"
        deadline = time.monotonic() + 240  # the guest's agent may connect late (qemu-ga starts after the marker)
        while True:
            out = pod.rt.ExecSync(api.ExecSyncRequest(container_id=pod.container_id,
                                                      cmd=["cat", f"{cpu}/present", f"{cpu}/online"], timeout=60),
                                  timeout=90)
            if out.stdout.decode().split() == ["0-1", "0-1"] or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert out.stdout.decode().split() == ["0-1", "0-1"], out
        # beyond the maximum: FAILED_PRECONDITION naming what to do; nothing changes
        with pytest.raises(grpc.RpcError) as err:
            _update(pod, 250_000)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "VirtletMaxVCPUs" in (err.value.details() or "") and "needs 3 vCPUs" in (err.value.details() or "")
        assert pod.status().status.resources.linux.cpu_quota == 150_000
        assert _vcpus(domain)["current live"] == 2
    finally:
        pod.stop_and_remove()
