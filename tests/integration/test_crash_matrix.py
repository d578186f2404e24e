"""The crash matrix: virtletd SIGKILLed at every failpoint of every mutating CRI call, restarted on the same state
dir, then the kubelet's replay (retry the call, then stop/remove what it knows).  After each case: the retry
succeeded, nothing is listed twice, a VM that ran before the kill runs after it on the pod network, and no domain,
tap, veth / bridge port, netns, DHCP server, overlay, ISO, console socket, host-local reservation or image file is
left behind.

Sandbox and image steps run on libvirt's test driver (fast).  Container steps need the real libvirtd + QEMU: the
test driver's domains live in virtletd's own memory and vanish with it.  The list of failpoints is
``virtlet.failpoints.NAMES``; a case exists for every entry (``test_matrix_covers_every_failpoint``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_vm_lifecycle import Pod, _pull
from virtlet import failpoints
from virtlet.cri.gen import api_pb2 as api
from virtlet.network import netns

pytestmark = pytest.mark.network

# covered elsewhere: the console log writer is no RPC (tests/unit/test_console_state.py freezes it)
NOT_RPC = {"console_log_after_cri_write"}
# need a persistent root device: tests/integration/test_vm_block_volumes.py kills virtletd there
NEEDS_DEVICE = {"volumes.root_before_header"}
SANDBOX_STEPS = sorted(n for n in failpoints.NAMES if n.startswith("sandbox."))
IMAGE_STEPS = sorted(n for n in failpoints.NAMES if n.startswith("image."))
CONTAINER_STEPS = sorted(n for n in failpoints.NAMES if n.startswith("container."))
# the VM's QEMU runs when virtletd is killed at these: it must run after the restart, on the pod network
VM_RUNS_AT_KILL = {"container.start.after_domain_start", "container.start.after_attach"}
FREEZE_TIMEOUT = 300.0  # a failpoint behind a VM boot on a loaded 2-core machine


def test_matrix_covers_every_failpoint() -> None:
    covered = set(SANDBOX_STEPS) | set(IMAGE_STEPS) | set(CONTAINER_STEPS) | NOT_RPC | NEEDS_DEVICE
    assert covered == set(failpoints.NAMES)


def _rpc(step: str) -> str:
    for prefix, rpc in (("sandbox.stop.", "StopPodSandbox"), ("sandbox.remove.", "RemovePodSandbox"),
                        ("sandbox.", "RunPodSandbox"), ("container.start.", "StartContainer"),
                        ("container.stop.", "StopContainer"), ("container.remove.", "RemoveContainer"),
                        ("container.", "CreateContainer"), ("image.pull.", "PullImage"),
                        ("image.remove.", "RemoveImage")):
        if step.startswith(prefix):
            return rpc
    raise AssertionError(step)


# -- freezing and killing --------------------------------------------------------------------------------------

def _arm(daemon: VirtletdProcess, step: str) -> None:
    """Restart virtletd with the failpoint set (before the test makes anything, so nothing is lost)."""
    daemon.stop()
    daemon.env = {"VIRTLET_FAILPOINT": step}
    daemon.start()


def _kill_at(daemon: VirtletdProcess, step: str, call: Callable[[], Any]) -> None:
    """Make ``call`` in the background, wait until virtletd sits at the failpoint, SIGKILL it, restart it."""
    needle = f"failpoint {step} reached"
    seen = daemon.log_path.read_text(errors="replace").count(needle)
    with ThreadPoolExecutor(1) as pool:
        fut: Future[Any] = pool.submit(call)
        deadline = time.monotonic() + FREEZE_TIMEOUT
        while daemon.log_path.read_text(errors="replace").count(needle) == seen:
            if fut.done():
                fut.result()  # raises the call's error, if any
                raise AssertionError(f"{_rpc(step)} returned without reaching failpoint {step}")
            assert time.monotonic() < deadline, f"failpoint {step} not reached:\n{daemon.log()}"
            time.sleep(0.1)
        daemon.kill()
        with pytest.raises(grpc.RpcError):
            fut.result(timeout=60)
    daemon.env = {}
    daemon.start()


# -- what must be gone -------------------------------------------------------------------------------------------

def _in_ns(ns: str | None, cmd: list[str]) -> list[str]:
    return cmd if ns is None else ["nsenter", f"--net={ns}", *cmd]


def _links(ns: str | None = None) -> list[str]:
    cmd = _in_ns(ns, ["ip", "-o", "link", "show"])
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _sandbox_ids_in_log(daemon: VirtletdProcess) -> set[str]:
    import re

    return set(re.findall(r"sandbox ([0-9a-f]{32})", daemon.log_path.read_text(errors="replace")))


def _assert_nothing_left(daemon: VirtletdProcess, bridge_cni: Path) -> None:
    rt = daemon.runtime()
    assert rt.ListPodSandbox(api.ListPodSandboxRequest()).items == []
    assert rt.ListContainers(api.ListContainersRequest()).containers == []
    sids = _sandbox_ids_in_log(daemon)
    assert sids, "the daemon log names no sandbox"
    left_ns = [s for s in sids if netns.exists(s)]
    assert not left_ns, f"network namespaces left: {left_ns}"
    taps = [link for link in _links() if any(link.startswith(f"vt{s[:11]}") for s in sids)]
    assert not taps, f"taps left in the host namespace: {taps}"
    conf = json.loads((bridge_cni / "10-bridge.conflist").read_text())
    bridge, net = conf["plugins"][0]["bridge"], conf["name"]
    ports = subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True).stdout
    assert ports.strip() == "", f"veths left on bridge {bridge}: {ports}"
    reservations = Path("/var/lib/cni/networks") / net
    left = [p.name for p in reservations.iterdir() if p.name[0].isdigit()] if reservations.exists() else []
    assert left == [], f"host-local reservations left: {left}"
    for sid in sids:
        dhcp = subprocess.run(["pgrep", "-f", f"dhcp_server.*{sid}"], capture_output=True, text=True).stdout
        assert dhcp.strip() == "", f"a DHCP server of sandbox {sid} still runs"
    net_dir = daemon.run_dir / "net"
    assert not net_dir.exists() or list(net_dir.iterdir()) == [], list(net_dir.iterdir())
    containers = daemon.state_dir / "containers"
    assert not containers.exists() or list(containers.iterdir()) == [], "overlay/ISO dirs left"
    console = daemon.run_dir / "console"
    assert not console.exists() or list(console.iterdir()) == [], "console sockets left"


def _assert_listed_once(daemon: VirtletdProcess) -> None:
    rt = daemon.runtime()
    sandboxes = rt.ListPodSandbox(api.ListPodSandboxRequest()).items
    keys = [(s.metadata.name, s.metadata.namespace, s.metadata.uid, s.metadata.attempt) for s in sandboxes]
    assert len(set(keys)) == len(keys) and len({s.id for s in sandboxes}) == len(sandboxes), sandboxes
    containers = rt.ListContainers(api.ListContainersRequest()).containers
    ckeys = [(c.pod_sandbox_id, c.metadata.name, c.metadata.attempt) for c in containers]
    assert len(set(ckeys)) == len(ckeys), containers
    images = daemon.image().ListImages(api.ListImagesRequest()).images
    assert len({i.id for i in images}) == len(images), images


# -- sandbox steps (test driver) --------------------------------------------------------------------------------

def _sandbox_config() -> api.PodSandboxConfig:
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name="crash", namespace="default", uid="uid-crash", attempt=0),
        hostname="crash", annotations={"kubernetes.io/target-runtime": "virtlet.cloud"})


@pytest.mark.parametrize("step", SANDBOX_STEPS)
def test_sandbox_step(virtletd: VirtletdProcess, bridge_cni: Path, step: str) -> None:
    _arm(virtletd, step)
    rt = virtletd.runtime()
    run = api.RunPodSandboxRequest(config=_sandbox_config(), runtime_handler="virtlet")
    rpc = _rpc(step)
    sid = ""
    if rpc == "RunPodSandbox":
        _kill_at(virtletd, step, lambda: rt.RunPodSandbox(run, timeout=FREEZE_TIMEOUT))
        rt = virtletd.runtime()
        assert rt.ListPodSandbox(api.ListPodSandboxRequest()).items == []  # rolled back: the call never replied
        sid = rt.RunPodSandbox(run, timeout=120).pod_sandbox_id  # the kubelet's retry
        assert netns.exists(sid)
    else:
        sid = rt.RunPodSandbox(run, timeout=120).pod_sandbox_id
        req: Any = (api.StopPodSandboxRequest(pod_sandbox_id=sid) if rpc == "StopPodSandbox"
                    else api.RemovePodSandboxRequest(pod_sandbox_id=sid))
        _kill_at(virtletd, step, lambda: getattr(rt, rpc)(req, timeout=FREEZE_TIMEOUT))
        rt = virtletd.runtime()
        getattr(rt, rpc)(req, timeout=120)  # the kubelet's retry
        if rpc == "StopPodSandbox":
            status = rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
            assert status.state == api.SANDBOX_NOTREADY and not netns.exists(sid)
        else:
            with pytest.raises(grpc.RpcError) as exc:
                rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid))
            assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    _assert_listed_once(virtletd)
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    _assert_nothing_left(virtletd, bridge_cni)


# -- image steps (test driver) ----------------------------------------------------------------------------------

@pytest.mark.parametrize("step", IMAGE_STEPS)
def test_image_step(virtletd: VirtletdProcess, image_server: Any, step: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image_server.root / "c.qcow2"), "16M"],
                   check=True)
    (virtletd.base / "translations").mkdir(exist_ok=True)
    (virtletd.base / "translations" / "crash.yaml").write_text(
        f"translations:\n  - name: images.test/c.qcow2\n    url: {image_server.url('files/c.qcow2')}\n")
    _arm(virtletd, step)
    img = virtletd.image()
    pull = api.PullImageRequest(image=api.ImageSpec(image="virtlet.cloud/images.test/c.qcow2"))
    remove = api.RemoveImageRequest(image=api.ImageSpec(image="images.test/c.qcow2"))
    if _rpc(step) == "PullImage":
        _kill_at(virtletd, step, lambda: img.PullImage(pull, timeout=FREEZE_TIMEOUT))
        img = virtletd.image()
        ref = img.PullImage(pull, timeout=120).image_ref  # the kubelet's retry
        assert [i.id for i in img.ListImages(api.ListImagesRequest()).images] == [ref]
    else:
        img.PullImage(pull, timeout=120)
        _kill_at(virtletd, step, lambda: img.RemoveImage(remove, timeout=FREEZE_TIMEOUT))
        img = virtletd.image()
    _assert_listed_once(virtletd)
    img.RemoveImage(remove, timeout=60)
    assert img.ListImages(api.ListImagesRequest()).images == []
    images = virtletd.base / "images"
    assert [p.name for p in (images / "data").iterdir()] == [], "image data left"
    assert [p.name for p in (images / "tmp").iterdir()] == [], "partial downloads left"


# -- container steps (real libvirtd + QEMU) ---------------------------------------------------------------------

def _virsh_domains() -> list[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                          text=True, check=True).stdout.split()


def _wait_pingable(ip: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["busybox", "ping", "-c", "1", "-W", "2", ip], capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, f"the VM does not answer on the pod network at {ip}"


def _assert_on_pod_network(pod: Pod) -> None:
    """The VM's tap is in the pod netns on its bridge (not stranded in the host namespace), and it answers."""
    ns = str(netns.path(pod.sandbox_id))
    taps = [link for link in _links(ns) if link.startswith(f"vt{pod.sandbox_id[:11]}")]
    assert taps, f"no tap of the VM in the pod netns: {_links(ns)}"
    assert not [link for link in _links() if link in taps], "a tap of the VM is in the host namespace"
    master = subprocess.run(_in_ns(ns, ["ip", "-o", "link", "show", taps[0]]), capture_output=True,
                            text=True).stdout
    assert "master vmbr0" in master, master
    ip = pod.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id)).status.network.ip
    _wait_pingable(ip)


