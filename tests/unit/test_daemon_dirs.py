"""virtletd's directory modes and the QEMU user read from libvirt's capabilities."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.daemon import qemu_ids_from_capabilities, secure_dir

CAPS = """<capabilities><host>
  <secmodel><model>none</model><doi>0</doi></secmodel>
  <secmodel><model>dac</model><doi>0</doi>
    <baselabel type='kvm'>+64055:+107</baselabel><baselabel type='qemu'>+64055:+64055</baselabel></secmodel>
</host></capabilities>"""


def test_qemu_ids() -> None:
    assert qemu_ids_from_capabilities(CAPS, "qemu") == (64055, 64055)
    assert qemu_ids_from_capabilities(CAPS, "kvm") == (64055, 107)
    assert qemu_ids_from_capabilities("<capabilities><host/></capabilities>", "qemu") is None
    assert qemu_ids_from_capabilities("<capabilities><host><secmodel><model>dac</model><baselabel type='qemu'>"
                                      "+x:+y</baselabel></secmodel></host></capabilities>", "qemu") is None
    assert qemu_ids_from_capabilities("not xml", "qemu") is None


def test_secure_dir(tmp_path: Path) -> None:
    d = tmp_path / "a" / "state"
    secure_dir(d, None)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    d.chmod(0o755)
    secure_dir(d, (0, 0))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    secure_dir(d, (64055, 4242))
    assert stat.S_IMODE(d.stat().st_mode) == 0o710 and d.stat().st_gid == 4242
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(errors.FailedPrecondition, match="sticky"):
        secure_dir(shared, None)
