"""Console attach: the hub shares one QEMU console connection between sessions; a real VM's console end to end."""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.console_files import wait_for
from virtlet import errors
from virtlet.console.attach import ConsoleHub, ConsoleSession
from virtlet.console.cri_format import parse_cri_log, read_cri_lines
from virtlet.console.writer import ConsoleLogWriter

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
        wait_for(lambda: not hub.connected)  # the console went away (the VM stopped)
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
        wait_for(lambda: read_cri_lines(w.cri_log_path)[-1:] == ["login: "], timeout=60)
        with hub.attach() as session:
            session.write(b"root\r")
            assert b"root" in _read_until(session, b"root")  # echoed by the guest, through the hub
        wait_for(lambda: read_cri_lines(w.cri_log_path)[-1:] == ["login: root"])
    finally:
        hub.close()
        w.stop()
    ents = parse_cri_log(w.cri_log_path.read_bytes())
    first, second = "hello from the boot sector", "second \udcff line"
    assert [(e.tag, e.text) for e in ents[:2]] == [("F", first), ("F", second)]
    assert {e.tag for e in ents[2:]} == {"P"}  # "login: " and "root\r" wait for a newline that never comes
    assert read_cri_lines(w.cri_log_path) == [first, second, "login: root"]
