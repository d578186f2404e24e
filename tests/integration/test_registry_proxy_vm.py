"""Issue 16's acceptance through the CRI proxy: one registry (Debian's docker-registry, htpasswd Basic auth) on
loopback serves both a containerDisk and an ordinary busybox image.  The VM pod's image is pulled by virtletd
(a translation to ``oci://``) and boots on real QEMU; the ordinary pod's image is pulled by the real containerd
with the same credentials, both through the proxy's image service."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.helpers.containerd import ContainerdProcess
from tests.helpers.registry import REGISTRY_BIN, Pusher, Registry, basic
from tests.integration.test_criproxy import ProxyProcess, _pod
from tests.integration.test_criproxy import containerd as containerd
from tests.integration.test_criproxy_vm import vm_proxy as vm_proxy
from tests.integration.test_vm_lifecycle import MARKER
from virtlet.console.cri_format import read_cri_lines
from virtlet.cri.gen import api_pb2 as api

pytestmark = [pytest.mark.libvirt, pytest.mark.network,
              pytest.mark.skipif(not os.path.exists(REGISTRY_BIN), reason="docker-registry is not installed")]

USER, PASSWORD = "bob", "pw-Proxy-7781-secret"


@pytest.fixture
def registry(world_dir: Path, tiny_image: Path) -> Iterator[tuple[Registry, str, str]]:
    base = world_dir / "registry"
    base.mkdir()
    with Registry(base, users={USER: PASSWORD}) as reg:
        push = Pusher(reg.host, basic(USER, PASSWORD))
        disk = push.container_disk("vm/tiny", "v1", tiny_image)
        plain = push.busybox("plain/busybox", "1")
        yield reg, disk, plain


def _wait_marker(log_path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if log_path.exists() and any(MARKER in line for line in read_cri_lines(log_path)):
            return
        time.sleep(1)
    raise AssertionError(f"VM did not boot from the registry image: {log_path}")


def test_vm_from_registry_beside_containerd_pod_through_the_proxy(
        vm_proxy: ProxyProcess, containerd: ContainerdProcess, world_dir: Path,
        registry: tuple[Registry, str, str]) -> None:
    reg, disk_digest, plain_digest = registry
    (world_dir / "translations").mkdir(exist_ok=True)
    (world_dir / "translations" / "registry.yaml").write_text(
        f"translations:\n  - name: regproxy/tiny\n    url: oci://{reg.host}/vm/tiny:v1\n")
    vm_image, plain_image = "virtlet.cloud/regproxy/tiny", f"{reg.host}/plain/busybox:1"
    auth = api.AuthConfig(username=USER, password=PASSWORD)
    rt, img = vm_proxy.runtime(), vm_proxy.image()

    for image in (vm_image, plain_image):  # no credentials: both runtimes are refused by the registry
        with pytest.raises(grpc.RpcError) as exc:
            img.PullImage(api.PullImageRequest(image=api.ImageSpec(image=image)), timeout=120)
        assert exc.value.code() != grpc.StatusCode.OK
    vm_ref = img.PullImage(api.PullImageRequest(image=api.ImageSpec(image=vm_image), auth=auth),
                           timeout=300).image_ref
    plain_ref = img.PullImage(api.PullImageRequest(image=api.ImageSpec(image=plain_image), auth=auth),
                              timeout=120).image_ref
    assert vm_ref.startswith("virtlet.cloud/") and plain_ref and not plain_ref.startswith("virtlet.cloud/")
    status = img.ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=vm_image)), timeout=30).image
    assert f"{reg.host}/vm/tiny@{disk_digest}" in " ".join(status.repo_digests), status
    plain_status = img.ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=plain_image)), timeout=30)
    assert f"{reg.host}/plain/busybox@{plain_digest}" in plain_status.image.repo_digests

    plain_cfg = _pod(world_dir, "reg-plain")
    plain = rt.RunPodSandbox(api.RunPodSandboxRequest(config=plain_cfg), timeout=120).pod_sandbox_id
    plain_c = rt.CreateContainer(api.CreateContainerRequest(
        pod_sandbox_id=plain, sandbox_config=plain_cfg, config=api.ContainerConfig(
            metadata=api.ContainerMetadata(name="sleeper"), image=api.ImageSpec(image=plain_image),
            command=["/bin/sleep", "3600"], log_path="sleeper.log")), timeout=60).container_id
    rt.StartContainer(api.StartContainerRequest(container_id=plain_c), timeout=60)
    vm_cfg = _pod(world_dir, "reg-vm")
    vm = rt.RunPodSandbox(api.RunPodSandboxRequest(config=vm_cfg, runtime_handler="virtlet"),
                          timeout=120).pod_sandbox_id
    vm_c = rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=vm, sandbox_config=vm_cfg, config=(
        api.ContainerConfig(metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=vm_image),
                            log_path="vm/0.log"))), timeout=120).container_id
    try:
        rt.StartContainer(api.StartContainerRequest(container_id=vm_c), timeout=120)
        vm_status = rt.ContainerStatus(api.ContainerStatusRequest(container_id=vm_c)).status
        _wait_marker(Path(vm_status.log_path), 240)
        states = {c.id: c.state for c in rt.ListContainers(api.ListContainersRequest()).containers}
        assert states[plain_c] == api.CONTAINER_RUNNING and states[vm_c] == api.CONTAINER_RUNNING
    finally:
        for cid, sid in ((vm_c, vm), (plain_c, plain)):
            rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=10), timeout=120)
            rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=120)
            rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
            rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    assert PASSWORD.encode() not in (world_dir / "virtletd.log").read_bytes()
    assert PASSWORD.encode() not in vm_proxy.log_path.read_bytes()
