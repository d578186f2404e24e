"""The exec channel: interactive ``kubectl exec -it`` into a VM pod without any network in the guest.

Every domain gets a second virtio-serial port, ``cloud.virtlet.exec`` (``channel_device``), whose host side is a
unix socket QEMU listens on next to the console socket (``socket_path``).  In the guest, ``virtlet-exec-agent``
(``guest-images/lib/virtlet-exec-agent.c``, in the tiny image) serves it.  virtletd holds one connection per
VM (QEMU takes one client) and multiplexes up to ``MAX_SESSIONS`` commands over it.

Frames both ways: type (1 byte), session id (1 byte), payload length (2 bytes big-endian, at most ``MAX_PAYLOAD``),
payload.  host -> guest: HELLO, OPEN (flags: 1 tty, 2 stdin; rows, cols; argv NUL-separated, an empty string, env
NUL-separated), STDIN (empty = end of stdin), RESIZE (rows, cols), SIGNAL, CLOSE (kill the command; the agent
answers with its EXIT, and only then is the session id used again).  guest -> host: HELLO, STDOUT, STDERR, EXIT
(4-byte code, 128+N for signal N), ACK (stdin bytes the command took: the host never has more than ``STDIN_WINDOW``
unacknowledged, so the agent never blocks).

A guest without the agent never says HELLO: ``ExecChannel.ready`` stays False and exec falls back to the QEMU
guest agent (output at exit, no TTY).  Output is queued per session up to ``MAX_QUEUED`` bytes: a client that
does not read that much loses its session (the reader thread is shared by every session of the VM and never
waits for one client).
"""

from __future__ import annotations

import logging
import queue
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from virtlet import errors

log = logging.getLogger(__name__)

CHANNEL_NAME = "cloud.virtlet.exec"
MAX_SESSIONS = 16
MAX_PAYLOAD = 32768
STDIN_WINDOW = 65536
MAX_QUEUED = 4 << 20
MAX_OPEN = MAX_PAYLOAD  # argv + env of one command, encoded
HELLO, OPEN, STDIN, RESIZE, SIGNAL, CLOSE = 0, 1, 2, 3, 4, 5
G_HELLO, G_STDOUT, G_STDERR, G_EXIT, G_ACK = 0x80, 0x81, 0x82, 0x83, 0x84


def socket_path(console_socket: Path) -> Path:
    """Where QEMU listens for the exec channel of the VM whose console socket is ``console_socket``."""
    return console_socket.with_name(console_socket.name.removesuffix(".sock") + ".exec.sock")


def encode_open(argv: Sequence[str], *, tty: bool, stdin: bool, rows: int = 0, cols: int = 0,
                env: Sequence[str] = ()) -> bytes:
    """The OPEN payload; ``errors.InvalidArgument`` for a command the protocol cannot carry."""
    parts = [a.encode() for a in argv]
    if any(b"\0" in p for p in parts) or any("\0" in e for e in env):
        raise errors.InvalidArgument("Exec: cmd must not contain NUL bytes")
    body = b"".join(p + b"\0" for p in parts) + b"\0" + b"".join(e.encode() + b"\0" for e in env)
    if len(body) + 5 > MAX_OPEN:
        raise errors.InvalidArgument(f"Exec: cmd is longer than the {MAX_OPEN - 5} bytes an exec into a VM accepts")
    return bytes([int(tty) | 2 * int(stdin)]) + struct.pack(">HH", rows & 0xFFFF, cols & 0xFFFF) + body


@dataclass(frozen=True)
class Event:
    """What a session receives: ``kind`` 'stdout' / 'stderr' (``data``), 'exit' (``code``) or 'lost' (the
    channel or the client's queue failed: ``data`` says why)."""

    kind: str
    data: bytes = b""
    code: int = 0


class ExecSession:
    """One command in the guest.  ``events()`` yields its output and ends with its exit."""

    def __init__(self, channel: ExecChannel, sid: int) -> None:
        self._channel = channel
        self.sid = sid
        self.queue: queue.Queue[Event] = queue.Queue()
        self.queued = 0
        self._window = threading.Condition()
        self._unacked = 0
        self.done = False  # this side is finished with it (exit, lost, or closed)
        self.exited = False  # the guest said EXIT: no more frames for this id; only then is it reused
        self.closing = False

    def next_event(self, timeout: float) -> Event | None:
        try:
            event = self.queue.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._channel.lock:
            self.queued -= len(event.data)
        return event

    def write_stdin(self, data: bytes, alive: threading.Event | None = None) -> None:
        """Send stdin (waits while the guest has ``STDIN_WINDOW`` bytes not yet taken by the command)."""
        for i in range(0, len(data), MAX_PAYLOAD):
            chunk = data[i:i + MAX_PAYLOAD]
            with self._window:
                while self._unacked + len(chunk) > STDIN_WINDOW and not self.done:
                    if alive is not None and alive.is_set():
                        return
                    self._window.wait(0.5)
                if self.done:
                    return
                self._unacked += len(chunk)
            self._channel.send(STDIN, self.sid, chunk)

    def close_stdin(self) -> None:
        if not self.done:
            self._channel.send(STDIN, self.sid, b"")

    def resize(self, rows: int, cols: int) -> None:
        if not self.done and rows > 0 and cols > 0:
            self._channel.send(RESIZE, self.sid, struct.pack(">HH", min(rows, 0xFFFF), min(cols, 0xFFFF)))

    def close(self) -> None:
        """The client left: kill the command if it still runs, free the session id."""
        if not self.done:
            self._channel.send(CLOSE, self.sid, b"")
        self._channel.release(self.sid)

    def _acked(self, count: int) -> None:
        with self._window:
            self._unacked = max(0, self._unacked - count)
            self._window.notify_all()

    def _finish(self, event: Event) -> None:
        self.done = True
        self.queue.put(event)
        with self._window:
            self._window.notify_all()


