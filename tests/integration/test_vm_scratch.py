"""Scratch disks (``VirtletScratchDisks``) and the termination message of a real tiny VM (TCG), driven through
CRI like the kubelet, plus the bad scratch-disk inputs on libvirt's test driver (no VM boots)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import small_translated_image
from tests.integration.test_vm_exec import _exec, _wait_for_agent
from tests.integration.test_vm_lifecycle import MARKER, _pull
from tests.integration.test_vm_volumes import VolumePod, _mounts_under
from virtlet.cri.gen import api_pb2 as api

pytestmark = [pytest.mark.libvirt, pytest.mark.network]


def _debugfs_cat(image: Path, path: str) -> str:
    """A file's content in the ext4 disk image, read on the host without mounting it."""
    return subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, text=True,
                          check=True).stdout


def test_scratch_disk_in_a_vm(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                              tiny_image: Path) -> None:
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    name = image_server.name("files/tiny.qcow2")
    _pull(vm_virtletd, name)
    pod_dir = world_dir / "kubelet" / "pods" / "uid-vm-scratch"
    empty = pod_dir / "volumes" / "kubernetes.io~empty-dir" / "scratch"
    empty.mkdir(parents=True)
    shared = pod_dir / "volumes" / "kubernetes.io~empty-dir" / "shared"
    shared.mkdir(parents=True)
    mounts = [api.Mount(container_path="/scratch", host_path=str(empty)),
              api.Mount(container_path="/shared", host_path=str(shared))]
    pod = VolumePod(vm_virtletd, world_dir, "vm-scratch", image=name, mounts=mounts,
                    annotations={"VirtletScratchDisks": "scratch=64Mi"})
    disk = empty / "virtlet-scratch.img"
    try:
        pod.run_sandbox()
        pod.create()
        assert disk.is_file() and disk.stat().st_size == 64 << 20
        assert disk.stat().st_blocks * 512 < 64 << 20, "the scratch disk should be sparse"
        xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", f"virtlet-{pod.container_id}"],
                             capture_output=True, text=True, check=True).stdout
        assert f"<source file='{disk}'" in xml and "<serial>scr-" in xml, xml
        pod.start()
        pod.wait_log(MARKER)
        _wait_for_agent(pod)
        res = _exec(pod, "sh", "-c", "grep ' /scratch ' /proc/mounts && echo on-scratch > /scratch/f && sync")
        assert res.exit_code == 0 and b"ext4" in bytes(res.stdout), "\n".join(
            [str(res)] + [x for x in pod.log_lines() if "virtlet tiny guest" in x])
        assert not (empty / "f").exists()  # a disk, not a share
        assert _debugfs_cat(disk, "/f") == "on-scratch\n"
    finally:
        pod.stop_and_remove()
    assert disk.exists(), "the disk file belongs to the emptyDir: the kubelet removes it with the pod"
    assert not _mounts_under(world_dir)


def test_bad_scratch_disks_are_refused(virtletd: VirtletdProcess, world_dir: Path, image_server: Any) -> None:
    from tests.integration.test_hostile_pod_specs import Pod as HostilePod

    image = small_translated_image(world_dir, image_server, "scratch-test/vm")
    _pull(virtletd, image)
    empty = world_dir / "pods" / "u1" / "volumes" / "kubernetes.io~empty-dir" / "data"
    empty.mkdir(parents=True)
    other = world_dir / "host" / "data"
    other.mkdir(parents=True)
    linked = world_dir / "pods" / "u1" / "volumes" / "kubernetes.io~empty-dir" / "linked"
    linked.mkdir(parents=True)
    (linked / "virtlet-scratch.img").symlink_to("/etc/hostname")
    mnt = [api.Mount(container_path="/data", host_path=str(empty))]
    cases: list[tuple[str, list[api.Mount], list[str]]] = [
        ("nosuch", mnt, ["VirtletScratchDisks", "'nosuch'", "not an emptyDir"]),
        ("data=2Ti", mnt, ["VirtletScratchDisks", "'data'", "at most"]),
        ("data=1Mi", mnt, ["VirtletScratchDisks", "'data'", "smaller"]),
        ("data=lots", mnt, ["VirtletScratchDisks", "'data'"]),
        ("Data/x", mnt, ["VirtletScratchDisks", "not an emptyDir volume name"]),
        ("data,data", mnt, ["VirtletScratchDisks", "listed twice"]),
        ("data", [api.Mount(container_path="/data", host_path=str(other))], ["'data'", "not an emptyDir"]),
        ("linked", [api.Mount(container_path="/l", host_path=str(linked))], ["'linked'", "not a regular file"]),
    ]
    pod = HostilePod(virtletd, world_dir, "bad-scratch")
    rt = virtletd.runtime()
    containers = virtletd.state_dir / "containers"
    for value, mounts, words in cases:
        cfg = api.ContainerConfig(metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=image),
                                  mounts=mounts, annotations={"VirtletScratchDisks": value})
        with pytest.raises(grpc.RpcError) as err:
            rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=pod.id, config=cfg,
                                                          sandbox_config=pod.config), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (value, err.value)
        for word in words:
            assert word in (err.value.details() or ""), (value, word, err.value.details())
        assert not rt.ListContainers(api.ListContainersRequest(), timeout=30).containers
        assert not any(containers.iterdir()) if containers.exists() else True
        assert not (empty / "virtlet-scratch.img").exists()
    assert (linked / "virtlet-scratch.img").is_symlink()


