"""Per-RPC preconditions through a running virtletd (libvirt's test driver, a real CNI bridge, the streaming
server on): every check of "cmd is required", "the container is running" and "the sandbox is READY" answers
the kubelet with one message per condition, naming the RPC (virtlet.preconditions)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import NetnsGuard, running_virtletd
from virtlet.cri.gen import api_pb2 as api

pytestmark = pytest.mark.network

IMAGE = "precond/img"


@pytest.fixture
def daemon(world_dir: Path, bridge_cni: Path, netns_guard: NetnsGuard, image_server: Any) -> Iterator[VirtletdProcess]:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image_server.root / "a.qcow2"), "16M"],
                   check=True)
    tdir = world_dir / "translations"
    tdir.mkdir(exist_ok=True)
    (tdir / "precond.yaml").write_text(
        f"translations:\n  - name: {IMAGE}\n    url: {image_server.url('files/a.qcow2')}\n")
    flags = ["--libvirt-uri", "test:///default", "--kvm", "off", "--stream-address", "127.0.0.1:0"]
    with running_virtletd(world_dir, netns_guard, bridge_cni, flags) as d:
        yield d


def _refused(call: Any, request: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call(request, timeout=30)
    return exc.value


def test_one_message_per_precondition(daemon: VirtletdProcess, world_dir: Path) -> None:
    rt, img = daemon.runtime(), daemon.image()
    sb_cfg = api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="precond", namespace="default", uid="uid-precond"),
        hostname="precond", log_directory=str(world_dir / "pod-logs"),
        annotations={"kubernetes.io/target-runtime": "virtlet.cloud"})
    sid = rt.RunPodSandbox(api.RunPodSandboxRequest(config=sb_cfg), timeout=120).pod_sandbox_id
    img.PullImage(api.PullImageRequest(image=api.ImageSpec(image=IMAGE)), timeout=120)
    c_cfg = api.ContainerConfig(metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=IMAGE),
                                log_path="vm/0.log", annotations={"kubernetes.io/target-runtime": "virtlet.cloud"})
    cid = rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=sid, config=c_cfg, sandbox_config=sb_cfg),
                             timeout=120).container_id

    # cmd is required: the same words for ExecSync and Exec
    for call, req in ((rt.ExecSync, api.ExecSyncRequest(container_id=cid, cmd=[])),
                      (rt.Exec, api.ExecRequest(container_id=cid, cmd=[""], stdout=True))):
        err = _refused(call, req)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().endswith("cmd is required (the program and its arguments)"), err.details()

    # the container is CREATED, not running: one message for every RPC that needs its VM
    for rpc, call, req in (
            ("ExecSync", rt.ExecSync, api.ExecSyncRequest(container_id=cid, cmd=["true"])),
            ("Exec", rt.Exec, api.ExecRequest(container_id=cid, cmd=["true"], stdout=True)),
            ("Attach", rt.Attach, api.AttachRequest(container_id=cid, stdout=True)),
            ("ReopenContainerLog", rt.ReopenContainerLog, api.ReopenContainerLogRequest(container_id=cid))):
        err = _refused(call, req)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (rpc, err)
        assert err.details() == f"{rpc}: container {cid} is CREATED; only a running VM accepts {rpc}"

    # the sandbox is stopped (NOTREADY): CreateContainer and PortForward say so the same way
    rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=120)
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    for rpc, call, req in (
            ("CreateContainer", rt.CreateContainer,
             api.CreateContainerRequest(pod_sandbox_id=sid, config=c_cfg, sandbox_config=sb_cfg)),
            ("PortForward", rt.PortForward, api.PortForwardRequest(pod_sandbox_id=sid, port=[22]))):
        err = _refused(call, req)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (rpc, err)
        assert err.details() == f"{rpc}: pod sandbox {sid} is NOTREADY; only a READY sandbox accepts {rpc}"
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
