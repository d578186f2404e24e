"""Block volumes and the persistent root disk on real parts: loop devices as block PVs, a running virtletd over
gRPC, real QEMU (TCG) booting the tiny image, exec through the guest agent.

One boot checks the block PV (mkfs + mount inside the guest, the filesystem seen on the host device) and the
persistent root's first use (after a SIGKILL of virtletd during the first copy); a second pod on the same
device reads what the first wrote.  Bad devices are refused on libvirt's test driver (no VM needed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_crash_matrix import _arm, _kill_at
from tests.integration.test_hostile_pod_specs import IMAGE as TEST_IMAGE
from tests.integration.test_hostile_pod_specs import Pod as DriverPod
from tests.integration.test_hostile_pod_specs import vm_image  # noqa: F401  (fixture)
from tests.integration.test_vm_exec import _exec, _wait_for_agent
from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull
from virtlet.cri.gen import api_pb2 as api
from virtlet.volumes import persistent_root as pr
from virtlet.volumes.devices import MAX_BLOCK_VOLUMES
from virtlet.volumes.devices import serial_for as vd_serial

pytestmark = [pytest.mark.libvirt, pytest.mark.network]
MIB = 1024 * 1024
FAILPOINT = "volumes.root_before_header"


@pytest.fixture
def loops(world_dir: Path) -> Iterator[Callable[[int], str]]:
    """``make(size_mib)`` -> a new loop device on a sparse file in the test's dir; all detached afterwards."""
    made: list[str] = []

    def make(size_mib: int) -> str:
        backing = world_dir / f"pv{len(made)}.img"
        with open(backing, "wb") as f:
            f.truncate(size_mib * MIB)
        dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                             check=True).stdout.strip()
        made.append(dev)
        return dev

    try:
        yield make
    finally:
        for dev in made:
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        left = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        assert str(world_dir) not in left, f"loop devices left: {left}"


