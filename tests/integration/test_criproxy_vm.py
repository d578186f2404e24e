"""The whole node path through the CRI proxy only: an ordinary pod runs on a real containerd while a tiny-image
VM pod boots on virtletd (real libvirt/QEMU), side by side, then both are stopped and removed."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.containerd import ContainerdProcess
from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_criproxy import ProxyProcess, _pod, _run_container
from tests.integration.test_criproxy import containerd as containerd
from tests.integration.test_vm_lifecycle import MARKER
from virtlet.console.cri_format import read_cri_lines
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy.state import HEX64

pytestmark = [pytest.mark.libvirt, pytest.mark.network]


@pytest.fixture
def vm_proxy(world_dir: Path, containerd: ContainerdProcess,
             vm_virtletd: VirtletdProcess) -> Iterator[ProxyProcess]:
    p = ProxyProcess(world_dir, containerd.address, f"unix://{vm_virtletd.socket}").start()
    try:
        yield p
    finally:
        assert p.stop() == 0


def test_vm_pod_and_container_pod_through_the_proxy(vm_proxy: ProxyProcess, world_dir: Path, image_server: Any,
                                                    tiny_image: Path) -> None:
    import time

    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    vm_image = "virtlet.cloud/" + image_server.name("files/tiny.qcow2")
    rt, img = vm_proxy.runtime(), vm_proxy.image()
    ref = img.PullImage(api.PullImageRequest(image=api.ImageSpec(image=vm_image)), timeout=300).image_ref
    assert ref.startswith("virtlet.cloud/")
    plain_cfg = _pod(world_dir, "plain")
    plain = rt.RunPodSandbox(api.RunPodSandboxRequest(config=plain_cfg), timeout=120).pod_sandbox_id
    assert HEX64.match(plain)
    plain_c = _run_container(rt, plain, plain_cfg)
    vm_cfg = _pod(world_dir, "vm-by-handler")
    vm = rt.RunPodSandbox(api.RunPodSandboxRequest(config=vm_cfg, runtime_handler="virtlet"),
                          timeout=120).pod_sandbox_id
    assert HEX64.match(vm)
    vm_c = rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=vm, sandbox_config=vm_cfg, config=(
        api.ContainerConfig(metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=vm_image),
                            log_path="vm/0.log"))), timeout=120).container_id
    assert HEX64.match(vm_c) and len({plain[:13], vm[:13], vm_c[:13], plain_c[:13]}) == 4
    rt.StartContainer(api.StartContainerRequest(container_id=vm_c), timeout=120)
    log_path = Path(rt.ContainerStatus(api.ContainerStatusRequest(container_id=vm_c)).status.log_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if log_path.exists() and any(MARKER in line for line in read_cri_lines(log_path)):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"VM did not boot through the proxy: {log_path}")
    states = {c.id: c.state for c in rt.ListContainers(api.ListContainersRequest()).containers}
    assert states[plain_c] == api.CONTAINER_RUNNING and states[vm_c] == api.CONTAINER_RUNNING
    assert {vm, plain} <= {s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest()).items}
    _kubelet_polls_through_the_proxy(rt, vm, vm_c, plain_c)
    for cid, sid in ((vm_c, vm), (plain_c, plain)):
        rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=10), timeout=120)
        rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=120)
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert rt.ListPodSandbox(api.ListPodSandboxRequest(filter=api.PodSandboxFilter(
        label_selector={"test": "criproxy"}))).items == []


def _kubelet_polls_through_the_proxy(rt: Any, vm: str, vm_c: str, plain_c: str) -> None:
    """What the kubelet asks of running pods besides their state: stats from both runtimes merged under the
    proxy's ids, and exec probes answered by the VM's guest agent."""
    import time

    import grpc

    stats = {s.attributes.id: s for s in rt.ListContainerStats(api.ListContainerStatsRequest(), timeout=30).stats}
    assert {vm_c, plain_c} <= stats.keys()
    assert stats[vm_c].writable_layer.used_bytes.value > 0 and stats[vm_c].cpu.usage_core_nano_seconds.value > 0
    pod_stats = rt.PodSandboxStats(api.PodSandboxStatsRequest(pod_sandbox_id=vm), timeout=30).stats
    assert pod_stats.attributes.id == vm and [c.attributes.id for c in pod_stats.linux.containers] == [vm_c]
    deadline = time.monotonic() + 60  # qemu-ga starts after the boot marker
    while True:
        try:
            probe = rt.ExecSync(api.ExecSyncRequest(container_id=vm_c, cmd=["sh", "-c", "echo ready; exit 3"],
                                                    timeout=10), timeout=40)
            break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.FAILED_PRECONDITION or time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert (probe.exit_code, probe.stdout) == (3, b"ready\n")
