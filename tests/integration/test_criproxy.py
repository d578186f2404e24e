"""virtlet-criproxy between a REAL containerd 1.6 and a REAL virtletd, used only through the proxy's socket.

Ordinary pods must run on containerd, VM pods (by RuntimeClass handler and by annotation) on virtletd, ids and
image names must route back, a stopped virtletd must not stall lists, and routing must resume when it returns.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.containerd import BUSYBOX_IMAGE, ContainerdProcess
from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import small_translated_image
from virtlet.cri import versions
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy.naming import external_id
from virtlet.proxy.state import HEX64

pytestmark = pytest.mark.network

VM_IMAGE = "virtlet.cloud/proxytest/vm"


class ProxyProcess:
    """``python -m virtlet.proxy.main`` on a temp socket; ``stop()`` sends SIGTERM, returns the exit code."""

    def __init__(self, base: Path, primary: str, virtlet: str, extra: list[str] | None = None) -> None:
        self.socket = base / "criproxy.sock"
        self.log_path = base / "criproxy.log"
        self.cmd = [sys.executable, "-m", "virtlet.proxy.main", "--listen", str(self.socket), "--primary",
                    primary, "--secondary", f"virtlet.cloud={virtlet}", "--list-timeout", "2",
                    "--state-dir", str(base / "criproxy-state"),
                    "--log-level", "debug", *(extra or [])]
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log, start_new_session=True)
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.runtime().Version(api.VersionRequest(), timeout=2)
                return self
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"proxy did not answer in {timeout}s:\n{self.log()}") from None
                time.sleep(0.2)

    def runtime(self, version: str = "v1") -> Any:
        assert self.channel is not None
        return versions.runtime_stub(self.channel, version)

    def image(self, version: str = "v1") -> Any:
        assert self.channel is not None
        return versions.image_stub(self.channel, version)

    def stop(self) -> int | None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""


@pytest.fixture
def containerd() -> Iterator[ContainerdProcess]:
    with ContainerdProcess() as cd:
        yield cd
    assert not cd.shim_pids(), "containerd shims left running"
    assert not cd.base.exists()


@pytest.fixture
def vm_image(world_dir: Path, image_server: Any) -> str:
    """A 16 MiB qcow2 served over real HTTP, named ``virtlet.cloud/proxytest/vm`` by a translation file."""
    return small_translated_image(world_dir, image_server, VM_IMAGE.removeprefix("virtlet.cloud/"))


@pytest.fixture
def proxy(world_dir: Path, containerd: ContainerdProcess,
          virtletd: VirtletdProcess) -> Iterator[ProxyProcess]:
    p = ProxyProcess(world_dir, containerd.address, f"unix://{virtletd.socket}").start()
    try:
        yield p
    finally:
        rc = p.stop()
        assert rc == 0, f"proxy did not exit cleanly on SIGTERM ({rc}):\n{p.log()}"
        assert not p.socket.exists()


def _pod(world_dir: Path, name: str, annotations: dict[str, str] | None = None) -> api.PodSandboxConfig:
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}"), hostname=name,
        log_directory=str(world_dir / "logs" / name), labels={"test": "criproxy"},
        annotations=annotations or {},
        linux=api.LinuxPodSandboxConfig())


def _run_container(rt: Any, sid: str, cfg: api.PodSandboxConfig) -> str:
    cid = rt.CreateContainer(api.CreateContainerRequest(
        pod_sandbox_id=sid, sandbox_config=cfg, config=api.ContainerConfig(
            metadata=api.ContainerMetadata(name="sleeper"), image=api.ImageSpec(image=BUSYBOX_IMAGE),
            command=["/bin/sleep", "3600"], log_path="sleeper.log")), timeout=60).container_id
    rt.StartContainer(api.StartContainerRequest(container_id=cid), timeout=60)
    return cid


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value.code(), exc.value.details()


def _sandbox_ids(rt: Any, **filt: Any) -> set[str]:
    req = api.ListPodSandboxRequest(filter=api.PodSandboxFilter(**filt) if filt else None)
    return {s.id for s in rt.ListPodSandbox(req, timeout=10).items}


def test_routing_through_the_proxy(world_dir: Path, containerd: ContainerdProcess, virtletd: VirtletdProcess,
                                   proxy: ProxyProcess, vm_image: str) -> None:
    rt, img = proxy.runtime(), proxy.image()
    assert stat.S_IMODE(os.stat(proxy.socket).st_mode) == 0o660
    for version in ("v1", "v1alpha2"):
        v = proxy.runtime(version).Version(api.VersionRequest(), timeout=10)
        assert (v.runtime_name, v.runtime_api_version) == ("containerd", version)
    conds = {c.type: c for c in rt.Status(api.StatusRequest(), timeout=10).status.conditions}
    assert conds["RuntimeReady"].status and conds["virtlet.cloud/RuntimeReady"].status

    # an ordinary pod on containerd, with a running busybox container
    pod_cfg = _pod(world_dir, "plain")
    plain = rt.RunPodSandbox(api.RunPodSandboxRequest(config=pod_cfg), timeout=60).pod_sandbox_id
    assert HEX64.match(plain) and plain in _sandbox_ids(containerd.runtime())
    cid = _run_container(rt, plain, pod_cfg)
    assert rt.ContainerStatus(api.ContainerStatusRequest(container_id=cid), timeout=10).status.state == \
        api.CONTAINER_RUNNING
    netns_path = containerd.netns_path(plain)
    assert os.path.exists(netns_path)

    # VM pods on virtletd: by RuntimeClass handler, and by annotation
    by_handler = rt.RunPodSandbox(api.RunPodSandboxRequest(
        config=_pod(world_dir, "vm-h"), runtime_handler="virtlet"), timeout=60).pod_sandbox_id
    by_annotation = rt.RunPodSandbox(api.RunPodSandboxRequest(config=_pod(
        world_dir, "vm-a", {"kubernetes.io/target-runtime": "virtlet.cloud"})), timeout=60).pod_sandbox_id
    raw_vm = _sandbox_ids(virtletd.runtime())
    for sid in (by_handler, by_annotation):  # 64-hex ids like containerd's, routed by the proxy's id index
        assert HEX64.match(sid) and sid in {external_id("virtlet.cloud", r) for r in raw_vm}
        st = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=10)
        assert st.status.id == sid
    assert len({s[:13] for s in (plain, by_handler, by_annotation)}) == 3  # what crictl shows: distinct

    # lists merge both runtimes; filters naming one runtime's id ask only that one
    for version in ("v1", "v1alpha2"):
        assert _sandbox_ids(proxy.runtime(version)) == {plain, by_handler, by_annotation}
    assert _sandbox_ids(rt, id=by_handler) == {by_handler}
    assert _sandbox_ids(rt, id=plain) == {plain}
    containers = rt.ListContainers(api.ListContainersRequest(), timeout=10).containers
    assert [(c.id, c.pod_sandbox_id) for c in containers] == [(cid, plain)]
    assert rt.ListContainers(api.ListContainersRequest(filter=api.ContainerFilter(pod_sandbox_id=by_handler)),
                             timeout=10).containers == []

    # images of both kinds
    ref = img.PullImage(api.PullImageRequest(image=api.ImageSpec(image=vm_image)), timeout=60).image_ref
    assert ref.startswith("virtlet.cloud/sha256:")  # the image id, as containerd answers
    vm_tag = vm_image + ":latest"  # an HTTP image's name is listed with a tag, so crictl can parse it
    tags = {t: i for i in img.ListImages(api.ListImagesRequest(), timeout=10).images for t in i.repo_tags}
    assert BUSYBOX_IMAGE in tags and vm_tag in tags
    assert tags[vm_tag].id.startswith("virtlet.cloud/sha256:") and tags[vm_tag].id == ref
    assert not tags[BUSYBOX_IMAGE].id.startswith("virtlet.cloud/")
    status = img.ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=tags[vm_tag].id)), timeout=10)
    assert status.image.repo_tags == [vm_tag]
    only_vm = img.ListImages(api.ListImagesRequest(
        filter=api.ImageFilter(image=api.ImageSpec(image=vm_image))), timeout=10).images
    assert [i.repo_tags for i in only_vm] == [[vm_tag]]
    fs = img.ImageFsInfo(api.ImageFsInfoRequest(), timeout=10)
    assert len(fs.image_filesystems) >= 2

    # the same pod (name, namespace, uid, attempt) twice: refused on both sides, as containerd refuses it
    code, msg = _code(lambda: rt.RunPodSandbox(api.RunPodSandboxRequest(config=pod_cfg), timeout=60))
    assert "reserved" in msg, (code, msg)
    code, msg = _code(lambda: rt.RunPodSandbox(api.RunPodSandboxRequest(
        config=_pod(world_dir, "vm-h"), runtime_handler="virtlet"), timeout=60))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "reserved" in msg, (code, msg)
    assert _sandbox_ids(rt) == {plain, by_handler, by_annotation}

    # bad input: clear errors
    code, msg = _code(lambda: rt.RunPodSandbox(api.RunPodSandboxRequest(config=_pod(
        world_dir, "bad", {"kubernetes.io/target-runtime": "nosuch.runtime"})), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "nosuch.runtime" in msg
    code, msg = _code(lambda: rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id="bogus__123"),
                                                  timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "bogus" in msg
    code, msg = _code(lambda: rt.CreateContainer(api.CreateContainerRequest(
        pod_sandbox_id=plain, sandbox_config=pod_cfg, config=api.ContainerConfig(
            metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=vm_image))), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "virtlet.cloud" in msg
    assert _sandbox_ids(containerd.runtime()) == {plain}  # nothing was created on the wrong side

    # Stop/Remove reach the right runtime
    raw = next(r for r in raw_vm if external_id("virtlet.cloud", r) == by_handler)
    legacy = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=f"virtlet.cloud__{raw}"), timeout=10)
    assert legacy.status.id == by_handler  # ids of the earlier prefix form still route
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=by_handler), timeout=60)
    assert virtletd.runtime().PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=raw),
                                               timeout=10).status.state == api.SANDBOX_NOTREADY
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=by_handler), timeout=60)
    assert raw not in _sandbox_ids(virtletd.runtime())
    rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=1), timeout=60)
    rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=60)
    assert containerd.runtime().ListContainers(api.ListContainersRequest(), timeout=10).containers == []
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=plain), timeout=60)
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=plain), timeout=60)
    assert _sandbox_ids(containerd.runtime()) == set()
    assert not os.path.exists(netns_path)
    assert _sandbox_ids(rt) == {by_annotation}


def test_virtletd_down_and_back(world_dir: Path, containerd: ContainerdProcess, virtletd: VirtletdProcess,
                                proxy: ProxyProcess) -> None:
    rt = proxy.runtime()
    plain = rt.RunPodSandbox(api.RunPodSandboxRequest(config=_pod(world_dir, "plain")),
                             timeout=60).pod_sandbox_id
    vm = rt.RunPodSandbox(api.RunPodSandboxRequest(config=_pod(world_dir, "vm"), runtime_handler="virtlet"),
                          timeout=60).pod_sandbox_id
    assert _sandbox_ids(rt) == {plain, vm}

    virtletd.stop()
    # lists still answer (within a short call deadline) with containerd's pods and virtletd's last-known ones
    for version in ("v1", "v1alpha2"):
        assert _sandbox_ids(proxy.runtime(version)) == {plain, vm}
    assert _sandbox_ids(rt, id=vm) == {vm}
    assert rt.ListContainers(api.ListContainersRequest(), timeout=5).containers == []
    code, msg = _code(lambda: rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=vm), timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE and "virtlet.cloud" in msg
    code, _ = _code(lambda: rt.RunPodSandbox(api.RunPodSandboxRequest(
        config=_pod(world_dir, "vm2"), runtime_handler="virtlet"), timeout=10))
    assert code == grpc.StatusCode.UNAVAILABLE
    conds = {c.type: c for c in rt.Status(api.StatusRequest(), timeout=10).status.conditions}
    assert conds["RuntimeReady"].status and not conds["virtlet.cloud/RuntimeReady"].status
    assert "virtlet.cloud" in conds["virtlet.cloud/RuntimeReady"].message
    assert "lists show its last-known sandboxes" in proxy.log()

    virtletd.start()
    deadline = time.monotonic() + 20
    while True:  # the proxy's channel reconnects by itself (short backoff); no proxy restart
        try:
            st = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=vm), timeout=5)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc.details()
            time.sleep(0.3)
    assert st.status.id == vm
    assert _sandbox_ids(rt) == {plain, vm}
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=vm), timeout=60)
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=vm), timeout=60)
    assert _sandbox_ids(rt) == {plain}


def test_bad_config_stops_the_proxy(world_dir: Path) -> None:
    cfg = world_dir / "proxy.yaml"
    cfg.write_text("listen: /tmp/x.sock\nsecondaries:\n  virtlet.cloud: relative/path.sock\n")
    proc = subprocess.run([sys.executable, "-m", "virtlet.proxy.main", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "secondaries.virtlet.cloud" in proc.stderr
    (world_dir / "not-a-dir").write_text("")
    proc = subprocess.run([sys.executable, "-m", "virtlet.proxy.main", "--listen", str(world_dir / "p.sock"),
                           "--state-dir", str(world_dir / "not-a-dir" / "state")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "state_dir" in proc.stderr and not (world_dir / "p.sock").exists()
