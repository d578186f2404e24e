"""Console RAW -> CRI log (format, partial lines, rotation, exactly once after crashes), attach sessions."""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.vm import console_log as cl
from virtlet.vm.console_attach import ConsoleHub, ConsoleSession
from virtlet.vm.console_log import ConsoleLogWriter, parse_cri_log, read_cri_lines


class Files:
    """The three paths of one writer, in a tmp dir."""

    def __init__(self, root: Path) -> None:
        self.raw = root / "vcl-raw" / "console.raw"
        self.raw.parent.mkdir()
        self.cri = root / "vcl-pods" / "vm" / "0.log"
        self.state = root / "vcl-raw" / "console.state"

    def writer(self, **kw: object) -> ConsoleLogWriter:
        kw.setdefault("partial_delay", 3600.0)
        return ConsoleLogWriter(self.raw, self.cri, self.state, **kw)  # type: ignore[arg-type]

    def append(self, data: bytes, path: Path | None = None) -> None:
        with open(path or self.raw, "ab") as f:
            f.write(data)

    def rotate(self, backups: int = 3) -> None:
        """What virtlogd does at its size limit: RAW.i -> RAW.i+1, RAW -> RAW.0, then a fresh RAW."""
        def gen(i: int) -> Path:
            return self.raw if i < 0 else self.raw.with_name(f"{self.raw.name}.{i}")
        for i in range(backups - 1, -1, -1):
            if gen(i - 1).exists():
                os.rename(gen(i - 1), gen(i))
        self.raw.touch()

    def entries(self) -> list[cl.CriLogEntry]:
        return parse_cri_log(self.cri.read_bytes())

    def lines(self) -> list[str]:
        return read_cri_lines(self.cri)


@pytest.fixture
def files(tmp_path: Path) -> Files:
    return Files(tmp_path)


def _crash(w: ConsoleLogWriter) -> None:
    """Drop a writer like a SIGKILL would: close its fds, persist nothing."""
    w._close()


# ------------------------------------------------------------------------------------------- format


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
        assert before - 1_000_000_000 <= cl.parse_rfc3339nano(e.ts) <= after + 1_000_000_000
        assert e.ts.endswith("Z")
    assert files.cri.read_bytes().splitlines()[1].endswith(b" stdout F ")
    w.stop()


