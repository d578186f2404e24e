"""The seed ISO written by pycdlib, read back by pycdlib (all three name spaces) and labelled for blkid."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pycdlib
import pytest

from tests.unit.test_cloudinit_cases import CASES
from virtlet import errors
from virtlet.cloudinit import SeedFiles, build_seed_iso, render, write_iso


def _read(iso: pycdlib.PyCdlib, **path: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue()


@pytest.mark.parametrize(("case", "label"), [("merged_user_data", "cidata"), ("configdrive", "config-2")])
def test_iso_round_trip(tmp_path: Path, case: str, label: str) -> None:
    dest = tmp_path / "sub" / "seed.iso"
    seed = build_seed_iso(CASES[case], dest)
    assert seed.volume_label == label
    iso = pycdlib.PyCdlib()
    iso.open(str(dest))
    try:
        assert iso.pvd.volume_identifier.decode().strip() == label
        assert iso.has_rock_ridge() and iso.has_joliet()
        for rel, data in seed.files.items():
            assert _read(iso, rr_path="/" + rel) == data
            assert _read(iso, joliet_path="/" + rel) == data
        names = [rec.rock_ridge.name().decode() for _, rec in _children(iso, "/") if rec.rock_ridge]
        assert sorted(n for n in names if n not in (".", "..")) == sorted(
            {r.split("/")[0] for r in seed.files}
        )
    finally:
        iso.close()
    assert [p.name for p in dest.parent.iterdir()] == ["seed.iso"]  # no temp file left behind


def _children(iso: pycdlib.PyCdlib, path: str) -> list[tuple[str, object]]:
    return [(path, rec) for rec in iso.list_children(rr_path=path)]


@pytest.mark.skipif(shutil.which("blkid") is None, reason="needs blkid (util-linux)")
def test_blkid_sees_the_label(tmp_path: Path) -> None:
    """cloud-init and the tiny image find the seed with blkid by label: check with the real tool."""
    for case, label in (("plain", "cidata"), ("configdrive", "config-2")):
        dest = tmp_path / f"{case}.iso"
        write_iso(render(CASES[case]), dest)
        out = subprocess.run(
            ["blkid", "-p", "-o", "export", str(dest)], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        assert f"LABEL={label}" in out.splitlines() and "TYPE=iso9660" in out.splitlines()


def test_rewrite_replaces_existing_iso(tmp_path: Path) -> None:
    dest = tmp_path / "seed.iso"
    dest.write_bytes(b"old")
    write_iso(render(CASES["plain"]), dest)
    assert dest.stat().st_size > 2048 * 16


def test_path_escaping_the_seed_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.Internal):
        write_iso(SeedFiles(kind="nocloud", volume_label="cidata", files={"../x": b""}), tmp_path / "s.iso")
    assert list(tmp_path.iterdir()) == []


def test_iso_is_private_whatever_the_umask(tmp_path: Path) -> None:
    """The seed holds user-data and the pod's environment: owner-only, also while being written."""
    import os

    old = os.umask(0)
    try:
        write_iso(render(CASES["plain"]), tmp_path / "seed.iso")
    finally:
        os.umask(old)
    assert (tmp_path / "seed.iso").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]


def test_iso_size_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from virtlet.cloudinit import iso as isomod

    monkeypatch.setattr(isomod, "MAX_ISO_BYTES", 100 * 1024)
    files = SeedFiles(kind="nocloud", volume_label="cidata", files={"user-data": b"x" * (200 * 1024)})
    with pytest.raises(errors.InvalidArgument, match="seed ISO would be .* bytes, more than the 102400"):
        write_iso(files, tmp_path / "seed.iso")
    assert list(tmp_path.iterdir()) == []
