"""Console RAW -> CRI log: whole and partial lines, long lines, subscribers, and a real writer process killed."""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.console_files import Files, wait_for
from virtlet.console import cri_format as cf
from virtlet.console.writer import FAILPOINT_AFTER_CRI_WRITE


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def test_full_lines_in_cri_format(files: Files) -> None:
    files.append(b"hello world\n\nsecond  line \n")
    w = files.writer()
    w.open()
    before = time.time_ns()
    w.flush()
    after = time.time_ns()
    ents = files.entries()
    assert [(e.stream, e.tag, e.text) for e in ents] == [
        ("stdout", "F", "hello world"), ("stdout", "F", ""), ("stdout", "F", "second  line ")]
    for e in ents:
        assert before - 1_000_000_000 <= cf.parse_rfc3339nano(e.ts) <= after + 1_000_000_000
        assert e.ts.endswith("Z")
    assert files.cri.read_bytes().splitlines()[1].endswith(b" stdout F ")
    w.stop()


def test_partial_line_written_as_p_then_rest_as_f(files: Files) -> None:
    w = files.writer()
    w.open()
    files.append(b"login: ")
    assert w.flush() == 0  # still waiting for the newline
    w.flush(partial=True)
    files.append(b"root\nnext")
    w.flush()
    assert [(e.tag, e.text) for e in files.entries()] == [("P", "login: "), ("F", "root")]
    w.stop()  # drains the unterminated tail as P
    assert [(e.tag, e.text) for e in files.entries()][-1] == ("P", "next")
    assert files.lines() == ["login: root", "next"]


def test_partial_line_flushed_after_delay(files: Files) -> None:
    w = files.writer(partial_delay=0.0)
    files.append(b"prompt> ")
    w.flush()
    assert [(e.tag, e.text) for e in files.entries()] == [("P", "prompt> ")]
    w.stop()


def test_crlf_stripped_and_cr_split_from_its_lf(files: Files) -> None:
    w = files.writer()
    files.append(b"boot\r\ndouble\r\r\nmid\rline\r\nend\r")
    w.flush(partial=True)
    files.append(b"\n")
    w.flush()
    assert files.lines() == ["boot", "double", "mid\rline", "end"]
    w.stop()


def test_invalid_utf8_kept_as_is(files: Files) -> None:
    w = files.writer()
    files.append(b"bad \xff\xfe bytes \xc3\n\xe2\x82")
    w.flush()
    files.append(b"\xac euro\n")
    w.flush()
    raw = files.cri.read_bytes()
    assert b" stdout F bad \xff\xfe bytes \xc3\n" in raw
    assert b" stdout F \xe2\x82\xac euro\n" in raw
    assert files.lines() == ["bad \udcff\udcfe bytes \udcc3", "\u20ac euro"]
    w.stop()


def test_long_lines_split_at_max_line(files: Files) -> None:
    w = files.writer(max_line=8)
    files.append(b"abcdefghijklmnopq\n" + b"x" * 20)
    w.flush()
    assert [(e.tag, e.text) for e in files.entries()] == [
        ("P", "abcdefgh"), ("P", "ijklmnop"), ("F", "q"), ("P", "x" * 8), ("P", "x" * 8)]
    w.stop()
    assert files.lines() == ["abcdefghijklmnopq", "x" * 20]


def test_subscribers_get_raw_bytes(files: Files) -> None:
    w = files.writer()
    got: list[bytes] = []
    token = w.subscribe(got.append)
    files.append(b"a\r\nb")
    w.flush()
    w.unsubscribe(token)
    files.append(b"c\n")
    w.flush()
    assert b"".join(got) == b"a\r\nb"
    w.stop()


def test_waits_for_raw_to_appear(files: Files) -> None:
    w = files.writer()
    assert w.flush() == 0
    files.append(b"late\n")
    w.flush()
    assert files.lines() == ["late"]
    w.stop()

# ------------------------------------------------------------------------------------------- real process


class _Child:
    """``python -m virtlet.console`` as a separate process we can SIGKILL."""

    def __init__(self, files: Files, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtlet.console", str(files.raw), str(files.cri), str(files.state),
             "--poll-interval", "0.02", "--no-fsync"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready and self.proc.stdout.readline() == b"ready\n", "console writer child did not start"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def term(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(30) == 0


@pytest.fixture
def children() -> Iterator[list[_Child]]:
    started: list[_Child] = []
    try:
        yield started
    finally:
        for c in started:
            c.kill()



def _reading_oldest(files: Files, backups: int) -> bool:
    oldest = files.raw.with_name(f"{files.raw.name}.{backups - 1}")
    try:
        return json.loads(files.state.read_text())["raw_inode"] == oldest.stat().st_ino
    except FileNotFoundError:
        return False


class _Guest:
    """A thread printing numbered lines to RAW in random pieces, rotating it like virtlogd, until stopped."""

    def __init__(self, files: Files, seed: int) -> None:
        self.files = files
        self.rng = random.Random(seed)
        self.expected: list[str] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rng, files = self.rng, self.files
        try:
            while not self._stop.is_set():
                line = f"line-{len(self.expected):05d} " + "x" * rng.randrange(0, 40)
                self.expected.append(line)
                data = line.encode() + (b"\r\n" if rng.random() < 0.5 else b"\n")
                while data:  # in pieces that cut lines anywhere, like a serial port
                    k = rng.randrange(1, 60)
                    files.append(data[:k])
                    data = data[k:]
                if files.raw.stat().st_size > 3000:
                    # a virtlogd limit the writer keeps up with: never overwrite the generation it is in
                    wait_for(lambda: not _reading_oldest(files, backups=4))
                    files.rotate(backups=4)
                time.sleep(0.001)
        except BaseException as exc:  # re-raised by stop()
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        if self.error is not None:
            raise self.error


def test_sigkill_of_a_real_writer_loses_and_repeats_nothing(files: Files, children: list[_Child]) -> None:
    files.raw.touch()
    guest = _Guest(files, seed=4)
    try:
        rng = random.Random(5)
        for _ in range(4):  # the guest keeps printing while virtletd is killed and restarted
            children.append(_Child(files))
            before = files.cri.stat().st_size
            wait_for(lambda b=before: files.cri.stat().st_size > b)  # busy tailing ...
            time.sleep(rng.uniform(0.0, 0.1))
            children[-1].kill()  # ... when killed
        # and once exactly inside the crash window: CRI bytes appended, state not yet written
        children.append(_Child(files, env={"VIRTLET_FAILPOINT": FAILPOINT_AFTER_CRI_WRITE}))
        recorded = json.loads(files.state.read_text())["cri_size"]
        wait_for(lambda: files.cri.stat().st_size > recorded)
        children[-1].kill()
        assert files.cri.stat().st_size > json.loads(files.state.read_text())["cri_size"]
        children.append(_Child(files))
        time.sleep(0.2)
    finally:
        guest.stop()
    children[-1].term()  # drains everything RAW holds
    assert files.raw.with_name(files.raw.name + ".3").exists()  # RAW was rotated more than it keeps
    assert len(guest.expected) > 200
    assert files.lines() == guest.expected
