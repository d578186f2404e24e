"""Scratch disks (``VirtletScratchDisks``): the annotation, the disk file, the guest lines, the disk order."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_volumes import _request
from virtlet import errors
from virtlet.vm import designer
from virtlet.volumes import devices as vdev
from virtlet.volumes import mounts as vm
from virtlet.volumes import scratch, shares

MAX = 2**40


def test_annotation_names_and_sizes() -> None:
    assert scratch.parse_annotation(None, MAX) == {}
    assert scratch.parse_annotation(" ", MAX) == {}
    assert scratch.parse_annotation("data, cache=10Gi,", MAX) == {"data": 1 << 30, "cache": 10 << 30}


@pytest.mark.parametrize("value,word", [
    ("Data", "DNS-1123"), ("a=1Mi", "smaller"), ("a=2Ti", "at most"), ("a=x", "'a'"), ("a,a", "twice"),
    ("a" * 9000, "at most 8192"), ("a/b", "not an emptyDir volume name"),
])
def test_bad_annotations(value: str, word: str) -> None:
    with pytest.raises(errors.InvalidArgument) as err:
        scratch.parse_annotation(value, MAX)
    assert word in str(err.value) and "VirtletScratchDisks" in str(err.value)


def test_plan_and_disk_file(tmp_path: Path) -> None:
    empty = tmp_path / "volumes" / "kubernetes.io~empty-dir" / "data"
    empty.mkdir(parents=True)
    plan = vm.plan_mounts([vm.CriMount("/data", str(empty))], {"data": 32 << 20})
    assert not plan.shares and plan.scratch == [vm.ScratchDisk(str(empty), "/data", "data", 32 << 20)]
    made = scratch.prepare(plan.scratch[0])
    assert made.path == str(empty / scratch.DISK_FILE) and made.serial == scratch.serial_for("/data")
    assert len(made.serial) == 20 and os.stat(made.path).st_size == 32 << 20
    assert os.stat(made.path).st_mode & 0o777 == 0o600
    out = subprocess.run(["dumpe2fs", "-h", made.path], capture_output=True, text=True, check=True).stdout
    assert made.fs_uuid in out and "metadata_csum" not in out
    (empty / "keep").write_text("x")
    assert scratch.prepare(plan.scratch[0]) == made  # a restarted container keeps the disk (the emptyDir's life)
    line = shares.mounts_file(scratch.guest_entries(plan.scratch)).decode()
    assert line == f"share UUID={made.fs_uuid} ext4 defaults,nofail /data\n"
    cfg = shares.cloud_config(scratch.guest_entries(plan.scratch), [])
    assert cfg["mounts"] == [[f"/dev/disk/by-uuid/{made.fs_uuid}", "/data", "ext4", "defaults,nofail", "0", "0"]]


def test_disk_order_block_then_scratch_then_config_drive() -> None:
    files = [scratch.ScratchFile(path="/e/virtlet-scratch.img", serial="scr-1", fs_uuid="u", guest_path="/d")]
    vols = (vdev.BlockVolume(host_path="/dev/loop9", guest_path="/dev/pvc", readonly=False, serial="vol-1"),)
    req = dataclasses.replace(_request(()), block_volumes=vols, scratch_disks=files, config_drive=Path("/seed"))
    disks = designer.design_domain(req).devices.disks
    assert [(d.target_dev, d.source, d.serial) for d in disks] == [
        ("vda", "/o", None), ("vdb", "/dev/loop9", "vol-1"), ("vdc", "/e/virtlet-scratch.img", "scr-1"),
        ("hdc", "/seed", None)]
    assert disks[2].type == "file" and disks[2].format == "raw"
