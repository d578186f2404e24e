"""What CreateContainer checks in a container's config and what ContainerStatus gives back from it, through a
running virtletd (libvirt's test driver: no VM needs to boot), compared with what containerd does (issue 17)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import small_translated_image
from virtlet.cri.gen import api_pb2 as api

IMAGE = "virtlet.cloud/config-test/vm"


@pytest.fixture
def vm_image(world_dir: Path, image_server: Any) -> str:
    return small_translated_image(world_dir, image_server, IMAGE.removeprefix("virtlet.cloud/"))


class Pod:
    def __init__(self, daemon: VirtletdProcess, world_dir: Path, name: str) -> None:
        self.rt = daemon.runtime()
        self.config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}"), hostname=name,
            log_directory=str(world_dir / "logs" / name), linux=api.LinuxPodSandboxConfig())
        self.id = self.rt.RunPodSandbox(api.RunPodSandboxRequest(config=self.config), timeout=60).pod_sandbox_id

    def request(self, cfg: api.ContainerConfig) -> api.CreateContainerRequest:
        cfg.metadata.name = "vm"
        cfg.image.image = IMAGE
        cfg.log_path = "vm.log"
        return api.CreateContainerRequest(pod_sandbox_id=self.id, config=cfg, sandbox_config=self.config)

    def remove(self) -> None:
        self.rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=self.id), timeout=60)
        self.rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=self.id), timeout=60)


@pytest.fixture
def pod(virtletd: VirtletdProcess, world_dir: Path, vm_image: str) -> Any:
    virtletd.image().PullImage(api.PullImageRequest(image=api.ImageSpec(image=vm_image)), timeout=120)
    p = Pod(virtletd, world_dir, "config-checks")
    try:
        yield p
    finally:
        p.remove()


def test_run_as_group_without_a_user_is_refused_like_containerd(pod: Pod) -> None:
    cfg = api.ContainerConfig()
    cfg.linux.security_context.run_as_group.value = 1000
    with pytest.raises(grpc.RpcError) as err:
        pod.rt.CreateContainer(pod.request(cfg), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert 'user group "1000" is specified without user' in details and "security_context" in details, details
    assert pod.rt.ListContainers(api.ListContainersRequest(), timeout=10).containers == []
    # with a user (by id or by name) it is accepted
    for set_user in (lambda sc: sc.run_as_user.__setattr__("value", 1000),
                     lambda sc: sc.__setattr__("run_as_username", "guest")):
        ok = api.ContainerConfig()
        ok.linux.security_context.run_as_group.value = 1000
        set_user(ok.linux.security_context)
        cid = pod.rt.CreateContainer(pod.request(ok), timeout=60).container_id
        pod.rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=60)


def test_privileged_container_in_an_unprivileged_sandbox_is_refused_like_containerd(pod: Pod) -> None:
    cfg = api.ContainerConfig()
    cfg.linux.security_context.privileged = True
    with pytest.raises(grpc.RpcError) as err:
        pod.rt.CreateContainer(pod.request(cfg), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no privileged container allowed in sandbox" in (err.value.details() or "")
    # the kubelet marks the sandbox privileged when a container of the pod is: accepted
    req = pod.request(cfg)
    req.sandbox_config.linux.security_context.privileged = True
    cid = pod.rt.CreateContainer(req, timeout=60).container_id
    pod.rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=60)


def test_container_status_lists_the_mounts_of_the_config(pod: Pod, world_dir: Path) -> None:
    """containerd's ContainerStatus gives back the config's mounts as they were asked for: so does virtletd."""
    (world_dir / "logs").mkdir(exist_ok=True)  # a volume's host path exists (virtletd refuses a missing one)
    mounts = [api.Mount(container_path="/data", host_path=str(world_dir), readonly=True),
              api.Mount(container_path="/scratch", host_path=str(world_dir / "logs"),
                        propagation=api.PROPAGATION_PRIVATE, selinux_relabel=True)]
    cid = pod.rt.CreateContainer(pod.request(api.ContainerConfig(mounts=mounts)), timeout=60).container_id
    try:
        status = pod.rt.ContainerStatus(api.ContainerStatusRequest(container_id=cid), timeout=30).status
        assert list(status.mounts) == mounts
        listed = pod.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=pod.id), timeout=30)
        assert [list(c.mounts) for c in listed.containers_statuses] == [mounts]
    finally:
        pod.rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=60)