class BlockPod(Pod):
    def __init__(self, *args: Any, devices: list[api.Device], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.devices = devices

    def container_config(self, attempt: int = 0) -> api.ContainerConfig:
        cfg = super().container_config(attempt)
        cfg.devices.extend(self.devices)
        return cfg


def _sh(pod: Pod, script: str) -> str:
    res = _exec(pod, "sh", "-c", script, timeout=60)
    assert res.exit_code == 0, (script, res)
    return str(res.stdout.decode())


def _boot(pod: Pod) -> None:
    pod.start()
    pod.wait_log(MARKER)
    _wait_for_agent(pod)


def test_block_pv_and_persistent_root(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                                      tiny_image: Path, loops: Callable[[int], str]) -> None:
    daemon = vm_virtletd
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    # a second image: the same guest uncompressed, another digest
    subprocess.run(["qemu-img", "convert", "-q", "-O", "qcow2", str(tiny_image),
                    str(image_server.root / "other.qcow2")], check=True)
    tiny, other = image_server.name("files/tiny.qcow2"), image_server.name("files/other.qcow2")
    _pull(daemon, tiny)
    _pull(daemon, other)
    data_dev, root_dev = loops(16), loops(64)
    devices = [api.Device(host_path=data_dev, container_path="/dev/testpvc", permissions="rwm"),
               api.Device(host_path=root_dev, container_path="/", permissions="rwm")]

    # first use, killed between the copy and the header: no header, so the retry copies again
    _arm(daemon, FAILPOINT)
    pod = BlockPod(daemon, world_dir, "vm-block", image=tiny, devices=devices)
    second: BlockPod | None = None
    third: BlockPod | None = None
    busy: BlockPod | None = None
    try:
        pod.run_sandbox()
        req = api.CreateContainerRequest(pod_sandbox_id=pod.sandbox_id, config=pod.container_config(),
                                         sandbox_config=pod.sandbox_config)
        _kill_at(daemon, FAILPOINT, lambda: pod.rt.CreateContainer(req, timeout=300))
        assert pr.read_header(root_dev) is None
        pod.rt = daemon.runtime()
        pod.create()  # the kubelet's retry
        header = pr.read_header(root_dev)
        assert header is not None and header.digest.startswith("sha256:")
        _boot(pod)
        # the block PV at its devicePath: a filesystem made and mounted in the guest, seen on the host device
        out = _sh(pod, "ls -l /dev/testpvc && mke2fs -q /dev/testpvc && mkdir -p /mnt/pvc && "
                       "mount -t ext2 /dev/testpvc /mnt/pvc && echo on-pvc > /mnt/pvc/f && cat /mnt/pvc/f && "
                       "umount /mnt/pvc && sync")
        assert "/dev/testpvc -> /dev/vdb" in out and "on-pvc" in out, out
        with open(data_dev, "rb") as f:
            f.seek(1080)
            assert f.read(2) == b"\x53\xef", "no ext2 superblock on the host's device"
        # the persistent root: write into the disk's FAT partition; instance id from the device header
        _sh(pod, "mkdir -p /mnt/root && mount /dev/vda1 /mnt/root && echo persisted > /mnt/root/persist.txt && "
                 "umount /mnt/root && sync")
        assert _sh(pod, "cat /run/instance-id") == header.instance_id
        pod.stop_and_remove()
        pod.container_id = pod.sandbox_id = ""

        # a new pod on the same devices boots what is there (no copy: the header is unchanged); this one on
        # virtio-scsi.  The guest kernel probes SCSI disks in parallel, so which of them is sda is not fixed
        # (CI saw the root as sdb): the root is the disk with a partition, the PV the disk its serial (VPD page)
        # links at /dev/testpvc, and the two differ.
        second = BlockPod(daemon, world_dir, "vm-block-2", image=tiny, devices=devices,
                          annotations={"VirtletDiskDriver": "scsi"})
        second.run_sandbox()
        second.create()
        assert pr.read_header(root_dev) == header
        _boot(second)
        root_part = _sh(second, "for _ in $(seq 50); do p=$(ls /dev/sd?1 2>/dev/null) && break; sleep 0.2; done; "
                                "echo $p").strip()
        assert re.fullmatch(r"/dev/sd[a-z]1", root_part), root_part
        assert _sh(second, f"mkdir -p /mnt/root && mount {root_part} /mnt/root && cat /mnt/root/persist.txt; "
                           "umount /mnt/root") == "persisted\n"
        out = _sh(second, "readlink /dev/testpvc && mkdir -p /mnt/pvc && mount -t ext2 /dev/testpvc /mnt/pvc && "
                          "cat /mnt/pvc/f && umount /mnt/pvc")
        pv_disk = out.splitlines()[0]
        assert re.fullmatch(r"/dev/sd[a-z]", pv_disk) and pv_disk != root_part[:-1] and "on-pvc" in out, out
        assert _sh(second, "cat /run/instance-id") == header.instance_id
        # while it runs, another pod cannot boot the same root device
        busy = BlockPod(daemon, world_dir, "vm-block-busy", image=tiny, devices=devices[1:])
        busy.run_sandbox()
        with pytest.raises(grpc.RpcError) as err:
            busy.create()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "in use" in str(err.value.details())
        busy.stop_and_remove()
        busy.sandbox_id = ""
        second.stop_and_remove()
        second.container_id = second.sandbox_id = ""

        # another image on that device is refused, and nothing is made
        third = BlockPod(daemon, world_dir, "vm-block-3", image=other, devices=devices[1:])
        third.run_sandbox()
        with pytest.raises(grpc.RpcError) as err:
            third.create()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "VirtletReimageRoot" in str(err.value.details()) and root_dev in str(err.value.details())
        assert third.rt.ListContainers(api.ListContainersRequest()).containers == []
        assert pr.read_header(root_dev) == header
    finally:
        for p in (pod, second, third, busy):
            if p is not None:
                p.stop_and_remove()


def _refused(pod: DriverPod, devices: list[api.Device], needles: list[str], root: Path) -> None:
    req = pod.create_request()
    req.config.devices.extend(devices)
    with pytest.raises(grpc.RpcError) as err:
        pod.rt.CreateContainer(req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    for needle in needles:
        assert needle in str(err.value.details()), (needle, err.value.details())
    assert pod.rt.ListContainers(api.ListContainersRequest()).containers == []
    containers = root / "containers"
    assert not containers.exists() or not list(containers.iterdir()), "a container dir is left"


def test_bad_devices_are_refused(virtletd: VirtletdProcess, world_dir: Path, vm_image: str,  # noqa: F811
                                 loops: Callable[[int], str]) -> None:
    _pull(virtletd, TEST_IMAGE)
    pod = DriverPod(virtletd, world_dir, "bad-devices")
    one, small = loops(4), loops(8)
    regular = world_dir / "not-a-device"
    regular.write_bytes(b"x")
    d = api.Device
    root = virtletd.state_dir
    _refused(pod, [d(host_path="/dev/no-such-pv", container_path="/dev/pv", permissions="rwm")],
             ["/dev/no-such-pv", "does not exist"], root)
    _refused(pod, [d(host_path=str(regular), container_path="/dev/pv", permissions="rwm")],
             [str(regular), "not a block device"], root)
    _refused(pod, [d(host_path=one, container_path="/dev/pv", permissions="rwm"),
                   d(host_path=small, container_path="/dev/pv", permissions="rwm")],
             ["/dev/pv", "two devices"], root)
    _refused(pod, [d(host_path=one, container_path=f"/dev/pv{i}", permissions="rwm")
                   for i in range(MAX_BLOCK_VOLUMES + 2)], [f"at most {MAX_BLOCK_VOLUMES}"], root)
    # a persistent root smaller than the image (16 MiB virtual + 1 MiB reserved): refused, the device untouched
    _refused(pod, [d(host_path=small, container_path="/", permissions="rwm")],
             [small, "the image needs", "larger volume"], root)
    assert pr.read_header(small) is None
    with open(small, "rb") as f:
        assert f.read(8 * MIB).count(0) == 8 * MIB
    # a persistent root the host has mounted (a mistaken host path): refused before anything is written
    mounted, mnt = loops(8), world_dir / "mnt"
    subprocess.run(["mke2fs", "-q", mounted], check=True)
    mnt.mkdir()
    subprocess.run(["mount", mounted, str(mnt)], check=True)
    try:
        req = pod.create_request()
        req.config.devices.append(d(host_path=mounted, container_path="/", permissions="rwm"))
        with pytest.raises(grpc.RpcError) as err:
            pod.rt.CreateContainer(req, timeout=60)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "in use on the host" in str(
            err.value.details()), err.value
        assert pod.rt.ListContainers(api.ListContainersRequest()).containers == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    # a valid block PV: a raw block disk with its serial in the defined domain (the test driver does not boot)
    req = pod.create_request()
    req.config.devices.append(d(host_path=one, container_path="/dev/data", permissions="r"))
    cid = pod.rt.CreateContainer(req, timeout=60).container_id
    try:
        assert pod.rt.ContainerStatus(api.ContainerStatusRequest(container_id=cid)).status.id == cid
    finally:
        pod.rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=60)
        pod.rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
        pod.rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)


