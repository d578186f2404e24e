"""Console log writers wake on inotify events: real inotify, real files, no polling to hide behind.

Every writer here that should be woken by inotify has a poll interval of an hour, so a line that shows up in
its CRI log got there because an event woke the writer (or, for partial lines, because its delay ended).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.console_files import Files, wait_for
from virtlet.console import watch, writer
from virtlet.console.cri_format import parse_cri_log

HOUR = 3600.0


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


@pytest.fixture
def own_watcher(monkeypatch: pytest.MonkeyPatch) -> Iterator[watch.RawWatcher]:
    """A watcher of this test's own (its inotify instance and thread end with the test)."""
    w = watch.RawWatcher()
    monkeypatch.setattr(writer, "watcher", lambda: w)
    yield w
    w.close()


def _inotify_fds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass
    return n


def test_a_line_is_written_when_virtlogd_writes_it(files: Files, own_watcher: watch.RawWatcher) -> None:
    files.raw.touch()
    w = files.writer(poll_interval=HOUR)
    w.start()
    try:
        files.append(b"first\n")
        wait_for(lambda: files.cri.exists() and files.lines() == ["first"])
        files.append(b"second\n")
        wait_for(lambda: files.lines() == ["first", "second"])
    finally:
        w.stop()
    assert own_watcher.watched_dirs() == 0


def test_raw_appearing_and_rotating_wakes_the_writer(files: Files, own_watcher: watch.RawWatcher) -> None:
    w = files.writer(poll_interval=HOUR)
    w.start()  # before virtlogd made RAW
    try:
        files.append(b"boot\n")  # RAW created
        wait_for(lambda: files.cri.exists() and files.lines() == ["boot"])
        files.append(b"old gen")
        files.rotate()  # virtlogd renames RAW away and starts a fresh one ...
        files.append(b"eration\nnew\n")  # ... where the line goes on
        wait_for(lambda: files.lines() == ["boot", "old generation", "new"])
    finally:
        w.stop()


def test_a_partial_line_is_written_when_its_delay_ends_without_another_event(
        files: Files, own_watcher: watch.RawWatcher) -> None:
    files.raw.touch()
    w = files.writer(poll_interval=HOUR, partial_delay=0.3)
    w.start()
    try:
        files.append(b"login: ")
        wait_for(lambda: files.cri.exists() and [(e.tag, e.text) for e in files.entries()] == [("P", "login: ")])
    finally:
        w.stop()


def test_other_files_in_the_directory_wake_nobody(tmp_path: Path, own_watcher: watch.RawWatcher) -> None:
    (tmp_path / "pod").mkdir()
    (tmp_path / "sentinel").mkdir()
    raw = tmp_path / "pod" / "console.raw"
    woken: list[str] = []
    sentinel = threading.Event()
    assert own_watcher.watch(raw, lambda: woken.append("raw")) is not None
    assert own_watcher.watch(tmp_path / "sentinel" / "s", sentinel.set) is not None
    for name in ("console-log.state", "console.rawx", "console.raw.tmp", "console.raw.", "other"):
        (tmp_path / "pod" / name).write_bytes(b"x")
    (tmp_path / "sentinel" / "s").write_bytes(b"x")  # one queue: once this is seen, so were the writes above
    assert sentinel.wait(10)
    assert woken == []
    (tmp_path / "pod" / "console.raw.0").write_bytes(b"x")  # a RAW generation
    wait_for(lambda: woken)
    woken.clear()
    raw.write_bytes(b"x")
    wait_for(lambda: woken)


def test_many_writers_share_one_inotify_instance(tmp_path: Path, own_watcher: watch.RawWatcher) -> None:
    before = _inotify_fds()
    writers = []
    for i in range(20):
        (tmp_path / f"pod{i}").mkdir()
        f = Files(tmp_path / f"pod{i}")
        writers.append((f, f.writer(poll_interval=HOUR)))
    try:
        for _, w in writers:
            w.start()
        assert _inotify_fds() == before + 1  # fs.inotify.max_user_instances is 128 for every program of root
        assert own_watcher.watched_dirs() == 20
        for i, (f, _) in enumerate(writers):
            f.append(f"pod {i}\n".encode())
        for i, (f, _) in enumerate(writers):
            wait_for(lambda f=f, i=i: f.cri.exists() and f.lines() == [f"pod {i}"])
    finally:
        for _, w in writers:
            w.stop()
    assert own_watcher.watched_dirs() == 0


def test_without_inotify_the_writer_polls(files: Files, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_instances() -> None:
        raise OSError(24, "Too many open files")  # what inotify_init1 says past max_user_instances

    broken = watch.RawWatcher()
    monkeypatch.setattr(watch, "INotify", no_instances)
    monkeypatch.setattr(writer, "watcher", lambda: broken)
    files.raw.touch()
    w = files.writer(poll_interval=0.05)
    w.start()
    try:
        assert broken.watched_dirs() == 0
        files.append(b"polled\n")
        wait_for(lambda: files.cri.exists() and files.lines() == ["polled"])
    finally:
        w.stop()


def test_a_directory_that_cannot_be_watched_is_polled(tmp_path: Path, own_watcher: watch.RawWatcher) -> None:
    raw = tmp_path / "not-yet" / "console.raw"  # inotify_add_watch fails: no such directory
    cri = tmp_path / "pods" / "0.log"
    w = writer.ConsoleLogWriter(raw, cri, tmp_path / "state", poll_interval=0.05)
    w.start()
    try:
        assert own_watcher.watched_dirs() == 0
        raw.parent.mkdir()
        raw.write_bytes(b"found by polling\n")
        wait_for(lambda: cri.exists() and [e.text for e in parse_cri_log(cri.read_bytes())] == ["found by polling"])
    finally:
        w.stop()


def test_a_closed_watcher_leaves_new_writers_polling(files: Files) -> None:
    w = watch.RawWatcher()
    assert w.watch(files.raw, lambda: None) is not None
    w.close()
    wait_for(lambda: w._inotify is None)
    assert w.watch(files.raw, lambda: None) is None
