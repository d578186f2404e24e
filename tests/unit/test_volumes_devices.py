"""Block volumes (CRI devices): validation, serials, the guest map, and the disks the designer makes of them
(libvirt's own parser accepts them and the XML round-trips)."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from xml.etree import ElementTree as ET

import libvirt
import pytest

from tests.unit.test_designer import request
from virtlet import errors
from virtlet.vm import designer
from virtlet.vm import domain_xml as dx
from virtlet.vm.designer import design_domain
from virtlet.volumes import devices as vd
from virtlet.volumes.devices import DeviceRequest


@pytest.fixture
def blockdevs() -> list[str]:
    """Block device nodes of this host (only stat'ed, never opened)."""
    found = sorted(str(p) for p in Path("/dev").iterdir() if p.name.startswith("loop") and
                   stat.S_ISBLK(os.stat(p).st_mode))
    if len(found) < 3:
        pytest.skip("needs three /dev/loop* nodes")
    return found


def test_serial_is_stable_short_and_per_path() -> None:
    s = vd.serial_for("/dev/testpvc")
    assert s == vd.serial_for("/dev/testpvc") and s.startswith("vol-") and len(s) == 20
    assert s != vd.serial_for("/dev/otherpvc")


def test_plan_splits_root_and_volumes(blockdevs: list[str]) -> None:
    plan = vd.plan_devices([DeviceRequest(blockdevs[0], "/dev/data", "rwm"),
                            DeviceRequest(blockdevs[1], "/", "rwm"),
                            DeviceRequest(blockdevs[2], "/dev/ro/", "r")])
    assert plan.root is not None and plan.root.host_path == blockdevs[1]
    assert [(v.host_path, v.guest_path, v.readonly) for v in plan.volumes] == [
        (blockdevs[0], "/dev/data", False), (blockdevs[2], "/dev/ro", True)]
    assert vd.guest_map(plan.volumes) == (f"{vd.serial_for('/dev/data')} /dev/data\n"
                                          f"{vd.serial_for('/dev/ro')} /dev/ro\n").encode()
    assert "virtio-" + vd.serial_for("/dev/data") in vd.link_script(plan.volumes)


@pytest.mark.parametrize(("devs", "needle"), [
    ([DeviceRequest("/nonexistent/dev", "/dev/a")], "'/nonexistent/dev' does not exist"),
    ([DeviceRequest("/etc/hostname", "/dev/a")], "is not a block device"),
    ([DeviceRequest("/dev/null", "/dev/a")], "is not a block device"),
    ([DeviceRequest("BLK0", "/dev/a"), DeviceRequest("BLK1", "/dev/a/")], "used by two devices"),
    ([DeviceRequest("BLK0", "/dev/a"), DeviceRequest("BLK0", "/dev/b")], "is also passed as"),
    ([DeviceRequest("BLK0", "dev/a")], "must be an absolute path"),
    ([DeviceRequest("BLK0", "/dev/a\nb")], "must be an absolute path"),
    ([DeviceRequest("BLK0", "/", "r")], "must be writable"),
    ([DeviceRequest("BLK0", f"/dev/d{i}") for i in range(vd.MAX_BLOCK_VOLUMES + 2)], "at most 16"),
])
def test_bad_devices_are_invalid_argument(blockdevs: list[str], devs: list[DeviceRequest], needle: str) -> None:
    devs = [dataclasses.replace(d, host_path=blockdevs[int(d.host_path[3:])]) if d.host_path.startswith("BLK")
            else d for d in devs]
    with pytest.raises(errors.InvalidArgument) as err:
        vd.plan_devices(devs)
    assert needle in str(err.value)


def test_seventeen_data_volumes_refused_with_a_root(blockdevs: list[str]) -> None:
    devs = [DeviceRequest(blockdevs[0], f"/dev/d{i}") for i in range(vd.MAX_BLOCK_VOLUMES + 1)]
    with pytest.raises(errors.InvalidArgument, match="at most 16"):
        vd.plan_devices(devs)


VOLS = (vd.BlockVolume("/dev/loop7", "/dev/testpvc", False, vd.serial_for("/dev/testpvc")),
        vd.BlockVolume("/dev/loop8", "/dev/ro", True, vd.serial_for("/dev/ro")))


def _disks(domain: dx.Domain) -> list[tuple[str, str, str, str, bool, str | None]]:
    return [(d.type, d.source, d.target_dev, d.target_bus, d.readonly, d.serial) for d in domain.devices.disks]


def test_volumes_follow_the_root_and_the_config_drive_stays_last() -> None:
    d = design_domain(request(block_volumes=VOLS))
    assert _disks(d) == [
        ("file", "/var/lib/virtlet/overlays/c.qcow2", "vda", "virtio", False, None),
        ("block", "/dev/loop7", "vdb", "virtio", False, VOLS[0].serial),
        ("block", "/dev/loop8", "vdc", "virtio", True, VOLS[1].serial),
        ("file", "/var/lib/virtlet/config/c.iso", "hdc", "ide", True, None)]
    xml = ET.tostring(d.devices.disks[2].to_xml(), encoding="unicode")
    assert ("<disk type=\"block\" device=\"disk\"><driver name=\"qemu\" type=\"raw\" cache=\"none\" io=\"native\" />"
            "<source dev=\"/dev/loop8\" /><target dev=\"vdc\" bus=\"virtio\" /><readonly />"
            f"<serial>{VOLS[1].serial}</serial></disk>") == xml


def test_scsi_volumes_and_persistent_root() -> None:
    d = design_domain(request({"VirtletDiskDriver": "scsi"}, block_volumes=VOLS, root_device="/dev/loop9"))
    assert _disks(d) == [
        ("block", "/dev/loop9", "sda", "scsi", False, None),
        ("block", "/dev/loop7", "sdb", "scsi", False, VOLS[0].serial),
        ("block", "/dev/loop8", "sdc", "scsi", True, VOLS[1].serial),
        ("file", "/var/lib/virtlet/config/c.iso", "sdd", "scsi", True, None)]
    fields = d.metadata[0].fields
    assert fields["root-device"] == "/dev/loop9"
    assert fields["overlay"] == "/var/lib/virtlet/overlays/c.qcow2"  # recovery still finds the container dir


def test_disk_names_past_z() -> None:
    assert [designer._disk_name("vd", i) for i in (0, 1, 25, 26, 27)] == ["vda", "vdb", "vdz", "vdaa", "vdab"]


@pytest.mark.parametrize("scsi", [False, True])
def test_libvirt_accepts_block_disks_and_they_round_trip(scsi: bool) -> None:
    annotations = {"VirtletDiskDriver": "scsi"} if scsi else {}
    req = request(annotations, block_volumes=VOLS, root_device="/dev/loop9")
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXMLFlags(dx.to_string(design_domain(req)), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        try:
            back = dx.from_string(dom.XMLDesc(0), {designer.VIRTLET_XMLNS: designer.VIRTLET_XMLNS_PREFIX})
            assert back.devices.disks == design_domain(req).devices.disks
        finally:
            dom.undefine()
    finally:
        conn.close()


def test_seed_carries_the_guest_map_and_a_per_boot_link() -> None:
    from virtlet import cloudinit

    seed = cloudinit.render(cloudinit.CloudInitRequest(
        pod_name="vm", pod_namespace="ns", pod_uid="u", hostname="", instance_id="disk-instance",
        extra_user_data={"bootcmd": [vd.link_script(VOLS)]}, extra_files={vd.GUEST_MAP_FILE: vd.guest_map(VOLS)}))
    assert seed.files[vd.GUEST_MAP_FILE] == f"{VOLS[0].serial} /dev/testpvc\n{VOLS[1].serial} /dev/ro\n".encode()
    assert b"instance-id: disk-instance" in seed.files["meta-data"]
    user = seed.files["user-data"].decode()
    assert "bootcmd:" in user and f"virtio-{VOLS[0].serial}" in user and "'/dev/ro'" in user


def test_link_script_links_by_serial(tmp_path: Path) -> None:
    """The bootcmd snippet run by a real shell against a /dev/disk/by-id made in tmp (a link to a host block
    node, never opened)."""
    import subprocess

    byid = tmp_path / "by-id"
    byid.mkdir()
    vol = vd.BlockVolume("/dev/loopX", str(tmp_path / "dev" / "testpvc"), False, vd.serial_for("/dev/testpvc"))
    blk = next((p for p in Path("/dev").glob("loop[0-9]*")), None)
    if blk is None:
        pytest.skip("no /dev/loop* node")
    os.symlink(blk, byid / f"virtio-{vol.serial}")
    script = vd.link_script([vol]).replace("/dev/disk/by-id", str(byid))
    subprocess.run(["sh", "-c", script], check=True, timeout=30)
    assert os.readlink(tmp_path / "dev" / "testpvc") == str(blk)
