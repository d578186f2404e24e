"""UpdateContainerResources on a real QEMU VM (issue 17): memory through the balloon up to the VM's size at
create, the whole VM's CPU shares/quota/period through libvirt's scheduler parameters, pinning to host CPUs, clear
errors for what cannot be applied, and ContainerStatus reporting the resources in force."""

from __future__ import annotations

import os
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

MiB = 1 << 20


def _virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], capture_output=True, text=True,
                          check=True).stdout


def _current_kib(domain: str) -> int:
    found = re.search(r"<currentMemory unit='KiB'>(\d+)</currentMemory>", _virsh("dumpxml", domain))
    return int(found.group(1)) if found else 0


def _update(pod: Pod, **linux: object) -> None:
    pod.rt.UpdateContainerResources(api.UpdateContainerResourcesRequest(
        container_id=pod.container_id, linux=api.LinuxContainerResources(**linux)), timeout=60)


def _refused(pod: Pod, **linux: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        _update(pod, **linux)
    return err.value.code(), err.value.details() or ""


def test_update_container_resources_applies_or_refuses(vm_virtletd: VirtletdProcess, world_dir: Path,
                                                       served_tiny: str) -> None:  # noqa: F811
    _pull(vm_virtletd, served_tiny)
    pod = Pod(vm_virtletd, world_dir, "vm-resize", image=served_tiny, memory=256 * MiB)
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        domain = f"virtlet-{pod.container_id}"
        assert pod.status().status.resources.linux.memory_limit_in_bytes == 256 * MiB
        pod.wait_log(MARKER)  # the guest's balloon driver is loaded
        # memory down through the balloon: the guest gives it back (libvirt's current memory) and
        # ContainerStatus says so
        _update(pod, memory_limit_in_bytes=192 * MiB)
        assert pod.status().status.resources.linux.memory_limit_in_bytes == 192 * MiB
        deadline = time.monotonic() + 60
        while _current_kib(domain) != 192 * 1024 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _current_kib(domain) == 192 * 1024, _virsh("dommemstat", domain)
        # more than the VM was created with: refused, naming the field and the maximum; nothing changes
        code, details = _refused(pod, memory_limit_in_bytes=512 * MiB)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "memory_limit_in_bytes" in details, details
        assert str(256 * MiB) in details, details
        assert pod.status().status.resources.linux.memory_limit_in_bytes == 192 * MiB
        # CPU: the whole VM's shares, quota and period
        _update(pod, cpu_shares=512, cpu_quota=50_000, cpu_period=100_000)
        sched = _virsh("schedinfo", domain)
        assert re.search(r"cpu_shares\s*:\s*512\b", sched) and re.search(r"global_quota\s*:\s*50000\b", sched), sched
        res = pod.status().status.resources.linux
        assert (res.cpu_shares, res.cpu_quota, res.cpu_period) == (512, 50_000, 100_000)
        # pinning (the kubelet's static CPU manager): every vCPU and QEMU's emulator threads, live
        last = (os.cpu_count() or 1) - 1
        _update(pod, cpuset_cpus=str(last))
        assert re.search(rf"^\s*0\s+{last}\s*$", _virsh("vcpupin", domain, "--live"), re.M), \
            _virsh("vcpupin", domain, "--live")
        assert re.search(rf"\*:\s+{last}\s*$", _virsh("emulatorpin", domain, "--live"), re.M), \
            _virsh("emulatorpin", domain, "--live")
        assert pod.status().status.resources.linux.cpuset_cpus == str(last)
        code, details = _refused(pod, cpuset_cpus=f"0-{last + 1}")  # a CPU the node does not have
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "cpuset_cpus" in details, details
        # NUMA memory nodes cannot change live
        code, details = _refused(pod, cpuset_mems="0")
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "cpuset_mems" in details, details
        # an exited VM has nothing to update
        pod.rt.StopContainer(api.StopContainerRequest(container_id=pod.container_id, timeout=60), timeout=120)
        code, details = _refused(pod, memory_limit_in_bytes=128 * MiB)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "EXITED" in details, details
    finally:
        pod.stop_and_remove()
