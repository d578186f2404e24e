"""Directory volumes and single-file mounts of a real tiny VM (TCG, real virtiofsd started by libvirt), driven
through CRI like the kubelet: an emptyDir, a hostPath directory, a read-only hostPath, a ConfigMap- and a
Secret-style directory laid out as the kubelet lays them out (``..<timestamp>`` dir, ``..data`` symlink, per-key
symlinks), a projected token, /etc/hosts and the termination log.  One boot checks everything (2-core CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import small_translated_image
from tests.integration.test_vm_exec import _exec, _wait_for_agent
from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull
from virtlet.cri.gen import api_pb2 as api

pytestmark = [pytest.mark.libvirt, pytest.mark.network]

SWAP_TIMEOUT = 30.0  # "within seconds": virtiofs caches attributes for 1 s; TCG on a loaded machine


def kubelet_atomic_dir(base: Path, files: dict[str, str], stamp: str) -> Path:
    """A ConfigMap/Secret/projected directory as the kubelet's AtomicWriter makes it."""
    base.mkdir(parents=True, exist_ok=True)
    data = base / f"..{stamp}"
    data.mkdir()
    for key, value in files.items():
        (data / key).write_text(value)
    (base / "..data_tmp").symlink_to(data.name)
    os.replace(base / "..data_tmp", base / "..data")
    for key in files:
        if not (base / key).is_symlink():
            (base / key).symlink_to(f"..data/{key}")
    return base


def kubelet_swap(base: Path, files: dict[str, str], stamp: str) -> None:
    """The kubelet's update: a new ``..<timestamp>`` dir, then one atomic rename of ``..data``."""
    old = os.readlink(base / "..data")
    data = base / f"..{stamp}"
    data.mkdir()
    for key, value in files.items():
        (data / key).write_text(value)
    (base / "..data_tmp").symlink_to(data.name)
    os.replace(base / "..data_tmp", base / "..data")
    shutil.rmtree(base / old)


class VolumePod(Pod):
    def __init__(self, *args: Any, mounts: list[api.Mount], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mounts = mounts

    def container_config(self, attempt: int = 0) -> api.ContainerConfig:
        cfg = super().container_config(attempt)
        cfg.mounts.extend(self.mounts)
        return cfg


def _virtiofsd_for(world: Path) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines() if "virtiofsd" in line and str(world) in line]


def _mounts_under(world: Path) -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if str(world) in line]


def test_directory_volumes_in_a_vm(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                                   tiny_image: Path) -> None:
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    name = image_server.name("files/tiny.qcow2")
    _pull(vm_virtletd, name)
    pod_dir = world_dir / "kubelet" / "pods" / "uid-vm-vols"
    vols = pod_dir / "volumes"
    empty = vols / "kubernetes.io~empty-dir" / "cache"
    empty.mkdir(parents=True)
    empty.chmod(0o777)
    data = world_dir / "host" / "data"
    data.mkdir(parents=True)
    (data / "hello").write_text("hello from the host\n")
    ro = world_dir / "host" / "ro"
    ro.mkdir(parents=True)
    (ro / "ro.txt").write_text("read only\n")
    cfg = kubelet_atomic_dir(vols / "kubernetes.io~configmap" / "cfg", {"greeting": "v1"}, "2026_12_06_00_00_00.1")
    sec = kubelet_atomic_dir(vols / "kubernetes.io~secret" / "sec", {"password": "s3cret"}, "2026_12_06_00_00_00.2")
    tok = kubelet_atomic_dir(vols / "kubernetes.io~projected" / "kube-api-access-x",
                             {"token": "tok-1", "namespace": "default"}, "2026_12_06_00_00_00.3")
    hosts = pod_dir / "etc-hosts"
    hosts.write_text("127.0.0.1 localhost\n10.9.8.7 vm-vols-marker\n")
    term = pod_dir / "containers" / "vm" / "f00d"
    term.parent.mkdir(parents=True)
    term.write_text("")
    mounts = [
        api.Mount(container_path="/cache", host_path=str(empty)),
        api.Mount(container_path="/data", host_path=str(data)),
        api.Mount(container_path="/ro", host_path=str(ro), readonly=True),
        api.Mount(container_path="/etc/cfg", host_path=str(cfg), readonly=True),
        api.Mount(container_path="/etc/sec", host_path=str(sec), readonly=True),
        api.Mount(container_path="/var/run/secrets/kubernetes.io/serviceaccount", host_path=str(tok),
                  readonly=True),
        api.Mount(container_path="/etc/hosts", host_path=str(hosts)),
        api.Mount(container_path="/dev/termination-log", host_path=str(term)),
    ]
    pod = VolumePod(vm_virtletd, world_dir, "vm-vols", image=name, mounts=mounts)
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        pod.wait_log(MARKER)
        _wait_for_agent(pod)
        assert len(_virtiofsd_for(world_dir)) >= 6, _virtiofsd_for(world_dir)

        def cat(path: str) -> bytes:
            res = _exec(pod, "cat", path)
            assert res.exit_code == 0, (path, res, pod.log_lines()[-30:])
            return bytes(res.stdout)

        assert cat("/data/hello") == b"hello from the host\n"
        assert cat("/ro/ro.txt") == b"read only\n"
        assert cat("/etc/cfg/greeting") == b"v1"
        assert cat("/etc/sec/password") == b"s3cret"
        assert cat("/var/run/secrets/kubernetes.io/serviceaccount/token") == b"tok-1"
        assert b"vm-vols-marker" in cat("/etc/hosts")
        # writes: the emptyDir and the hostPath reach the host; the read-only one fails, also after the guest's
        # root remounts it read-write (the host side is read-only)
        assert _exec(pod, "sh", "-c", "echo from-guest > /cache/out").exit_code == 0
        assert (empty / "out").read_text() == "from-guest\n"
        assert _exec(pod, "sh", "-c", "echo x > /ro/new").exit_code != 0
        _exec(pod, "mount", "-o", "remount,rw", "/ro")
        assert _exec(pod, "sh", "-c", "echo x > /ro/new").exit_code != 0
        assert not (ro / "new").exists()
        assert _exec(pod, "sh", "-c", "echo x > /etc/cfg/new").exit_code != 0
        # the kubelet's atomic ..data swap is seen by the running guest
        kubelet_swap(cfg, {"greeting": "v2"}, "2026_12_06_00_01_00.1")
        kubelet_swap(tok, {"token": "tok-2", "namespace": "default"}, "2026_12_06_00_01_00.3")
        deadline = time.monotonic() + SWAP_TIMEOUT
        while cat("/etc/cfg/greeting") != b"v2":
            assert time.monotonic() < deadline, "the ConfigMap update did not reach the guest"
            time.sleep(1)
        while cat("/var/run/secrets/kubernetes.io/serviceaccount/token") != b"tok-2":
            assert time.monotonic() < deadline, "the token update did not reach the guest"
            time.sleep(1)
    finally:
        pod.stop_and_remove()
    assert not _virtiofsd_for(world_dir)
    assert not _mounts_under(world_dir)
    assert (empty / "out").exists() and (ro / "ro.txt").exists() and (cfg / "greeting").exists()


