"""VM containers end to end on a real libvirtd + QEMU/TCG, a real CNI bridge network and an HTTP image source:
pull -> sandbox -> container -> running VM (marker in the CRI log) -> stop -> remove, and the failure paths."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from virtlet.console.cri_format import read_cri_lines
from virtlet.cri.gen import api_pb2 as api

pytestmark = [pytest.mark.libvirt, pytest.mark.network]

MARKER = "VIRTLET-TINY-READY"
BOOT_TIMEOUT = 240.0  # TCG on a loaded 2-core machine


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Pod:
    """One VM pod driven through CRI like the kubelet does."""

    def __init__(self, daemon: VirtletdProcess, world: Path, name: str, annotations: dict[str, str] | None = None,
                 memory: int = 0, image: str = "") -> None:
        self.daemon = daemon
        self.rt = daemon.runtime()
        self.name = name
        self.log_dir = world / "logs" / name
        self.log_dir.mkdir(parents=True)
        self.annotations = {"kubernetes.io/target-runtime": "virtlet.cloud", **(annotations or {})}
        self.memory = memory
        self.image = image
        self.sandbox_config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}"),
            hostname=name, log_directory=str(self.log_dir), annotations=self.annotations)
        self.sandbox_id = ""
        self.container_id = ""

    def run_sandbox(self) -> str:
        self.sandbox_id = self.rt.RunPodSandbox(api.RunPodSandboxRequest(
            config=self.sandbox_config, runtime_handler="virtlet"), timeout=120).pod_sandbox_id
        return self.sandbox_id

    def container_config(self, attempt: int = 0) -> api.ContainerConfig:
        cfg = api.ContainerConfig(
            metadata=api.ContainerMetadata(name="vm", attempt=attempt), image=api.ImageSpec(image=self.image),
            log_path=f"vm/{attempt}.log", envs=[api.KeyValue(key="GREETING", value="hello")],
            annotations=self.annotations)
        if self.memory:
            cfg.linux.resources.memory_limit_in_bytes = self.memory
        return cfg

    def create(self, attempt: int = 0) -> str:
        self.container_id = self.rt.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=self.sandbox_id, config=self.container_config(attempt),
            sandbox_config=self.sandbox_config), timeout=120).container_id
        return self.container_id

    def start(self) -> None:
        self.rt.StartContainer(api.StartContainerRequest(container_id=self.container_id), timeout=120)

    def status(self, verbose: bool = False) -> Any:
        return self.rt.ContainerStatus(api.ContainerStatusRequest(container_id=self.container_id, verbose=verbose))

    @property
    def log_path(self) -> Path:
        return Path(self.status().status.log_path)

    def log_lines(self) -> list[str]:
        try:
            return read_cri_lines(self.log_path)
        except FileNotFoundError:
            return []

    def wait_log(self, needle: str, timeout: float = BOOT_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log_lines():
                if needle in line:
                    return line
            time.sleep(0.5)
        raise AssertionError(f"{needle!r} not in the CRI log within {timeout}s:\n" + "\n".join(self.log_lines()[-40:])
                             + "\n--- virtletd log ---\n" + self.daemon.log())

    def wait_state(self, state: int, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.status().status
            if st.state == state:
                return st
            time.sleep(0.1)
        raise AssertionError(f"container not in state {state} within {timeout}s: {self.status().status}")

    def stop_and_remove(self) -> None:
        if self.container_id:
            self.rt.StopContainer(api.StopContainerRequest(container_id=self.container_id, timeout=5), timeout=120)
            self.rt.RemoveContainer(api.RemoveContainerRequest(container_id=self.container_id), timeout=120)
        if self.sandbox_id:
            self.rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=self.sandbox_id), timeout=120)
            self.rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=self.sandbox_id), timeout=120)


def _virsh_domains() -> list[str]:
    return subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                          text=True, check=True).stdout.split()


@pytest.fixture
def served_tiny(image_server: Any, tiny_image: Path) -> str:
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    return image_server.name("files/tiny.qcow2")


def _pull(daemon: VirtletdProcess, name: str) -> str:
    return daemon.image().PullImage(api.PullImageRequest(image=api.ImageSpec(image=name)), timeout=300).image_ref


def test_vm_pod_lifecycle(vm_virtletd: VirtletdProcess, world_dir: Path, served_tiny: str) -> None:
    """Boot, annotations inside the guest, root volume growth, restart recovery without log loss, stop, remove."""
    ref = _pull(vm_virtletd, "virtlet.cloud/" + served_tiny)
    assert ref.startswith("sha256:")  # the image id, as containerd answers
    stored = next((world_dir / "images" / "data").iterdir())
    digest_before = _sha256(stored)
    user_data = {"runcmd": [
        "echo GUEST-SHAPE cpus=$(nproc) mem_kb=$(awk '/MemTotal/ {print $2}' /proc/meminfo)",
        "sh -c 'i=0; while true; do echo tick-$i; i=$((i+1)); sleep 1; done' &"]}
    pod = Pod(vm_virtletd, world_dir, "vm-life", memory=256 << 20, image=served_tiny, annotations={
        "VirtletVCPUCount": "2", "VirtletRootVolumeSize": "1Gi",
        "VirtletCloudInitUserData": json.dumps(user_data)})
    pod.run_sandbox()
    pod.create()
    st = pod.status(verbose=True)
    assert st.status.state == api.CONTAINER_CREATED
    info = json.loads(st.info["info"])
    root = Path(info["extra"]["root"])
    vsize = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(root)], capture_output=True,
                                      text=True, check=True).stdout)
    assert vsize["virtual-size"] == 1 << 30
    assert vsize["backing-filename"] == str(stored)
    pod.start()
    assert pod.status().status.state == api.CONTAINER_RUNNING
    live = pod.status(verbose=True)
    live_xml = json.loads(live.info["info"])["domain_xml"]
    assert "<controller type='usb' index='0' model='none'" in live_xml  # no USB (virtlet.vm.designer.NO_USB)
    # virtlogd's RAW in a directory of its own: the log writer's inotify watch hears only virtlogd there
    assert f"<log file='{root.parent / 'console' / 'console.raw'}'" in live_xml
    qemu_args = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [a for a in qemu_args.splitlines() if pod.container_id in a and "usb" in a.replace("usb=off", "")]
    marker = pod.wait_log(MARKER)
    assert "hostname=vm-life" in marker
    shape = pod.wait_log("GUEST-SHAPE")
    assert "cpus=2" in shape
    mem_kb = int(shape.split("mem_kb=")[1].split()[0])
    assert 200_000 < mem_kb <= 256 * 1024, shape
    pod.wait_log("tick-3")
    # SIGKILL virtletd with the VM running: the VM survives, the log goes on without loss or duplicates
    vm_virtletd.kill()
    time.sleep(3)
    vm_virtletd.start()
    pod.rt = vm_virtletd.runtime()
    assert pod.status().status.state == api.CONTAINER_RUNNING
    last = int([ln for ln in pod.log_lines() if "tick-" in ln][-1].split("tick-")[1].split()[0])
    pod.wait_log(f"tick-{last + 5}")
    # a tick may share its line with the getty's "login: " prompt
    ticks = [int(line.split("tick-")[1].split()[0]) for line in pod.log_lines() if "tick-" in line]
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), ticks
    # log rotation as the kubelet does it: rename, then ReopenContainerLog; new lines go to a fresh file
    rotated = pod.log_path.with_suffix(".log.1")
    pod.log_path.rename(rotated)
    pod.rt.ReopenContainerLog(api.ReopenContainerLogRequest(container_id=pod.container_id))
    pod.wait_log(f"tick-{ticks[-1] + 3}")
    assert any(f"tick-{ticks[-1]}" in line for line in read_cri_lines(rotated))
    # stop: ACPI power button -> guest powers off -> EXITED 0
    pod.rt.StopContainer(api.StopContainerRequest(container_id=pod.container_id, timeout=60), timeout=120)
    st = pod.status().status
    assert st.state == api.CONTAINER_EXITED and st.exit_code == 0, st
    assert st.finished_at >= st.started_at > st.created_at
    domain = f"virtlet-{pod.container_id}"
    pod.rt.RemoveContainer(api.RemoveContainerRequest(container_id=pod.container_id), timeout=120)
    assert domain not in _virsh_domains()
    assert not root.parent.exists()
    assert _sha256(stored) == digest_before  # the store's image was never written
    pod.container_id = ""
    pod.stop_and_remove()


def test_qemu_killed_and_acpi_ignored(vm_virtletd: VirtletdProcess, world_dir: Path, served_tiny: str) -> None:
    """A QEMU killed with SIGKILL shows EXITED non-zero at once (libvirt event); a guest that ignores ACPI is
    destroyed when the StopContainer timeout expires; a new container may follow an exited one."""
    _pull(vm_virtletd, served_tiny)
    pod = Pod(vm_virtletd, world_dir, "vm-kill", image=served_tiny, annotations={
        "VirtletCloudInitUserData": json.dumps({"runcmd": ["virtlet-ignore-acpi"]})})
    pod.run_sandbox()
    pod.create()
    pod.start()
    pod.wait_log(MARKER)
    pid = json.loads(pod.status(verbose=True).info["info"])["qemu_pid"]
    assert pid > 0
    os.kill(pid, signal.SIGKILL)
    st = pod.wait_state(api.CONTAINER_EXITED, timeout=5)
    assert st.exit_code != 0 and st.reason == "Error" and "killed or crashed" in st.message, st
    first = pod.container_id
    # the kubelet's restart: a new container in the same sandbox, while the exited one still exists
    pod.create(attempt=1)
    pod.start()
    pod.wait_log(MARKER)
    pod.wait_log("ACPI power button will be ignored")
    start = time.monotonic()
    pod.rt.StopContainer(api.StopContainerRequest(container_id=pod.container_id, timeout=3), timeout=120)
    assert time.monotonic() - start >= 3
    st = pod.status().status
    # destroyed at the end of the grace period: 137 like a SIGKILLed container under containerd, saying why
    assert st.state == api.CONTAINER_EXITED and (st.exit_code, st.reason) == (137, "Error"), st
    assert "grace period of 3s" in st.message and "destroyed" in st.message, st
    pod.rt.RemoveContainer(api.RemoveContainerRequest(container_id=first), timeout=120)
    pod.stop_and_remove()


def _error(call: Any, request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as exc:
        call(request, timeout=120)
    return exc.value.code(), exc.value.details()


def test_orphans_removed_at_start(vm_virtletd: VirtletdProcess, libvirt_daemons: None) -> None:
    """A domain and a container directory that belong to no known container are removed at start-up."""
    import uuid

    cid = str(uuid.uuid4())
    name = f"virtlet-{cid}"
    orphan_dir = vm_virtletd.state_dir / "containers" / cid
    orphan_dir.mkdir(parents=True)
    (orphan_dir / "root.qcow2").write_bytes(b"")
    xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
           "<os><type arch='x86_64' machine='pc'>hvm</type></os></domain>")
    subprocess.run(["virsh", "-c", "qemu:///system", "define", "/dev/stdin"], input=xml, text=True, check=True,
                   capture_output=True)
    try:
        vm_virtletd.stop()
        vm_virtletd.start()
        assert name not in _virsh_domains()
        assert not orphan_dir.exists()
        assert f"removing domain {name}" in vm_virtletd.log()
    finally:
        subprocess.run(["virsh", "-c", "qemu:///system", "undefine", name], capture_output=True)


def test_bad_container_input(vm_virtletd: VirtletdProcess, world_dir: Path, served_tiny: str) -> None:
    _pull(vm_virtletd, served_tiny)
    pod = Pod(vm_virtletd, world_dir, "vm-bad", image=served_tiny)
    pod.run_sandbox()
    rt = pod.rt
    cases = [
        ({"VirtletVCPUCount": "0"}, 0, "VirtletVCPUCount"),
        ({"VirtletVCPUCount": "1000"}, 0, "VirtletVCPUCount"),
        ({"VirtletDiskDriver": "floppy"}, 0, "VirtletDiskDriver"),
        ({"VirtletRootVolumeSize": "lots"}, 0, "VirtletRootVolumeSize"),
        ({"VirtletCloudInitUserData": "[not, a, map"}, 0, "VirtletCloudInitUserData"),
        ({"VirtletCloudInitUserData": "- a list\n- not a map\n"}, 0, "VirtletCloudInitUserData"),
        ({"VirtletCloudInitImageType": "floppy"}, 0, "VirtletCloudInitImageType"),
        ({"VirtletSSHKeys": "not a key"}, 0, "VirtletSSHKeys"),
        ({}, 16 << 20, "memory"),
    ]
    for extra, memory, needle in cases:
        cfg = pod.container_config()
        cfg.annotations.update(extra)
        if memory:
            cfg.linux.resources.memory_limit_in_bytes = memory
        code, msg = _error(rt.CreateContainer, api.CreateContainerRequest(
            pod_sandbox_id=pod.sandbox_id, config=cfg, sandbox_config=pod.sandbox_config))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and needle in msg, (extra, code, msg)
    cfg = pod.container_config()
    cfg.image.image = "127.0.0.1:1/missing.qcow2"
    code, msg = _error(rt.CreateContainer, api.CreateContainerRequest(
        pod_sandbox_id=pod.sandbox_id, config=cfg, sandbox_config=pod.sandbox_config))
    assert code == grpc.StatusCode.NOT_FOUND and "pull it first" in msg
    code, msg = _error(rt.CreateContainer, api.CreateContainerRequest(
        pod_sandbox_id="nope", config=pod.container_config(), sandbox_config=pod.sandbox_config))
    assert code == grpc.StatusCode.NOT_FOUND
    # nothing half-created: no container record, no domain, no files
    assert rt.ListContainers(api.ListContainersRequest()).containers == []
    assert not any(d.startswith("virtlet-") and d.removeprefix("virtlet-") in vm_virtletd.log()
                   for d in _virsh_domains())
    assert list((vm_virtletd.state_dir / "containers").iterdir()) == []
    # a created, never started container is replaced by the next CreateContainer (the kubelet's retry after
    # a timeout: it never got the first id; docs/recovery.md) ...
    first = pod.create()
    second = pod.create()
    assert second != first
    assert [c.id for c in rt.ListContainers(api.ListContainersRequest()).containers] == [second]
    assert [p.name for p in (vm_virtletd.state_dir / "containers").iterdir()] == [second]
    # ... but a running one is never: two live containers in one sandbox are refused
    pod.start()
    code, msg = _error(rt.CreateContainer, api.CreateContainerRequest(
        pod_sandbox_id=pod.sandbox_id, config=pod.container_config(1), sandbox_config=pod.sandbox_config))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "exactly one container" in msg
    assert len(list((vm_virtletd.state_dir / "containers").iterdir())) == 1
    pod.stop_and_remove()
