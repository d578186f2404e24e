"""Validation of downloaded files with real qemu-img images and hand-made non-images."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.images import validate


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def test_qcow2_and_raw(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "a.qcow2"), "10M")
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "a.raw"), "2M")
    assert validate.inspect(tmp_path / "a.qcow2") == validate.ImageInfo("qcow2", 10 << 20)
    assert validate.inspect(tmp_path / "a.raw") == validate.ImageInfo("raw", 2 << 20)
    # a qcow2 served with a silly content type is still a qcow2 (the magic decides)
    assert validate.inspect(tmp_path / "a.qcow2", "text/html").format == "qcow2"


def test_backing_file_refused(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "raw", str(tmp_path / "base.raw"), "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", str(tmp_path / "base.raw"), "-F", "raw",
             str(tmp_path / "c"))
    with pytest.raises(errors.InvalidArgument, match="backing file"):
        validate.inspect(tmp_path / "c", what="image 'c'")


def test_external_data_file_refused(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}",
             str(tmp_path / "d.qcow2"), "1M")
    with pytest.raises(errors.InvalidArgument, match="external data file"):
        validate.inspect(tmp_path / "d.qcow2")


def test_other_formats_refused(tmp_path: Path) -> None:
    qemu_img("create", "-q", "-f", "vdi", str(tmp_path / "a.vdi"), "1M")
    qemu_img("create", "-q", "-f", "vmdk", str(tmp_path / "a.vmdk"), "1M")
    qemu_img("create", "-q", "-f", "vhdx", str(tmp_path / "a.vhdx"), "1M")
    for name, fmt in (("a.vdi", "vdi"), ("a.vmdk", "vmdk"), ("a.vhdx", "vhdx")):
        with pytest.raises(errors.InvalidArgument, match=f"is a {fmt} image; only qcow2 and raw"):
            validate.inspect(tmp_path / name)


@pytest.mark.parametrize(("content", "ctype", "fragment"), [
    (b"\0" * 4096, "text/html; charset=utf-8", "served as text/html"),
    (b"\n  <!DOCTYPE HTML><html></html>", "application/octet-stream", "HTML/XML markup"),
    (b"\xef\xbb\xbf<?xml version='1.0'?><a/>", "", "HTML/XML markup"),
    (b"# Disk DescriptorFile\nRW 10 FLAT \"/etc/shadow\" 0\n", "", "vmdk descriptor"),
    (b"\n# Disk DescriptorFile\nRW 10 FLAT \"/etc/shadow\" 0\n", "", "is text"),
    ("héllo wörld ".encode() * 400, "", "is text"),
    (b"", "", "empty"),
])
def test_not_an_image(tmp_path: Path, content: bytes, ctype: str, fragment: str) -> None:
    (tmp_path / "f").write_bytes(content)
    with pytest.raises(errors.InvalidArgument, match=fragment):
        validate.inspect(tmp_path / "f", ctype)


def test_binary_without_nul_is_raw(tmp_path: Path) -> None:
    data = bytes(range(1, 256)) * 64  # no NUL, not UTF-8: binary, so raw
    (tmp_path / "f").write_bytes(data)
    assert validate.inspect(tmp_path / "f").format == "raw"


def test_qemu_img_always_gets_a_format_and_its_errors_stay_in_the_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A VMDK descriptor padded with NULs (so it is not "text"): probed, qemu-img would open the host path
    it names; as raw it is a 512-byte disk.  A corrupt qcow2 fails qemu-img: the caller's message has no
    path, the log has the details."""
    descriptor = (b'# Disk DescriptorFile\nversion=1\ncreateType="monolithicFlat"\n'
                  b'RW 2048 FLAT "/etc/virtlet-no-such-file" 0\n')
    (tmp_path / "v").write_bytes(b"\n" + descriptor + b"\0" * 400)
    assert validate.inspect(tmp_path / "v").format == "raw"
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "q"), "1M")
    data = bytearray((tmp_path / "q").read_bytes())
    data[20:24] = (99).to_bytes(4, "big")  # cluster_bits out of range
    (tmp_path / "q").write_bytes(bytes(data))
    with pytest.raises(errors.InvalidArgument) as info:
        validate.inspect(tmp_path / "q", what="image 'q'")
    assert str(info.value) == "image 'q' is not a valid qcow2 image (details in the virtletd log)"
    assert str(tmp_path) in caplog.text
