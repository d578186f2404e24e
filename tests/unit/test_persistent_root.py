"""The persistent root header: format, torn headers, and prepare_root's decisions on a disk file (qemu-img real)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.volumes import persistent_root as pr

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def test_header_round_trip_and_layout() -> None:
    h = pr.RootHeader(DIGEST, 12345, "0b0e4a8e-1111-4222-8333-444455556666")
    block = h.encode()
    assert len(block) == pr.HEADER_BYTES and block.startswith(pr.MAGIC)
    assert pr.RootHeader.decode(block) == h
    assert pr.RootHeader.decode(b"\0" * pr.HEADER_BYTES) is None


@pytest.mark.parametrize("offset", [0, 17, 25, 100, 170])
def test_a_torn_header_counts_as_absent(offset: int) -> None:
    block = bytearray(pr.RootHeader(DIGEST, 1, "id").encode())
    block[offset] ^= 0xFF
    assert pr.RootHeader.decode(bytes(block)) is None


def test_a_huge_length_is_absent() -> None:
    block = pr.MAGIC + b"\xff\xff\xff\xff" + b"\0" * (pr.HEADER_BYTES - 20)
    assert pr.RootHeader.decode(block) is None


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "2M"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", str(img)], check=True,
                   capture_output=True)
    return img


def _disk(tmp_path: Path, size: int) -> str:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(size)
    return str(disk)


def test_prepare_copies_once_then_reuses_then_refuses_another_image(tmp_path: Path, image: Path) -> None:
    disk = _disk(tmp_path, 8 * 1024 * 1024)
    first = pr.prepare_root(disk, image, "qcow2", DIGEST, reimage=False)
    data = Path(disk).read_bytes()
    assert data[:65536] == b"\x5a" * 65536
    assert pr.read_header(disk) == first and data[-pr.HEADER_BYTES:].startswith(pr.MAGIC)
    with open(disk, "r+b") as f:  # what the guest wrote since
        f.write(b"guest data")
    assert pr.prepare_root(disk, image, "qcow2", DIGEST, reimage=False) == first
    assert Path(disk).read_bytes()[:10] == b"guest data"  # not copied again
    with pytest.raises(errors.FailedPrecondition, match="VirtletReimageRoot"):
        pr.prepare_root(disk, image, "qcow2", OTHER, reimage=False)
    again = pr.prepare_root(disk, image, "qcow2", OTHER, reimage=True)
    assert again.digest == OTHER and again.instance_id != first.instance_id
    assert Path(disk).read_bytes()[:10] == b"\x5a" * 10


def test_a_copy_without_header_is_copied_again(tmp_path: Path, image: Path) -> None:
    disk = _disk(tmp_path, 8 * 1024 * 1024)
    with open(disk, "r+b") as f:
        f.write(b"half a copy")
    pr.prepare_root(disk, image, "qcow2", DIGEST, reimage=False)
    assert Path(disk).read_bytes()[:11] == b"\x5a" * 11


def test_a_device_smaller_than_the_image_is_invalid(tmp_path: Path, image: Path) -> None:
    disk = _disk(tmp_path, 2 * 1024 * 1024 + 512 * 1024)  # image 2 MiB + 1 MiB reserved does not fit
    with pytest.raises(errors.InvalidArgument, match="the image needs 2097152 bytes"):
        pr.prepare_root(disk, image, "qcow2", DIGEST, reimage=False)
    assert pr.read_header(disk) is None and Path(disk).read_bytes().count(0) == 2 * 1024 * 1024 + 512 * 1024

