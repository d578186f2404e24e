"""Console RAW -> CRI log across rotations: virtlogd's RAW generations and the kubelet's CRI log renames."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers.console_files import Files, crash
from virtlet.console.cri_format import read_cri_lines


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


# ------------------------------------------------------------------------------------------- rotation


def test_raw_rotation_followed_and_line_spanning_it_whole(files: Files) -> None:
    w = files.writer()
    files.append(b"one\ntw")
    w.flush()
    files.append(b"o-")  # written to the old generation after our last read
    files.rotate()
    files.append(b"end\nthree\n")
    w.flush()
    assert files.lines() == ["one", "two-end", "three"]
    w.stop()


def test_several_rotations_between_polls(files: Files) -> None:
    w = files.writer()
    files.append(b"a\n")
    w.flush()
    for word in (b"b", b"c", b"d"):
        files.append(word + b"\n")
        files.rotate(backups=3)
    files.append(b"e\n")
    w.flush()
    assert files.lines() == ["a", "b", "c", "d", "e"]
    w.stop()


def test_restart_resumes_in_rotated_generation(files: Files) -> None:
    w = files.writer()
    files.append(b"a\nb")
    w.flush()  # "b" pending: the recorded position is inside the generation about to become RAW.0
    crash(w)
    files.rotate()
    files.append(b"c\nd\n")
    w2 = files.writer()
    w2.flush()
    assert files.lines() == ["a", "bc", "d"]
    w2.stop()


def test_raw_rotated_away_while_down_starts_at_oldest(files: Files) -> None:
    w = files.writer()
    files.append(b"a\n")
    w.flush()
    w.stop()
    for word in (b"b", b"c", b"d"):
        files.rotate(backups=2)  # the generation holding "a" is overwritten by the third rotation
        files.append(word + b"\n")
    w2 = files.writer()
    w2.flush()
    assert files.lines() == ["a", "b", "c", "d"]  # "a" was done: the oldest generation left is next
    w2.stop()


def test_reused_inode_number_not_trusted(files: Files) -> None:
    w = files.writer()
    files.append(b"first\n")
    w.flush()
    w.stop()
    doc = json.loads(files.state.read_text())
    doc["raw_head"] = b"other".hex()  # as if the inode now belonged to another file
    files.state.write_text(json.dumps(doc))
    files.append(b"second\n")
    w2 = files.writer()
    w2.flush()
    assert files.lines() == ["first", "first", "second"]  # re-read from the oldest start, not a random offset
    w2.stop()


def test_reopen_after_kubelet_renamed_the_log(files: Files) -> None:
    w = files.writer()
    files.append(b"1\n")
    w.flush()
    rotated = files.cri.with_name("0.log.20240101-000000")
    os.rename(files.cri, rotated)
    files.append(b"2\n")
    w.flush()  # until ReopenContainerLog, lines go to the renamed file (what the CRI expects)
    w.reopen()
    files.append(b"3\n")
    w.flush()
    assert read_cri_lines(rotated) == ["1", "2"]
    assert files.lines() == ["3"]
    assert json.loads(files.state.read_text())["cri_size"] == files.cri.stat().st_size
    w.stop()
    w2 = files.writer()  # a restart after reopen must not cut the new file
    files.append(b"4\n")
    w2.flush()
    assert files.lines() == ["3", "4"]
    w2.stop()
