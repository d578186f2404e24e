"""The ``Stream*`` list calls and ``GetContainerEvents`` through virtlet-criproxy, with real backends.

Stream* answers must be the merged lists (both runtimes, secondary ids shown as 64-hex, filters routed).
GetContainerEvents must be the merge of every backend's events, and must never leave the kubelet listening to
a stream that silently misses a runtime: a backend without events (containerd 1.6) makes the whole call
UNIMPLEMENTED (the kubelet then relists), a backend that goes away ends the stream with an error (the evented
PLEG relists and subscribes again) instead of hanging.  Real containerd 1.6, real virtletds, real proxy.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.containerd import ContainerdProcess
from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import NetnsGuard, running_virtletd
from tests.integration.test_criproxy import ProxyProcess, _pod, _run_container
from tests.integration.test_criproxy import containerd as containerd
from tests.integration.test_criproxy import proxy as proxy
from tests.integration.test_criproxy import vm_image as vm_image
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy.naming import external_id
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


class Events(threading.Thread):
    """A GetContainerEvents subscription through the proxy, read in the background: ``got`` has the events
    (or ``("end", code, details)`` last); it returns once the proxy confirmed the subscription (headers)."""

    def __init__(self, rt: Any) -> None:
        super().__init__(daemon=True)
        self.call = rt.GetContainerEvents(api.GetEventsRequest(), timeout=120)
        self.got: queue.Queue[Any] = queue.Queue()
        self.call.initial_metadata()
        self.start()

    def run(self) -> None:
        try:
            for ev in self.call:
                self.got.put(ev)
            self.got.put(("end", grpc.StatusCode.OK, ""))
        except grpc.RpcError as exc:
            self.got.put(("end", exc.code(), exc.details()))

    def next(self, timeout: float = 30.0) -> Any:
        return self.got.get(timeout=timeout)

    def until_deleted(self, cid: str, timeout: float = 30.0) -> None:
        """Events up to ``cid``'s DELETED one (a removal of a created container also reports it stopped)."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.got.get(timeout=max(0.1, deadline - time.monotonic()))
            assert not isinstance(ev, tuple), ev
            if ev.container_id == cid and ev.container_event_type == api.CONTAINER_DELETED_EVENT:
                return

    def until_end(self, timeout: float = 30.0) -> tuple[Any, str]:
        deadline = time.monotonic() + timeout
        while True:
            item = self.got.get(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(item, tuple):
                return item[1], item[2]


def test_events_are_unimplemented_when_a_backend_has_none(world_dir: Path, containerd: ContainerdProcess,
                                                          virtletd: VirtletdProcess, proxy: ProxyProcess) -> None:
    """containerd 1.6 has no events: a stream with virtletd's alone would hide every ordinary pod's changes
    from the evented PLEG, so the whole call answers UNIMPLEMENTED, at once, naming the runtime."""
    started = time.monotonic()
    events = Events(proxy.runtime())
    code, details = events.until_end(timeout=30)
    assert code == grpc.StatusCode.UNIMPLEMENTED and "primary runtime" in details, (code, details)
    assert time.monotonic() - started < 20


@pytest.fixture
def two_virtletds(world_dir: Path, virtletd: VirtletdProcess, bridge_cni: Path,
                  netns_guard: NetnsGuard) -> Iterator[tuple[ProxyProcess, VirtletdProcess, VirtletdProcess]]:
    """The proxy with a second virtletd as its primary (a runtime that has events) and ``virtletd`` as
    ``virtlet.cloud``."""
    base = world_dir / "primary"
    base.mkdir()
    with running_virtletd(base, netns_guard, bridge_cni, ["--libvirt-uri", "test:///default", "--kvm", "off"]) \
            as primary:
        p = ProxyProcess(world_dir, f"unix://{primary.socket}", f"unix://{virtletd.socket}").start()
        try:
            yield p, primary, virtletd
        finally:
            assert p.stop() == 0, p.log()


def test_events_of_both_runtimes_merged_and_ended_by_an_outage(
        world_dir: Path, two_virtletds: tuple[ProxyProcess, VirtletdProcess, VirtletdProcess], vm_image: str) -> None:
    proxy, primary, secondary = two_virtletds
    rt = proxy.runtime()
    raw_image = vm_image.removeprefix("virtlet.cloud/")
    (world_dir / "primary" / "translations").symlink_to(world_dir / "translations")
    primary.image().PullImage(api.PullImageRequest(image=api.ImageSpec(image=raw_image)), timeout=60)
    proxy.image().PullImage(api.PullImageRequest(image=api.ImageSpec(image=vm_image)), timeout=60)

    events = Events(rt)
    pods: dict[str, tuple[str, str]] = {}
    for name, handler, image in (("on-primary", "", raw_image), ("on-vm", "virtlet", vm_image)):
        cfg = _pod(world_dir, name)
        sid = rt.RunPodSandbox(api.RunPodSandboxRequest(config=cfg, runtime_handler=handler),
                               timeout=60).pod_sandbox_id
        pods[name] = (sid, _vm_container(rt, sid, cfg, image))
    got = [events.next() for _ in range(2)]
    assert {(e.container_id, e.container_event_type, e.pod_sandbox_status.id) for e in got} == {
        (cid, api.CONTAINER_CREATED_EVENT, sid) for sid, cid in pods.values()}
    raw_vm_c = secondary.runtime().ListContainers(api.ListContainersRequest(), timeout=10).containers[0].id
    assert pods["on-vm"][1] == external_id("virtlet.cloud", raw_vm_c) and HEX64.match(pods["on-vm"][1])

    # virtletd SIGKILLed: the kubelet's stream ends with an error naming it (it relists), it does not hang
    secondary.kill()
    code, details = events.until_end(timeout=30)
    assert code == grpc.StatusCode.UNAVAILABLE and "virtlet.cloud" in details, (code, details)

    # subscribed while it is down: the primary's events flow; its return ends the stream (a gap to relist)
    events = Events(rt)
    rt.RemoveContainer(api.RemoveContainerRequest(container_id=pods["on-primary"][1]), timeout=60)
    events.until_deleted(pods["on-primary"][1])
    secondary.start()
    code, details = events.until_end(timeout=30)
    assert code == grpc.StatusCode.UNAVAILABLE and "answers again" in details, (code, details)

    events = Events(rt)
    rt.RemoveContainer(api.RemoveContainerRequest(container_id=pods["on-vm"][1]), timeout=60)
    events.until_deleted(pods["on-vm"][1])
    events.call.cancel()
    for sid, _ in pods.values():
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