def test_rfc3339nano_format_and_parse() -> None:
    ns = 1_700_000_000_123_456_789
    assert cl.format_rfc3339nano(ns) == "2023-11-14T22:13:20.123456789Z"
    assert cl.format_rfc3339nano(1_700_000_000_120_000_000) == "2023-11-14T22:13:20.12Z"
    assert cl.format_rfc3339nano(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"
    for t in (ns, 1_700_000_000_120_000_000, 0, 1_700_000_000_000_000_000):
        assert cl.parse_rfc3339nano(cl.format_rfc3339nano(t)) == t
    assert cl.parse_rfc3339nano("2023-11-14T23:13:20.5+01:00") == 1_700_000_000_500_000_000
    with pytest.raises(ValueError):
        cl.parse_rfc3339nano("2023-11-14 22:13:20Z")


def test_parse_cri_log_rejects_garbage_and_joins_partials() -> None:
    text = ("2023-11-14T22:13:20Z stdout P ab\n2023-11-14T22:13:20Z stdout F c d\n"
            "2023-11-14T22:13:21Z stderr F \n")
    ents = parse_cri_log(text)
    assert ents[1] == cl.CriLogEntry("2023-11-14T22:13:20Z", "stdout", "F", "c d")
    assert cl.join_cri_entries(ents) == ["abc d", ""]
    with pytest.raises(ValueError, match="line 1"):
        parse_cri_log("just some text\n")


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
    _crash(w)
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


# ------------------------------------------------------------------------------------------- exactly once


class _Crash(Exception):
    pass


class _Failpoint:
    """Raises ``_Crash`` between the CRI append and the state write while ``armed``."""

    armed = False

    def hit(self, name: str) -> None:
        if self.armed and name == cl.FAILPOINT_AFTER_CRI_WRITE:
            raise _Crash


@pytest.fixture
def crash_point(monkeypatch: pytest.MonkeyPatch) -> _Failpoint:
    fp = _Failpoint()
    monkeypatch.setattr(cl.failpoints, "hit", fp.hit)
    return fp


def test_crash_between_cri_write_and_state_write(files: Files, crash_point: _Failpoint) -> None:
    w = files.writer()
    files.append(b"a\nb\n")
    crash_point.armed = True
    with pytest.raises(_Crash):
        w.flush()
    assert b"stdout F b" in files.cri.read_bytes()  # written, but never recorded
    _crash(w)
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
    _crash(w)
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
    _crash(w)
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


# ------------------------------------------------------------------------------------------- real process


class _Child:
    """``python -m virtlet.vm.console_log`` as a separate process we can SIGKILL."""

    def __init__(self, files: Files, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "virtlet.vm.console_log", str(files.raw), str(files.cri), str(files.state),
             "--poll-interval", "0.02", "--no-fsync"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        assert ready and self.proc.stdout.readline() == b"ready\n", "console_log child did not start"

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


def _wait_for(cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


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
                    _wait_for(lambda: not _reading_oldest(files, backups=4))
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
            _wait_for(lambda b=before: files.cri.stat().st_size > b)  # busy tailing ...
            time.sleep(rng.uniform(0.0, 0.1))
            children[-1].kill()  # ... when killed
        # and once exactly inside the crash window: CRI bytes appended, state not yet written
        children.append(_Child(files, env={"VIRTLET_FAILPOINT": cl.FAILPOINT_AFTER_CRI_WRITE}))
        recorded = json.loads(files.state.read_text())["cri_size"]
        _wait_for(lambda: files.cri.stat().st_size > recorded)
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


# ------------------------------------------------------------------------------------------- attach hub


class _FakeQemuConsole:
    """A unix socket server standing in for QEMU's serial socket: answers input in upper case."""

    def __init__(self, path: Path, then_send: bytes = b"", close_after: bool = False) -> None:
        self.path = path
        self.then_send = then_send
        self.close_after = close_after
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(str(path))
        self.srv.listen(1)
        self.conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self.conn, _ = self.srv.accept()
            while data := self.conn.recv(4096):
                self.conn.sendall(data.upper() + self.then_send)
                if self.close_after:
                    break
            self.conn.close()
        except OSError:
            pass

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.srv.close()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)


@pytest.fixture
def console_sock(tmp_path: Path) -> Iterator[Callable[..., _FakeQemuConsole]]:
    made: list[_FakeQemuConsole] = []

    def make(**kw: object) -> _FakeQemuConsole:
        made.append(_FakeQemuConsole(tmp_path / "console.sock", **kw))  # type: ignore[arg-type]
        return made[-1]

    try:
        yield make
    finally:
        for srv in made:
            srv.close()


def _read_until(session: ConsoleSession, want: bytes, timeout: float = 10.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout
    while want not in got:
        data = session.read(timeout=max(0.0, deadline - time.monotonic()))
        assert data, f"console ended or timed out waiting for {want!r}; got {got!r}"
        got += data
    return got


def test_hub_fans_out_output_and_forwards_input(console_sock: Callable[..., _FakeQemuConsole]) -> None:
    srv = console_sock()
    hub = ConsoleHub(srv.path)
    hub.start()
    try:
        with hub.attach() as one, hub.attach() as two:
            one.write(b"hi ")
            two.write(b"there")
            for s in (one, two):
                assert _read_until(s, b"HI THERE") == b"HI THERE"
        late = hub.attach()
        late.write(b"x")
        assert _read_until(late, b"X") == b"X"  # sees output from its attach on, not before
    finally:
        hub.close()
    assert late.read(timeout=1) == b""


def test_hub_slow_session_drops_oldest_and_sees_eof(console_sock: Callable[..., _FakeQemuConsole]) -> None:
    srv = console_sock(then_send=b"0123456789abcdef", close_after=True)
    hub = ConsoleHub(srv.path, session_buffer=8)
    hub.start()
    try:
        s = hub.attach()
        s.write(b"q")
        _wait_for(lambda: not hub.connected)  # the console went away (the VM stopped)
        assert s.read(timeout=1) == b"89abcdef"
        assert s.dropped == 9
        assert s.read(timeout=1) == b""
        with pytest.raises(errors.FailedPrecondition, match="not running"):
            s.write(b"more")
    finally:
        hub.close()


def test_hub_start_without_console_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(errors.Unavailable, match="is the VM running"):
        ConsoleHub(tmp_path / "missing.sock").start(timeout=0.3)


# ------------------------------------------------------------------------------------------- real QEMU


def _boot_sector(banner: bytes) -> bytes:
    """A 512-byte x86 boot sector: prints ``banner`` on COM1, then echoes input by interrupt (no busy loop).

    Hand-assembled real-mode code: install an IRQ4 (int 0x0C) handler, print, enable the UART's receive
    interrupt and IRQ4 at the PIC, then ``hlt`` forever; the handler echoes every received byte.
    """
    def build(handler: int, msg: int) -> tuple[bytes, int]:
        w = lambda v: v.to_bytes(2, "little")  # noqa: E731
        code = bytes.fromhex("FA31C08ED88ED0BC007C")  # cli; ds = ss = 0; sp = 0x7c00
        code += bytes.fromhex("C7063000") + w(handler) + bytes.fromhex("C70632000000")  # IVT[0x0C] = handler
        code += b"\xBE" + w(msg) + bytes.fromhex("BAF803AC84C07403EEEBF8")  # print the NUL-terminated banner
        code += bytes.fromhex("BAF903B001EE" "BAFC03B00BEE" "E42124EFE621" "FB" "F4EBFD")  # IER MCR PIC; hlt
        at = len(code)  # handler: while LSR.DR: out(in(RBR)); EOI; iret
        code += bytes.fromhex("5052" "BAFD03ECA8017407BAF803ECEEEBF1" "B020E620" "5A58CF")
        return code, at

    code, at = build(0, 0)
    code, _ = build(0x7C00 + at, 0x7C00 + len(code))
    sector = code + banner + b"\0"
    assert len(sector) <= 510
    return sector.ljust(510, b"\0") + b"\x55\xaa"


def _domain_xml(name: str, d: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>16</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='fd'/></os>
  <devices>
    <disk type='file' device='floppy'>
      <driver name='qemu' type='raw'/><source file='{d}/boot.img'/><target dev='fda' bus='fdc'/><readonly/>
    </disk>
    <serial type='unix'>
      <source mode='bind' path='{d}/console.sock'/><log file='{d}/console.raw' append='on'/><target port='0'/>
    </serial>
  </devices>
</domain>"""


@pytest.fixture
def echo_vm() -> Iterator[Path]:
    """A running TCG domain whose serial console libvirt logs (virtlogd) to ``<dir>/console.raw``."""
    libvirt = pytest.importorskip("libvirt")
    try:
        conn = libvirt.open("qemu:///system")
    except libvirt.libvirtError as exc:
        pytest.skip(f"no libvirtd: {exc}")
    d = Path(tempfile.mkdtemp(prefix="vcl-test-", dir="/var/tmp"))
    d.chmod(0o777)  # QEMU runs as another user and creates the console socket here
    dom = None
    try:
        (d / "boot.img").write_bytes(_boot_sector(BANNER).ljust(1474560, b"\0"))
        dom = conn.createXML(_domain_xml(d.name, d), 0)
        yield d
    finally:
        if dom is not None:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
        conn.close()
        shutil.rmtree(d, ignore_errors=True)


BANNER = b"hello from the boot sector\r\nsecond \xff line\r\nlogin: "


@pytest.mark.libvirt
def test_real_vm_console_reaches_cri_log_and_attach(echo_vm: Path) -> None:
    w = ConsoleLogWriter(echo_vm / "console.raw", echo_vm / "pod" / "0.log", echo_vm / "console.state",
                         partial_delay=0.2)
    hub = ConsoleHub(echo_vm / "console.sock")
    w.start()
    try:
        hub.start(timeout=60)
        _wait_for(lambda: read_cri_lines(w.cri_log_path)[-1:] == ["login: "], timeout=60)
        with hub.attach() as session:
            session.write(b"root\r")
            assert b"root" in _read_until(session, b"root")  # echoed by the guest, through the hub
        _wait_for(lambda: read_cri_lines(w.cri_log_path)[-1:] == ["login: root"])
    finally:
        hub.close()
        w.stop()
    ents = parse_cri_log(w.cri_log_path.read_bytes())
    first, second = "hello from the boot sector", "second \udcff line"
    assert [(e.tag, e.text) for e in ents[:2]] == [("F", first), ("F", second)]
    assert {e.tag for e in ents[2:]} == {"P"}  # "login: " and "root\r" wait for a newline that never comes
    assert read_cri_lines(w.cri_log_path) == [first, second, "login: root"]
