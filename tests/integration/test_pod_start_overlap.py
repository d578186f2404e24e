"""Pod start over gRPC with the work virtletd overlaps (issue 20): RunPodSandbox replies before the pod's DHCP
server finished starting; StartContainer waits for it, or starts it again when it died meanwhile, so a started
VM always has its server; a sandbox stopped at once leaves no server behind.  virtletd with libvirt's test
driver, a real CNI bridge network, real netns and DHCP processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import small_translated_image
from virtlet import procs
from virtlet.cri.gen import api_pb2 as api

IMAGE = "virtlet.cloud/overlap-test/vm"


@pytest.fixture
def vm_image(world_dir: Path, image_server: Any) -> str:
    return small_translated_image(world_dir, image_server, IMAGE.removeprefix("virtlet.cloud/"))


def _servers(sandbox_id: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"virtlet.network.dhcp_server.*{sandbox_id}"], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def _wait_gone(pid: int) -> None:
    for _ in range(200):
        if not procs.running(pid):
            return
        time.sleep(0.05)


def _run(rt: Any, world_dir: Path, name: str) -> tuple[str, api.PodSandboxConfig]:
    cfg = api.PodSandboxConfig(metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}"),
                               hostname=name, log_directory=str(world_dir / "logs" / name))
    return rt.RunPodSandbox(api.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id, cfg


def test_start_container_waits_for_or_restarts_the_dhcp_server(virtletd: VirtletdProcess, world_dir: Path,
                                                               vm_image: str) -> None:
    rt, img = virtletd.runtime(), virtletd.image()
    img.PullImage(api.PullImageRequest(image=api.ImageSpec(image=vm_image)), timeout=120)
    sid, sb_cfg = _run(rt, world_dir, "overlap")
    st = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True), timeout=30)
    spawned = json.loads(st.info["info"])["network"]["dhcp_pid"]
    assert spawned in _servers(sid)
    os.kill(spawned, signal.SIGKILL)  # the server dies before the VM starts
    _wait_gone(spawned)
    cfg = api.ContainerConfig(metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=vm_image),
                              log_path="vm.log")
    cid = rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg),
                             timeout=60).container_id
    rt.StartContainer(api.StartContainerRequest(container_id=cid), timeout=60)
    running = _servers(sid)
    assert len(running) == 1 and running[0] != spawned, "StartContainer did not start the dead DHCP server again"
    rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=0), timeout=60)
    rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=60)
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    _wait_gone(running[0])
    assert _servers(sid) == []


def test_sandbox_stopped_at_once_leaves_no_dhcp_server(virtletd: VirtletdProcess, world_dir: Path) -> None:
    """StopPodSandbox right after RunPodSandbox, while the server may still be starting (no pid file yet)."""
    rt = virtletd.runtime()
    for n in range(3):
        sid, _cfg = _run(rt, world_dir, f"quick-{n}")
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        assert _servers(sid) == [], f"the DHCP server of sandbox {sid} outlived it"
