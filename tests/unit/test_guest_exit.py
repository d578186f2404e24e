"""The guest's exit-code port (virtlet.vm.guest_exit): the domain device, and the strict, bounded reading of what
the guest wrote."""

from __future__ import annotations

import os
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from tests.unit.test_designer import request
from virtlet.vm import domain_xml as dx
from virtlet.vm import guest_exit
from virtlet.vm.designer import design_domain


@pytest.mark.parametrize(("data", "code"), [
    (b"exit-code 3\n", 3),
    (b"exit-code 0\n", 0),
    (b"exit-code 255", 255),
    (b"exit-code 3\r\n", 3),
    (b"exit-code 3\nexit-code 4\n", 3),  # the first line only
    (b"exit-code 256\n", None),
    (b"exit-code -1\n", None),
    (b"exit-code 1000\n", None),
    (b"exit-code\n", None),
    (b"exit-code 3 trailing\n", None),
    (b" exit-code 3\n", None),
    (b"\nexit-code 3\n", None),
    (b"EXIT-CODE 3\n", None),
    (b"exit-code \xff\n", None),
    (b"", None),
    (b"exit-code " + b"0" * 100, None),
])
def test_parse(data: bytes, code: int | None) -> None:
    assert guest_exit.parse(data) == code


def test_read_reported_bounded_and_strict(tmp_path: Path) -> None:
    path = guest_exit.exit_file(tmp_path)
    assert guest_exit.read_reported(path, "pod") is None  # nothing written: no report
    path.write_bytes(b"exit-code 7\n")
    assert guest_exit.read_reported(path, "pod") == 7
    # the first line must fit in MAX_BYTES: a line past it is not read at all
    path.write_bytes(b"x" * guest_exit.MAX_BYTES + b"\nexit-code 7\n")
    assert guest_exit.read_reported(path, "pod") is None
    path.write_bytes(b"exit-code 9\n" + b"y" * (1 << 20))
    assert guest_exit.read_reported(path, "pod") == 9


def test_read_and_reset_never_follow_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"exit-code 5\n")
    link = guest_exit.exit_file(tmp_path)
    link.symlink_to(target)
    assert guest_exit.read_reported(link, "pod") is None
    guest_exit.reset(link)
    assert target.read_bytes() == b"exit-code 5\n"


def test_reset_empties_a_stale_report(tmp_path: Path) -> None:
    path = guest_exit.exit_file(tmp_path)
    guest_exit.reset(path)  # absent: nothing to do, nothing made
    assert not path.exists()
    path.write_bytes(b"exit-code 3\n")
    guest_exit.reset(path)
    assert path.read_bytes() == b"" and guest_exit.read_reported(path, "pod") is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    guest_exit.reset(fifo)  # not a regular file: left alone, no hang
    assert guest_exit.read_reported(fifo, "pod") is None


def test_domain_has_the_exit_port_only_when_asked() -> None:
    assert design_domain(request()).devices.file_channels == []
    domain = design_domain(request(exit_file=Path("/var/lib/virtlet/containers/c/guest-exit")))
    assert domain.devices.file_channels == [
        dx.FileChannel(path="/var/lib/virtlet/containers/c/guest-exit", name="cloud.virtlet.exit")]
    xml = dx.to_string(domain)
    channel = [c for c in ET.fromstring(xml).iter("channel") if c.get("type") == "file"]
    assert len(channel) == 1
    assert channel[0].find("source").get("path") == "/var/lib/virtlet/containers/c/guest-exit"  # type: ignore[union-attr]
    assert channel[0].find("target").attrib == {"type": "virtio", "name": "cloud.virtlet.exit"}  # type: ignore[union-attr]
    assert dx.from_string(xml).devices.file_channels == domain.devices.file_channels
    # the guest agent's and the exec channel are still there, and still read back as such (not as file channels)
    assert [c.name for c in dx.from_string(xml).devices.channels] == ["org.qemu.guest_agent.0", "cloud.virtlet.exec"]
