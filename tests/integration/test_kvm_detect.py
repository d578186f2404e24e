"""KVM detection on this machine with the real QEMU: the probe guest runs under TCG, and KVM is judged by
really running it (on these machines /dev/kvm opens but guests hang, so auto -> TCG and on -> error)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.vm import kvm

PROBE_TIMEOUT = 3.0


def child_processes() -> list[int]:
    """Processes this test process started that still exist (a timed-out probe QEMU must be gone)."""
    me = str(os.getpid())
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:  # field 4: the parent pid
                pids.append(int(entry.name))
    return pids


@pytest.fixture(autouse=True)
def no_leftover_qemu() -> None:
    yield
    assert child_processes() == []


def test_firmware_shape() -> None:
    firmware = kvm.probe_firmware()
    assert len(firmware) == 64 * 1024
    assert firmware[0xFFF0:0xFFF5] == b"\xea\x00\x00\x00\xf0"  # reset vector: jmp 0xf000:0000


def test_probe_guest_runs_under_tcg() -> None:
    """The probe itself is sound: under software emulation it reaches its exit port."""
    result = kvm.run_probe("tcg", kvm.find_emulator(), timeout=20.0)
    assert result.ok, result.detail
    assert "tcg" in result.detail


def test_auto() -> None:
    decision = kvm.detect("auto", timeout=PROBE_TIMEOUT)
    if decision.domain_type == "kvm":  # a machine where KVM really works
        assert "KVM works" in decision.reason
    else:
        assert decision.domain_type == "qemu"
        assert "KVM does not work" in decision.reason
        assert "TCG" in decision.reason


def test_on() -> None:
    try:
        decision = kvm.detect("on", timeout=PROBE_TIMEOUT)
    except errors.FailedPrecondition as exc:
        assert "KVM does not work" in str(exc)
        assert "auto" in str(exc)  # says what to do instead
    else:
        assert decision.domain_type == "kvm"


def test_off_runs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kvm, "run_probe", lambda *a, **k: pytest.fail("kvm off must not probe"))
    decision = kvm.detect("off")
    assert decision.domain_type == "qemu"
    assert "off" in decision.reason


def test_bad_mode() -> None:
    with pytest.raises(errors.InvalidArgument, match="auto, on, off"):
        kvm.detect("maybe")


def test_no_kvm_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kvm, "KVM_DEVICE", tmp_path / "kvm")
    decision = kvm.detect("auto")
    assert decision.domain_type == "qemu"
    assert "does not exist" in decision.reason
    with pytest.raises(errors.FailedPrecondition, match="does not exist"):
        kvm.detect("on")


def test_missing_emulator() -> None:
    if not kvm.KVM_DEVICE.exists():
        pytest.skip("no /dev/kvm: the emulator is never looked at")
    decision = kvm.detect("auto", emulator="/nonexistent/qemu-system-x86_64")
    assert decision.domain_type == "qemu"
    assert "not installed" in decision.reason
