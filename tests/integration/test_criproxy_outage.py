"""The kubelet's view through virtlet-criproxy while virtletd is SIGKILLed and restarted, and across proxy
restarts: a live VM pod must never look deleted, and ids must look like containerd's.

``Pleg`` does what the kubelet's PLEG and pod workers do with the answers: relist every second, compare with
the previous relist, and decide "needs a new sandbox" when a pod's sandbox vanished or is no longer ready
(kuberuntime's computePodActions), or "container gone" when a container vanished.  A failed relist or status
call is skipped, as the kubelet skips it.  Real containerd, real virtletd (libvirt test driver), real proxy.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.containerd import ContainerdProcess
from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_criproxy import ProxyProcess, _code, _pod, _run_container
from tests.integration.test_criproxy import containerd as containerd
from tests.integration.test_criproxy import proxy as proxy
from tests.integration.test_criproxy import vm_image as vm_image
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy.naming import external_id
from virtlet.proxy.state import HEX64

pytestmark = pytest.mark.network

# what Fluent Bit's / Promtail's kubernetes parsers expect of /var/log/containers/ links
LOG_LINK = re.compile(r"^(?P<pod>[a-z0-9.-]+)_(?P<ns>[^_]+)_(?P<container>.+)-(?P<id>[0-9a-f]{64})\.log$")


class Pleg(threading.Thread):
    """A kubelet's relist loop over ``uids`` (pod uids it runs); ``decisions`` lists what it would act on."""

    def __init__(self, rt: Any, uids: set[str]) -> None:
        super().__init__(daemon=True)
        self.rt, self.uids = rt, uids
        self.stop = threading.Event()
        self.decisions: list[str] = []
        self.relists = self.skipped = 0
        self.seen_while: dict[str, int] = {}
        self.phase = "up"
        self._containers: set[str] | None = None

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                sandboxes = self.rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=5).items
                containers = {c.id for c in self.rt.ListContainers(api.ListContainersRequest(), timeout=5)
                              .containers}
            except grpc.RpcError:
                self.skipped += 1  # GenericPLEG: "Unable to retrieve pods": no events, no actions
                continue
            self.relists += 1
            self.seen_while[self.phase] = self.seen_while.get(self.phase, 0) + 1
            for uid in self.uids:
                mine = sorted((s for s in sandboxes if s.metadata.uid == uid), key=lambda s: s.created_at)
                if not mine:
                    self.decisions.append(f"{self.phase}: no sandbox for {uid}: need to start a new one")
                    continue
                try:
                    st = self.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=mine[-1].id),
                                                  timeout=5).status
                except grpc.RpcError:
                    continue  # GetPodStatus failed: the pod worker does not sync this round
                if mine[-1].state != api.SANDBOX_READY or st.state != api.SANDBOX_READY:
                    self.decisions.append(f"{self.phase}: sandbox of {uid} not ready: need a new one")
            if self._containers is not None:
                for gone in self._containers - containers:
                    self.decisions.append(f"{self.phase}: container {gone} vanished")
            self._containers = containers


def _wait_status(rt: Any, sid: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=5).status
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc.details()
            time.sleep(0.3)


