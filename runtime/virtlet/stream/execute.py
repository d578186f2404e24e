"""The exec session of the remote-command protocol (``kubectl exec [-it] POD -- CMD``) for VM pods.

Two paths:
- **The exec channel** (``virtlet.vm.exec_channel``: a virtio-serial port served by ``virtlet-exec-agent`` in the
  guest): output streams as it comes, stdin flows while the command runs, and with a TTY (``kubectl exec -it``)
  the command runs on a pty in the guest: resizes become TIOCSWINSZ, ^C is SIGINT by the pty.  The exit code
  ends the session as containerd's does (``NonZeroExitCode`` Status).
- **The QEMU guest agent** (``virtlet.vm.guest_agent``), for a guest without the exec agent: it takes all of
  stdin up front and hands back all output when the command has ended, so the session reads the client's stdin
  to its end first (``echo data | kubectl exec -i`` works; typing does not), runs the command, writes its output
  and ends with the Status.  A TTY is refused there, with what to use instead.
stdin's end is the client's close of the stdin stream (SPDY) or v5's close-channel message (WebSocket); a v4
WebSocket client cannot signal it, so there stdin is read until the connection ends.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from virtlet.stream.model import Backend, ExecRequest
from virtlet.stream.remotecommand import Outcome, Reader, Writer
from virtlet.stream.spdy_conn import StreamClosed
from virtlet.vm.exec_channel import ExecChannel, ExecSession
from virtlet.vm.guest_agent import MAX_INPUT as MAX_STDIN

log = logging.getLogger(__name__)

NO_AGENT_TTY = ("interactive exec with a terminal needs virtlet-exec-agent in the guest image (the tiny image "
                "has it; see docs/vm-pods.md), and this VM's agent did not answer; use `kubectl attach -it` for "
                "the console or `virtletctl ssh`")


class ExecRunner:
    """The session for ``serve_spdy_session``/``serve_websocket_session``; ``resize`` takes the client's
    terminal size (before or while the command runs)."""

    def __init__(self, backend: Backend, req: ExecRequest) -> None:
        self.backend = backend
        self.req = req
        self._lock = threading.Lock()
        self._size = (0, 0)  # rows, cols
        self._session: ExecSession | None = None

    def resize(self, width: int, height: int) -> None:
        with self._lock:
            self._size = (height, width)
            session = self._session
        if session is not None:
            session.resize(height, width)

    def __call__(self, read_stdin: Reader | None, write_stdout: Writer | None, write_stderr: Writer | None,
                 gone: threading.Event) -> Outcome:
        try:
            channel = self.backend.exec_channel(self.req.container_id, tty=self.req.tty, gone=gone)
        except Exception as exc:  # reported to the client on the error stream
            return Outcome(error=f"cannot exec in container {self.req.container_id}: {exc}")
        if channel is not None:
            return self._run_channel(channel, read_stdin, write_stdout, write_stderr, gone)
        if gone.is_set():
            return Outcome()
        if self.req.tty:
            return Outcome(error=NO_AGENT_TTY)
        return run_exec(self.backend, self.req, read_stdin, write_stdout, write_stderr, gone)

    def _run_channel(self, channel: ExecChannel, read_stdin: Reader | None, write_stdout: Writer | None,
                     write_stderr: Writer | None, gone: threading.Event) -> Outcome:
        req = self.req
        with self._lock:
            rows, cols = self._size
            try:
                session = channel.open(req.cmd, tty=req.tty, stdin=read_stdin is not None, rows=rows, cols=cols)
            except Exception as exc:
                return Outcome(error=f"cannot exec in container {req.container_id}: {exc}")
            self._session = session
        try:
            if read_stdin is not None:
                threading.Thread(target=_copy_stdin, args=(read_stdin, session, gone), daemon=True,
                                 name="exec-stdin").start()
            while not gone.is_set():
                event = session.next_event(0.5)
                if event is None:
                    continue
                if event.kind == "exit":
                    return Outcome(exit_code=event.code)
                if event.kind == "lost":
                    return Outcome(error=f"exec in container {req.container_id}: {event.data.decode()}")
                write = write_stdout if event.kind == "stdout" or req.tty else write_stderr
                if write is None:
                    continue
                try:
                    write(event.data)
                except (OSError, StreamClosed):
                    gone.set()
            return Outcome()
        finally:
            with self._lock:
                self._session = None
            session.close()


def _copy_stdin(read_stdin: Reader, session: ExecSession, gone: threading.Event) -> None:
    while not gone.is_set() and not session.done:
        try:
            data = read_stdin()
        except (OSError, StreamClosed):
            return
        if not data:
            session.close_stdin()
            return
        session.write_stdin(data, gone)


def exec_session(backend: Backend, req: ExecRequest) -> ExecRunner:
    return ExecRunner(backend, req)


def run_exec(backend: Backend, req: ExecRequest, read_stdin: Reader | None, write_stdout: Writer | None,
             write_stderr: Writer | None, gone: threading.Event) -> Outcome:
    """The guest-agent path: stdin up front, output at the end."""
    stdin: bytes | None = None
    if read_stdin is not None:
        chunks: list[bytes] = []
        size = 0
        while not gone.is_set():
            try:
                chunk = read_stdin()
            except (OSError, StreamClosed):
                break
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_STDIN:
                return Outcome(error=f"stdin is longer than the {MAX_STDIN} bytes an exec into a VM pod accepts")
            chunks.append(chunk)
        stdin = b"".join(chunks)
    if gone.is_set():
        return Outcome()
    try:
        result = backend.run_exec(req.container_id, req.cmd, stdin, lambda: not gone.is_set())
    except Exception as exc:  # reported to the client on the error stream
        log.info("exec %s in %s failed: %s", list(req.cmd), req.container_id, exc)
        return Outcome(error=f"cannot exec in container {req.container_id}: {exc}")
    for write, data in ((write_stdout, result.stdout), (write_stderr, result.stderr)):
        if write is not None and data:
            with contextlib.suppress(OSError, StreamClosed):
                write(data)
    return Outcome(exit_code=result.exit_code)