@pytest.mark.slow
def test_full_image_links_block_pv(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                                   loops: Callable[[int], str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Real cloud-init and udev: virtlet's bootcmd links /dev/disk/by-id/virtio-<serial> at the devicePath."""
    from tests.integration.conftest import guest_image

    shutil.copy(guest_image("full"), image_server.root / "full.qcow2")
    name = image_server.name("files/full.qcow2")
    _pull(vm_virtletd, name)
    dev = loops(16)
    pod = BlockPod(vm_virtletd, world_dir, "full-block", image=name, memory=1 << 30,
                   devices=[api.Device(host_path=dev, container_path="/dev/pvs/data", permissions="r")])
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        from tests.integration import test_vm_exec

        monkeypatch.setattr(test_vm_exec, "AGENT_TIMEOUT", 600.0)  # a full Debian boot under TCG
        _wait_for_agent(pod)
        out = ""
        for _ in range(60):  # the agent may answer before cloud-init's bootcmd ran
            res = _exec(pod, "sh", "-c", "readlink /dev/pvs/data; readlink -f /dev/disk/by-id/virtio-"
                        + vd_serial("/dev/pvs/data"))
            out = res.stdout.decode()
            if res.exit_code == 0 and len(out.split()) == 2:
                break
            time.sleep(2)
        link, byid = out.split()
        assert link == byid and link.startswith("/dev/vd"), out
        # read-only: a write to it fails in the guest
        res = _exec(pod, "sh", "-c", "dd if=/dev/zero of=/dev/pvs/data bs=4096 count=1 oflag=direct")
        assert res.exit_code != 0, res
    finally:
        pod.stop_and_remove()
