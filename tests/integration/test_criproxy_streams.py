"""The ``Stream*`` list calls and ``GetContainerEvents`` through virtlet-criproxy, with real backends.

Stream* answers must be the merged lists (both runtimes, secondary ids shown as 64-hex, filters routed).
GetContainerEvents must be the merge of every backend's events, and must never leave the kubelet listening to
a stream that silently misses a runtime: a backend without events (containerd 1.6) makes the whole call
UNIMPLEMENTED (the kubelet then relists), a backend that goes away ends the stream with an error (the evented
PLEG relists and subscribes again) instead of hanging.  Real containerd 1.6, real virtletds, real proxy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.helpers.containerd import ContainerdProcess
from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_criproxy import ProxyProcess, _pod, _run_container
from tests.integration.test_criproxy import containerd as containerd
from tests.integration.test_criproxy import proxy as proxy
from tests.integration.test_criproxy import vm_image as vm_image
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy.state import HEX64

pytestmark = pytest.mark.network


def _vm_container(rt: Any, sid: str, cfg: api.PodSandboxConfig, image: str) -> str:
    return str(rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=cfg, config=(
        api.ContainerConfig(metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=image),
                            log_path="vm/0.log"))), timeout=60).container_id)


def _streamed(call: Any, request: Any, field: str) -> list[Any]:
    return [item for msg in call(request, timeout=10) for item in getattr(msg, field)]


def test_stream_lists_are_the_merged_lists(world_dir: Path, containerd: ContainerdProcess,
                                           virtletd: VirtletdProcess, proxy: ProxyProcess, vm_image: str) -> None:
    rt, img = proxy.runtime(), proxy.image()
    img.PullImage(api.PullImageRequest(image=api.ImageSpec(image=vm_image)), timeout=60)
    plain_cfg = _pod(world_dir, "plain")
    plain = rt.RunPodSandbox(api.RunPodSandboxRequest(config=plain_cfg), timeout=60).pod_sandbox_id
    plain_c = _run_container(rt, plain, plain_cfg)
    vm_cfg = _pod(world_dir, "vm")
    vm = rt.RunPodSandbox(api.RunPodSandboxRequest(config=vm_cfg, runtime_handler="virtlet"),
                          timeout=60).pod_sandbox_id
    vm_c = _vm_container(rt, vm, vm_cfg, vm_image)
    try:
        sandboxes = _streamed(rt.StreamPodSandboxes, api.StreamPodSandboxesRequest(), "pod_sandboxes")
        assert {s.id for s in sandboxes} == {plain, vm} and all(HEX64.match(s.id) for s in sandboxes)
        listed = rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=10).items
        assert sorted(s.SerializeToString() for s in sandboxes) == sorted(s.SerializeToString() for s in listed)
        only_vm = _streamed(rt.StreamPodSandboxes, api.StreamPodSandboxesRequest(
            filter=api.PodSandboxFilter(id=vm)), "pod_sandboxes")
        assert [s.id for s in only_vm] == [vm]

        containers = _streamed(rt.StreamContainers, api.StreamContainersRequest(), "containers")
        assert {(c.id, c.pod_sandbox_id) for c in containers} == {(plain_c, plain), (vm_c, vm)}
        vm_image_of = {c.id: c.image.image for c in containers}[vm_c]
        assert vm_image_of.startswith("virtlet.cloud/")
        in_vm_pod = _streamed(rt.StreamContainers, api.StreamContainersRequest(
            filter=api.ContainerFilter(pod_sandbox_id=vm)), "containers")
        assert [c.id for c in in_vm_pod] == [vm_c]

        stats = _streamed(rt.StreamContainerStats, api.StreamContainerStatsRequest(), "container_stats")
        assert {s.attributes.id for s in stats} == {plain_c, vm_c}
        # (containerd 1.6 here cannot answer pod stats without a cgroup parent: ask for the VM pod only)
        pod_stats = _streamed(rt.StreamPodSandboxStats, api.StreamPodSandboxStatsRequest(
            filter=api.PodSandboxStatsFilter(id=vm)), "pod_sandbox_stats")
        assert [s.attributes.id for s in pod_stats] == [vm]
    finally:
        rt.RemoveContainer(api.RemoveContainerRequest(container_id=vm_c), timeout=60)
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=vm), timeout=60)
        rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=vm), timeout=60)
        rt.StopContainer(api.StopContainerRequest(container_id=plain_c, timeout=1), timeout=60)
        rt.RemoveContainer(api.RemoveContainerRequest(container_id=plain_c), timeout=60)
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=plain), timeout=60)
        rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=plain), timeout=60)