@pytest.fixture
def tiny_served(image_server: Any, tiny_image: Path) -> str:
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    return image_server.name("files/tiny.qcow2")


@pytest.mark.libvirt
@pytest.mark.parametrize("step", CONTAINER_STEPS)
def test_container_step(vm_virtletd: VirtletdProcess, world_dir: Path, bridge_cni: Path, tiny_served: str,
                        step: str) -> None:
    served_tiny = tiny_served
    daemon = vm_virtletd
    _pull(daemon, served_tiny)
    _arm(daemon, step)
    pod = Pod(daemon, world_dir, "crash-vm", image=served_tiny)
    pod.run_sandbox()
    rpc = _rpc(step)
    if rpc == "CreateContainer":
        req = api.CreateContainerRequest(pod_sandbox_id=pod.sandbox_id, config=pod.container_config(),
                                         sandbox_config=pod.sandbox_config)
        _kill_at(daemon, step, lambda: pod.rt.CreateContainer(req, timeout=FREEZE_TIMEOUT))
        pod.rt = daemon.runtime()
        pod.create()  # the kubelet's retry, same metadata
        listed = pod.rt.ListContainers(api.ListContainersRequest()).containers
        assert [c.id for c in listed] == [pod.container_id], listed
        assert [d for d in _virsh_domains() if d.startswith("virtlet-") and d.endswith(pod.container_id)]
    else:
        pod.create()
        if rpc == "StartContainer":
            _kill_at(daemon, step, lambda: pod.rt.StartContainer(
                api.StartContainerRequest(container_id=pod.container_id), timeout=FREEZE_TIMEOUT))
            pod.rt = daemon.runtime()
            if step in VM_RUNS_AT_KILL:  # found running by the restart, before any retry
                assert pod.status().status.state == api.CONTAINER_RUNNING
            pod.start()  # the kubelet's retry
            assert pod.status().status.state == api.CONTAINER_RUNNING
            _assert_on_pod_network(pod)
        else:
            pod.start()
            if rpc == "StopContainer":
                # a grace period the booting guest can act in: StopContainer presses the ACPI button until the
                # guest's handler is up, so the VM powers off (0); one destroyed at the end of it would be 137
                stop = api.StopContainerRequest(container_id=pod.container_id, timeout=90)
                _kill_at(daemon, step, lambda: pod.rt.StopContainer(stop, timeout=FREEZE_TIMEOUT))
                pod.rt = daemon.runtime()
                pod.rt.StopContainer(stop, timeout=120)  # the kubelet's retry
                st = pod.status().status
                assert st.state == api.CONTAINER_EXITED and (st.exit_code, st.reason) == (0, "Completed"), st
            else:
                remove = api.RemoveContainerRequest(container_id=pod.container_id)
                _kill_at(daemon, step, lambda: pod.rt.RemoveContainer(remove, timeout=FREEZE_TIMEOUT))
                pod.rt = daemon.runtime()
                pod.rt.RemoveContainer(remove, timeout=120)  # the kubelet's retry
                assert pod.rt.ListContainers(api.ListContainersRequest()).containers == []
                pod.container_id = ""
    _assert_listed_once(daemon)
    cid = pod.container_id
    pod.stop_and_remove()
    assert not [d for d in _virsh_domains() if cid and d.endswith(cid)], "the VM's domain is left"
    _assert_nothing_left(daemon, bridge_cni)