def test_termination_message_reaches_the_kubelets_file(vm_virtletd: VirtletdProcess, world_dir: Path,
                                                       image_server: Any, tiny_image: Path) -> None:
    """The guest writes its termination log; StopContainer copies it (through the guest agent, at most 4096
    bytes, as the kubelet reads) into the host file the kubelet gave for ``/dev/termination-log``."""
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    name = image_server.name("files/tiny.qcow2")
    _pull(vm_virtletd, name)
    term = world_dir / "kubelet" / "pods" / "uid-vm-term" / "containers" / "vm" / "5eed"
    term.parent.mkdir(parents=True)
    term.write_text("")
    pod = VolumePod(vm_virtletd, world_dir, "vm-term", image=name,
                    mounts=[api.Mount(container_path="/dev/termination-log", host_path=str(term))])
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        pod.wait_log(MARKER)
        _wait_for_agent(pod)
        res = _exec(pod, "sh", "-c", "printf 'bye from the VM\\n' > /dev/termination-log; "
                                     "head -c 6000 /dev/zero | tr '\\0' x >> /dev/termination-log")
        assert res.exit_code == 0, res
        pod.rt.StopContainer(api.StopContainerRequest(container_id=pod.container_id, timeout=30), timeout=120)
        data = term.read_bytes()
        assert data.startswith(b"bye from the VM\n") and len(data) == 4096, data[:100]
    finally:
        pod.stop_and_remove()


@pytest.mark.slow
def test_full_image_mounts_scratch_disk(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Real cloud-init and udev: the ``mounts`` entry (``/dev/disk/by-uuid/<uuid>``) mounts the scratch disk."""
    import time

    from tests.integration import test_vm_exec
    from tests.integration.conftest import guest_image

    shutil.copy(guest_image("full"), image_server.root / "full.qcow2")
    name = image_server.name("files/full.qcow2")
    _pull(vm_virtletd, name)
    empty = world_dir / "kubelet" / "pods" / "uid-full-scratch" / "volumes" / "kubernetes.io~empty-dir" / "db"
    empty.mkdir(parents=True)
    pod = VolumePod(vm_virtletd, world_dir, "full-scratch", image=name, memory=1 << 30,
                    mounts=[api.Mount(container_path="/var/lib/db", host_path=str(empty))],
                    annotations={"VirtletScratchDisks": "db=128Mi"})
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        monkeypatch.setattr(test_vm_exec, "AGENT_TIMEOUT", 600.0)  # a full Debian boot under TCG
        _wait_for_agent(pod)
        out = ""
        for _ in range(120):  # the agent answers before cloud-init's mounts module ran
            res = _exec(pod, "sh", "-c", "grep ' /var/lib/db ' /proc/mounts && echo full > /var/lib/db/f && sync")
            out = bytes(res.stdout).decode()
            if res.exit_code == 0:
                break
            time.sleep(2)
        assert " ext4 " in out, out
        assert _debugfs_cat(empty / "virtlet-scratch.img", "/f") == "full\n"
    finally:
        pod.stop_and_remove()
