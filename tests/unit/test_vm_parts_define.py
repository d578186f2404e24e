"""The real VmParts.prepare with a real qemu-img: the domain is defined while the overlay is being made, and a
refused definition still waits for qemu-img (nothing writes the container directory after the clean-up)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.node import Node, node
from virtlet import errors, procs
from virtlet.images.records import ImageRecord
from virtlet.vm.parts import VmParts


@pytest.fixture
def n(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    with node(tmp_path, monkeypatch) as world:
        yield world


def _base(tmp: Path) -> ImageRecord:
    path = tmp / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return ImageRecord(digest="sha256:" + "cd" * 32, names=("base",), size=path.stat().st_size, path=path,
                       format="qcow2", virtual_size=64 << 20, pulled_at=time.time())


def _qemu_img_children() -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-x", "qemu-img"], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def _prepare(n: Node, tmp_path: Path, cid: str, define: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The real parts' prepare for a container ``cid`` of a fresh sandbox (removed again), with ``define``."""
    parts = VmParts(None, None, "qemu", "/usr/bin/qemu-system-x86_64")  # type: ignore[arg-type]
    sid = n.run_sandbox()
    cdir = tmp_path / cid
    cdir.mkdir()
    try:
        return cdir, parts.prepare(cid, n.container_spec(sid), n.d.store.require_sandbox(sid), _base(tmp_path), cdir,
                                   tmp_path / f"{cid}.sock", define)
    finally:
        n.d.remove_sandbox(sid)


def test_define_runs_before_prepare_returns_with_the_overlay_done(n: Node, tmp_path: Path) -> None:
    defined: list[str] = []
    cdir, extra = _prepare(n, tmp_path, "c1", defined.append)
    assert len(defined) == 1 and "<domain" in defined[0] and str(cdir / "root.qcow2") in defined[0]
    info = subprocess.run(["qemu-img", "info", "-U", str(cdir / "root.qcow2")], capture_output=True, text=True,
                          check=True).stdout
    assert "backing file" in info and extra["root"] == str(cdir / "root.qcow2")


def test_a_refused_definition_waits_for_qemu_img(n: Node, tmp_path: Path) -> None:
    running: list[list[int]] = []

    def refuse(xml: str) -> None:
        running.append(_qemu_img_children())
        raise errors.Internal("libvirt refused the domain definition: XML error")

    with pytest.raises(errors.Internal, match="refused"):
        _prepare(n, tmp_path, "c2", refuse)
    assert running  # define was called; the qemu-img it may have overlapped was waited for and reaped:
    assert all(not procs.running(pid) for pid in running[0]) and _qemu_img_children() == []
