"""The console writer's state file: exactly once across crashes in the write window, a corrupt state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers.console_files import Files, crash
from virtlet import errors, failpoints
from virtlet.console.cri_format import read_cri_lines
from virtlet.console.writer import FAILPOINT_AFTER_CRI_WRITE


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


# ------------------------------------------------------------------------------------------- exactly once


class _Crash(Exception):
    pass


class _Failpoint:
    """Raises ``_Crash`` between the CRI append and the state write while ``armed``."""

    armed = False

    def hit(self, name: str) -> None:
        if self.armed and name == FAILPOINT_AFTER_CRI_WRITE:
            raise _Crash


@pytest.fixture
def crash_point(monkeypatch: pytest.MonkeyPatch) -> _Failpoint:
    fp = _Failpoint()
    monkeypatch.setattr(failpoints, "hit", fp.hit)
    return fp


def test_crash_between_cri_write_and_state_write(files: Files, crash_point: _Failpoint) -> None:
    w = files.writer()
    files.append(b"a\nb\n")
    crash_point.armed = True
    with pytest.raises(_Crash):
        w.flush()
    assert b"stdout F b" in files.cri.read_bytes()  # written, but never recorded
    crash(w)
    crash_point.armed = False
    files.append(b"c\n")
    w2 = files.writer()
    w2.open()
    assert files.cri.read_bytes() == b""  # the unrecorded tail is cut ...
    w2.flush()
    assert files.lines() == ["a", "b", "c"]  # ... and produced again from RAW, once
    w2.stop()


def test_exactly_once_after_crashes(files: Files, crash_point: _Failpoint) -> None:
    w = files.writer()
    files.append(b"a\n")
    w.flush()
    files.append(b"b\nc")
    crash_point.armed = True
    with pytest.raises(_Crash):
        w.flush(partial=True)
    crash(w)
    crash_point.armed = False
    files.append(b"d\ne\n")
    w2 = files.writer()
    w2.flush()
    assert files.lines() == ["a", "b", "cd", "e"]
    w2.stop()


def test_crash_then_kubelet_rotation_while_down(files: Files, crash_point: _Failpoint) -> None:
    w = files.writer()
    files.append(b"a\n")
    w.flush()
    files.append(b"b\n")
    crash_point.armed = True
    with pytest.raises(_Crash):
        w.flush()
    crash(w)
    crash_point.armed = False
    rotated = files.cri.with_name("0.log.20240101-000000")
    os.rename(files.cri, rotated)  # the kubelet rotated the log while virtletd was down
    w2 = files.writer()
    w2.flush()
    assert read_cri_lines(rotated) == ["a"]  # the unrecorded "b" was cut from the old generation ...
    assert files.lines() == ["b"]  # ... and written once, to the new one
    w2.stop()


def test_corrupt_state_is_a_clear_error(files: Files) -> None:
    files.state.write_text("{not json")
    with pytest.raises(errors.Internal, match="remove it"):
        files.writer().open()
