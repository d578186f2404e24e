"""Attach sessions on a VM's serial console: one connection to QEMU, many ``kubectl attach`` clients.

Why a hub: QEMU's ``<serial type='unix'>`` socket serves one client at a time, but several ``kubectl attach``
sessions may watch the same VM.  The hub holds the one connection, copies every byte the guest prints to each
session, and sends each session's input to the guest.  A slow session never stalls the guest or the other
sessions: past its buffer limit its oldest bytes are dropped (and counted).  The CRI log does not depend on
the hub at all: virtlogd records the console to RAW whether or not anyone is attached (see ``virtlet.console.writer``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from pathlib import Path

from virtlet import errors

log = logging.getLogger(__name__)

#: Bytes a session may hold unread before its oldest bytes are dropped.
SESSION_BUFFER = 1024 * 1024
_RECV = 64 * 1024


class ConsoleSession:
    """One attach client: ``read()`` the guest's output, ``write()`` keystrokes, ``close()`` when done."""

    def __init__(self, hub: ConsoleHub, limit: int) -> None:
        self._hub = hub
        self._limit = limit
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self.dropped = 0  # bytes lost because this session read too slowly

    def _feed(self, data: bytes) -> None:
        with self._cond:
            self._chunks.append(data)
            self._size += len(data)
            while self._size > self._limit:  # drop the oldest bytes, keep the newest ``limit``
                excess = self._size - self._limit
                old = self._chunks[0]
                if len(old) <= excess:
                    self._chunks.popleft()
                    cut = len(old)
                else:
                    self._chunks[0] = old[excess:]
                    cut = excess
                self._size -= cut
                self.dropped += cut
            self._cond.notify_all()

    def _end(self) -> None:
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def read(self, timeout: float | None = None) -> bytes | None:
        """Everything buffered (at least one byte); ``b""`` once the console is gone, ``None`` on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._chunks or self._eof, timeout):
                return None
            if not self._chunks:
                return b""
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._size = 0
            return data

    def write(self, data: bytes) -> None:
        """Send input to the guest's serial port."""
        self._hub.send(data)

    def close(self) -> None:
        self._hub._remove(self)
        self._end()

    def __enter__(self) -> ConsoleSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ConsoleHub:
    """The one connection to a VM's console socket, fanned out to sessions."""

    def __init__(self, socket_path: Path, *, session_buffer: int = SESSION_BUFFER) -> None:
        self.socket_path = Path(socket_path)
        self.session_buffer = session_buffer
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sessions: list[ConsoleSession] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._sock is not None and not self._closed

    def start(self, timeout: float = 10.0) -> None:
        """Connect (QEMU creates the socket when the domain starts, so retry until ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.socket_path))
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if time.monotonic() >= deadline:
                    raise errors.Unavailable(f"VM console {self.socket_path} does not answer ({exc}); "
                                             "is the VM running?") from exc
                time.sleep(0.1)
        self._sock = sock
        self._thread = threading.Thread(target=self._pump, name=f"console-hub:{self.socket_path.name}",
                                        daemon=True)
        self._thread.start()

    def attach(self) -> ConsoleSession:
        """A new session that sees the output from now on."""
        session = ConsoleSession(self, self.session_buffer)
        with self._lock:
            if self._closed:
                session._end()
            else:
                self._sessions.append(session)
        return session

    def send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None or self._closed:
            raise errors.FailedPrecondition(f"VM console {self.socket_path} is not connected "
                                            "(the VM is not running)")
        with self._send_lock:
            try:
                sock.sendall(data)
            except OSError as exc:
                raise errors.Unavailable(f"VM console {self.socket_path} closed: {exc}") from exc

    def close(self) -> None:
        """Disconnect and end every session (they read ``b""``)."""
        with self._lock:
            self._closed = True
            sessions, self._sessions = self._sessions, []
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()
        for s in sessions:
            s._end()

    def _remove(self, session: ConsoleSession) -> None:
        with self._lock:
            with contextlib.suppress(ValueError):
                self._sessions.remove(session)

    def _pump(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(_RECV)
            except OSError:
                data = b""
            if not data:
                break
            with self._lock:
                sessions = list(self._sessions)
            for s in sessions:
                s._feed(data)
        log.info("VM console %s closed", self.socket_path)
        with self._lock:
            self._closed = True
            sessions, self._sessions = self._sessions, []
        for s in sessions:
            s._end()