# -- bad input: INVALID_ARGUMENT naming the volume, nothing left (libvirt's test driver: no VM boots) ------------

def _bad_mounts(tmp: Path) -> list[tuple[list[api.Mount], list[str]]]:
    ok = tmp / "ok"
    ok.mkdir()
    many = [api.Mount(container_path=f"/v{i}", host_path=str(ok)) for i in range(17)]
    return [
        ([api.Mount(container_path="/data", host_path=str(tmp / "missing"))], ["/data", "does not exist"]),
        ([api.Mount(container_path="/a", host_path=str(ok)), api.Mount(container_path="/a/", host_path=str(ok))],
         ["'/a'", "two mounts"]),
        ([api.Mount(container_path="data", host_path=str(ok))], ["'data'", "absolute"]),
        ([api.Mount(container_path="/x/../etc", host_path=str(ok))], ["/x/../etc", ".."]),
        ([api.Mount(container_path="/with space", host_path=str(ok))], ["/with space", "whitespace"]),
        ([api.Mount(container_path="/dev/null-ish", host_path="/dev/null")], ["/dev/null-ish", "neither"]),
        (many, ["17 directory volumes", "16"]),
    ]


def test_bad_mounts_are_refused(virtletd: VirtletdProcess, world_dir: Path, image_server: Any) -> None:
    from tests.integration.test_hostile_pod_specs import Pod as HostilePod

    image = small_translated_image(world_dir, image_server, "vols-test/vm")
    _pull(virtletd, image)
    tmp = world_dir / "vol-src"
    tmp.mkdir()
    pod = HostilePod(virtletd, world_dir, "bad-vols")
    rt = virtletd.runtime()
    containers = virtletd.state_dir / "containers"
    for mounts, words in _bad_mounts(tmp):
        cfg = api.ContainerConfig(metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=image),
                                  mounts=mounts)
        with pytest.raises(grpc.RpcError) as err:
            rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=pod.id, config=cfg,
                                                          sandbox_config=pod.config), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        for word in words:
            assert word in (err.value.details() or ""), (word, err.value.details())
        assert not rt.ListContainers(api.ListContainersRequest(), timeout=30).containers
        assert not any(containers.iterdir()) if containers.exists() else True
        assert not _mounts_under(world_dir)


# -- the 9p fallback ------------------------------------------------------------------------------------------

@pytest.fixture
def vm9p_virtletd(world_dir: Path, bridge_cni: Path, netns_guard: Any, libvirt_daemons: None) -> Any:
    from tests.integration.conftest import qemu_virtletd

    with qemu_virtletd(world_dir, netns_guard, bridge_cni, ["--share-driver", "9p"]) as daemon:
        yield daemon


def test_9p_shares(vm9p_virtletd: VirtletdProcess, world_dir: Path, image_server: Any, tiny_image: Path) -> None:
    """``share_driver: 9p``: QEMU serves the shares (no virtiofsd, no shared memory backing, ``<readonly/>`` from
    QEMU).  The tiny image's Debian cloud kernel has no 9p module, so the guest reports the share it cannot
    mount and boots on (``nofail`` semantics); a guest kernel with 9p mounts it (docs/volumes.md)."""
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    name = image_server.name("files/tiny.qcow2")
    _pull(vm9p_virtletd, name)
    src = world_dir / "host" / "ninep"
    src.mkdir(parents=True)
    (src / "f").write_text("over 9p\n")
    pod = VolumePod(vm9p_virtletd, world_dir, "vm-9p", image=name,
                    mounts=[api.Mount(container_path="/ninep", host_path=str(src), readonly=True)])
    try:
        pod.run_sandbox()
        pod.create()
        xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", f"virtlet-{pod.container_id}"],
                             capture_output=True, text=True, check=True).stdout
        assert "<driver type='path'/>" in xml and "<readonly/>" in xml and "memoryBacking" not in xml, xml
        assert f"<source dir='{src}'/>" in xml
        pod.start()
        line = pod.wait_log("virtlet tiny guest: cannot mount 9p")
        assert "/ninep" in line and "vl:" in line, line
        pod.wait_log(MARKER)
        assert not _virtiofsd_for(world_dir)
    finally:
        pod.stop_and_remove()
    assert not _mounts_under(world_dir)
