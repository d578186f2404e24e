"""qcow2 overlays made by the real qemu-img: backed by the base, grown only when asked, base never written."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.vm import overlay

MiB = 1024**2


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(params=["qcow2", "raw"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    fmt = request.param
    path = tmp_path / f"base.{fmt}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), "16M"], check=True)
    with open(path, "r+b") as f:  # some content, so "unchanged" means something (raw: first sector)
        if fmt == "raw":
            f.write(b"virtlet-overlay-test" * 10)
    return path, fmt


def test_overlay_grows_and_leaves_base_alone(base: tuple[Path, str], tmp_path: Path) -> None:
    path, fmt = base
    before = sha256(path)
    dest = tmp_path / "ov.qcow2"
    overlay.create_overlay(path, fmt, dest, 64 * MiB)
    assert overlay.virtual_size(dest) == 64 * MiB
    assert overlay.backing_file(dest) == str(path.absolute())
    assert overlay.image_info(dest)["format"] == "qcow2"
    assert dest.stat().st_size < MiB  # an overlay, not a copy
    assert dest.stat().st_mode & 0o777 == 0o600  # the guest's disk: private, libvirt gives it to QEMU's user
    # the guest writes to the overlay only
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(dest)], check=True,
                   capture_output=True)
    assert sha256(path) == before
    assert overlay.virtual_size(path) == 16 * MiB


@pytest.mark.parametrize("size", [None, 8 * MiB, 16 * MiB])
def test_overlay_never_shrinks(size: int | None, tmp_path: Path) -> None:
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    dest = tmp_path / "ov.qcow2"
    overlay.create_overlay(path, "qcow2", dest, size)
    assert overlay.virtual_size(dest) == 16 * MiB


def test_relative_base_is_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "1M"], check=True)
    monkeypatch.chdir(tmp_path)
    overlay.create_overlay(Path("b.raw"), "raw", tmp_path / "ov.qcow2", None)
    assert overlay.backing_file(tmp_path / "ov.qcow2") == str(tmp_path / "b.raw")


def test_existing_overlay_is_not_replaced(tmp_path: Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "1M"], check=True)
    dest = tmp_path / "ov.qcow2"
    dest.write_bytes(b"in use")
    with pytest.raises(errors.AlreadyExists, match="already exists"):
        overlay.create_overlay(tmp_path / "b.raw", "raw", dest, None)
    assert dest.read_bytes() == b"in use"


def test_missing_base(tmp_path: Path) -> None:
    with pytest.raises(errors.NotFound, match="does not exist"):
        overlay.create_overlay(tmp_path / "nope.qcow2", "qcow2", tmp_path / "ov.qcow2", None)
    assert not (tmp_path / "ov.qcow2").exists()


def test_unsupported_format(tmp_path: Path) -> None:
    with pytest.raises(errors.InvalidArgument, match="qcow2, raw"):
        overlay.create_overlay(tmp_path / "b.vmdk", "vmdk", tmp_path / "ov.qcow2", None)


def test_wrong_format_leaves_nothing(tmp_path: Path) -> None:
    """A raw base declared as qcow2: qemu-img fails, and no half-made overlay stays behind."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(tmp_path / "b.raw"), "1M"], check=True)
    with pytest.raises(errors.Internal, match="not in qcow2 format"):
        overlay.create_overlay(tmp_path / "b.raw", "qcow2", tmp_path / "ov.qcow2", None)
    assert not (tmp_path / "ov.qcow2").exists()


@pytest.mark.parametrize("size", [None, 8 * MiB, 16 * MiB, 64 * MiB])
def test_known_base_size_gives_the_same_overlay_without_qemu_img_info(
        size: int | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CreateContainer passes the image store's virtual size: no ``qemu-img info`` of the base, same result
    (grown only when asked, never below the base)."""
    path = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    runs: list[list[str]] = []
    real = overlay._spawn

    def counting(args: list[str]) -> subprocess.Popen[str]:  # every qemu-img run starts here
        runs.append(args)
        return real(args)

    monkeypatch.setattr(overlay, "_spawn", counting)
    dest = tmp_path / "ov.qcow2"
    overlay.create_overlay(path, "qcow2", dest, size, base_size=16 * MiB)
    assert [a[0] for a in runs] == ["create"]
    monkeypatch.undo()
    assert overlay.virtual_size(dest) == max(size or 0, 16 * MiB)
    assert overlay.backing_file(dest) == str(path.absolute())


def test_a_started_overlay_is_complete_after_wait(tmp_path: Path) -> None:
    """CreateContainer starts qemu-img, builds the config drive meanwhile, then waits: the overlay is whole."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "b.qcow2"), "16M"], check=True)
    dest = tmp_path / "ov.qcow2"
    pending = overlay.start_overlay(tmp_path / "b.qcow2", "qcow2", dest, 32 * MiB, base_size=16 * MiB)
    pending.wait()
    assert overlay.virtual_size(dest) == 32 * MiB
    subprocess.run(["qemu-img", "check", "-q", str(dest)], check=True)


def test_a_failed_started_overlay_raises_at_wait_and_leaves_no_file(tmp_path: Path) -> None:
    # the store's record says the base exists; the file is gone (a bad record): qemu-img fails after the start
    dest = tmp_path / "ov.qcow2"
    pending = overlay.start_overlay(tmp_path / "gone.qcow2", "qcow2", dest, None, base_size=16 * MiB)
    with pytest.raises(errors.Internal, match="qemu-img create failed"):
        pending.wait()
    assert not dest.exists()


def test_an_abandoned_overlay_is_waited_for_without_raising(tmp_path: Path) -> None:
    """The config drive failed while qemu-img ran: the caller's error counts, qemu-img has finished when the
    caller's clean-up removes the container dir."""
    dest = tmp_path / "ov.qcow2"
    pending = overlay.start_overlay(tmp_path / "gone.qcow2", "qcow2", dest, None, base_size=16 * MiB)
    pending.abandon()
    assert pending._proc.returncode not in (None, 0)
    assert not dest.exists()