def test_virtletd_sigkill_never_looks_like_pod_deletion(world_dir: Path, containerd: ContainerdProcess,
                                                         virtletd: VirtletdProcess, proxy: ProxyProcess,
                                                         vm_image: str) -> None:
    rt, img = proxy.runtime(), proxy.image()
    img.PullImage(api.PullImageRequest(image=api.ImageSpec(image=vm_image)), timeout=60)
    plain_cfg = _pod(world_dir, "plain")
    plain = rt.RunPodSandbox(api.RunPodSandboxRequest(config=plain_cfg), timeout=60).pod_sandbox_id
    plain_c = _run_container(rt, plain, plain_cfg)
    vms: dict[str, tuple[api.PodSandboxConfig, str, str]] = {}
    for name in ("vm-a", "vm-b"):
        cfg = _pod(world_dir, name)
        sid = rt.RunPodSandbox(api.RunPodSandboxRequest(config=cfg, runtime_handler="virtlet"),
                               timeout=60).pod_sandbox_id
        cid = rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=cfg, config=(
            api.ContainerConfig(metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=vm_image),
                                log_path="vm/0.log"))), timeout=60).container_id
        vms[name] = (cfg, sid, cid)

    # ids like containerd's: 64 hex, distinct in crictl's 13 characters, log links a shipper can parse
    shown = [plain, plain_c, *(i for _, s, c in vms.values() for i in (s, c))]
    assert all(HEX64.match(i) for i in shown), shown
    assert len({i[:13] for i in shown}) == len(shown)
    for name, (_, _, cid) in vms.items():
        link = LOG_LINK.match(f"{name}_default_vm-{cid}.log")
        assert link is not None and link["id"] == cid

    pleg = Pleg(rt, {"uid-plain", "uid-vm-a", "uid-vm-b"})
    pleg.start()
    try:
        time.sleep(2.5)
        virtletd.kill()
        pleg.phase = "down"
        time.sleep(4)
        # a retried RunPodSandbox cannot land while virtletd is down
        code, msg = _code(lambda: rt.RunPodSandbox(api.RunPodSandboxRequest(
            config=vms["vm-a"][0], runtime_handler="virtlet"), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE and "virtlet.cloud" in msg
        virtletd.start()
        pleg.phase = "back"
        _wait_status(rt, vms["vm-a"][1])
        time.sleep(2.5)
    finally:
        pleg.stop.set()
        pleg.join(10)
    assert pleg.decisions == [], pleg.decisions
    assert pleg.seen_while.get("down", 0) >= 2 and pleg.seen_while.get("back", 0) >= 1, pleg.seen_while

    # the same pod again once virtletd is back: refused, still one sandbox
    code, msg = _code(lambda: rt.RunPodSandbox(api.RunPodSandboxRequest(
        config=vms["vm-a"][0], runtime_handler="virtlet"), timeout=30))
    assert code == grpc.StatusCode.ALREADY_EXISTS, (code, msg)
    sandboxes = rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=10).items
    assert sorted(s.metadata.name for s in sandboxes) == ["plain", "vm-a", "vm-b"]

    # a proxy restart while virtletd is down: the state dir still knows virtletd's pods
    virtletd.stop()
    assert proxy.stop() == 0
    proxy.start()
    rt = proxy.runtime()
    assert {s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=10).items} == \
        {plain, vms["vm-a"][1], vms["vm-b"][1]}
    assert {c.id for c in rt.ListContainers(api.ListContainersRequest(), timeout=10).containers} == \
        {plain_c, vms["vm-a"][2], vms["vm-b"][2]}
    code, _ = _code(lambda: rt.ContainerStatus(api.ContainerStatusRequest(container_id=vms["vm-b"][2]),
                                               timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE  # routed to the down virtletd, not to containerd's NOT_FOUND
    virtletd.start()

    # a proxy restart with its id index lost: rebuilt from virtletd's lists on first use
    assert proxy.stop() == 0
    (world_dir / "criproxy-state" / "ids.json").unlink()
    proxy.start()
    rt = proxy.runtime()
    st = rt.ContainerStatus(api.ContainerStatusRequest(container_id=vms["vm-b"][2]), timeout=30).status
    assert st.id == vms["vm-b"][2] and st.metadata.name == "vm"
    raw = next(s.id for s in virtletd.runtime().ListPodSandbox(api.ListPodSandboxRequest(), timeout=10).items
               if s.metadata.name == "vm-b")
    assert external_id("virtlet.cloud", raw) == vms["vm-b"][1]
    legacy = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=f"virtlet.cloud__{raw}"), timeout=10)
    assert legacy.status.id == vms["vm-b"][1]  # ids of the earlier prefix form still route

    for _, sid, cid in vms.values():
        rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=60)
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    rt.StopContainer(api.StopContainerRequest(container_id=plain_c, timeout=1), timeout=60)
    rt.RemoveContainer(api.RemoveContainerRequest(container_id=plain_c), timeout=60)
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=plain), timeout=60)
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=plain), timeout=60)
    assert rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=10).items == []