class ExecChannel:
    """virtletd's connection to one VM's exec agent (connect with ``connect``; ``ready`` once it said HELLO)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._hello = threading.Event()
        self.closed = threading.Event()
        self._sessions: dict[int, ExecSession] = {}

    @property
    def ready(self) -> bool:
        return self._hello.is_set() and not self.closed.is_set()

    def connect(self, timeout: float = 5.0) -> None:
        """Connect to QEMU's socket and ask for HELLO (``errors.Unavailable`` when the VM has no such port)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise errors.Unavailable(f"the VM has no exec channel ({self.path.name}: {exc})") from exc
        sock.settimeout(None)
        self._sock = sock
        threading.Thread(target=self._read_loop, daemon=True, name=f"exec-channel-{self.path.name}").start()
        self.send(HELLO, 0, b"")

    def wait_ready(self, timeout: float) -> bool:
        return self._hello.wait(timeout) and not self.closed.is_set()

    def open(self, argv: Sequence[str], *, tty: bool, stdin: bool, rows: int = 0, cols: int = 0) -> ExecSession:
        payload = encode_open(argv, tty=tty, stdin=stdin, rows=rows, cols=cols)
        with self.lock:
            if not self.ready:
                raise errors.Unavailable("the VM's exec agent is not connected")
            free = [i for i in range(MAX_SESSIONS) if i not in self._sessions]
            if not free:
                raise errors.ResourceExhausted(
                    f"the VM already runs {MAX_SESSIONS} exec sessions; end one and try again")
            session = ExecSession(self, free[0])
            self._sessions[session.sid] = session
        self.send(OPEN, session.sid, payload)
        return session

    def send(self, kind: int, sid: int, payload: bytes) -> None:
        sock = self._sock
        if sock is None or self.closed.is_set():
            return
        try:
            with self._send_lock:
                sock.sendall(struct.pack(">BBH", kind, sid, len(payload)) + payload)
        except OSError as exc:
            self._lost(f"exec channel write failed: {exc}")

    def release(self, sid: int) -> None:
        """Free ``sid`` once the guest has said EXIT for it: until then frames of the old command may still be
        on their way, and must not reach a new session (the agent answers CLOSE with an EXIT)."""
        with self.lock:
            session = self._sessions.get(sid)
            if session is None:
                return
            if session.exited or self.closed.is_set():
                del self._sessions[sid]
            else:
                session.closing = True

    def close(self) -> None:
        self._lost("exec channel closed")
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _lost(self, why: str) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        with self.lock:
            sessions = list(self._sessions.values())
        for s in sessions:
            s._finish(Event("lost", why.encode()))

    def _read_exact(self, sock: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            data = sock.recv(n - len(buf))
            if not data:
                return None
            buf += data
        return bytes(buf)

    def _read_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            while True:
                head = self._read_exact(sock, 4)
                if head is None:
                    break
                kind, sid, size = struct.unpack(">BBH", head)
                if size > MAX_PAYLOAD:
                    log.warning("exec channel %s: a frame of %d bytes; closing", self.path, size)
                    break
                payload = self._read_exact(sock, size) if size else b""
                if payload is None:
                    break
                self._dispatch(kind, sid, payload)
        except OSError as exc:
            log.debug("exec channel %s: %s", self.path, exc)
        self._lost("the VM's exec channel closed (the VM stopped?)")

    def _dispatch(self, kind: int, sid: int, payload: bytes) -> None:
        if kind == G_HELLO:
            self._hello.set()
            return
        with self.lock:
            session = self._sessions.get(sid)
            if session is None:
                return
            if kind == G_EXIT:
                session.exited = True
                if session.closing:
                    del self._sessions[sid]
                    return
            if session.done:
                return
            if kind in (G_STDOUT, G_STDERR):
                session.queued += len(payload)
                if session.queued > MAX_QUEUED:
                    overflow = True
                else:
                    overflow = False
                    session.queue.put(Event("stdout" if kind == G_STDOUT else "stderr", payload))
        if kind in (G_STDOUT, G_STDERR):
            if overflow:
                session._finish(Event("lost", f"the client read none of {MAX_QUEUED} bytes of output".encode()))
                self.send(CLOSE, sid, b"")
        elif kind == G_EXIT and len(payload) == 4:
            session._finish(Event("exit", code=struct.unpack(">I", payload)[0] & 0xFF))
        elif kind == G_ACK and len(payload) == 4:
            session._acked(struct.unpack(">I", payload)[0])
