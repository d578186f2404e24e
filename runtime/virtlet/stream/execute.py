"""The exec session of the remote-command protocol (``kubectl exec POD -- CMD``) for VM pods.

Why it is not interactive: commands run through the QEMU guest agent (``virtlet.vm.guest_agent``), which
takes all of stdin up front and hands back all output when the command has ended.  So the session reads the
client's stdin to its end first (``echo data | kubectl exec -i`` works; typing does not), runs the command,
writes its stdout and stderr, and ends with the Status that carries the exit code.  stdin's end is the
client's close of the stdin stream (SPDY) or v5's close-channel message (WebSocket); a v4 WebSocket client
cannot signal it, so there stdin is read until the connection ends.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from virtlet.stream.model import Backend, ExecRequest
from virtlet.stream.remotecommand import Outcome, Reader, Session, Writer
from virtlet.stream.spdy_conn import StreamClosed
from virtlet.vm.guest_agent import MAX_INPUT as MAX_STDIN

log = logging.getLogger(__name__)


def exec_session(backend: Backend, req: ExecRequest) -> Session:
    """The session for ``serve_spdy_session``/``serve_websocket_session``."""

    def session(read_stdin: Reader | None, write_stdout: Writer | None, write_stderr: Writer | None,
                gone: threading.Event) -> Outcome:
        return run_exec(backend, req, read_stdin, write_stdout, write_stderr, gone)

    return session


def run_exec(backend: Backend, req: ExecRequest, read_stdin: Reader | None, write_stdout: Writer | None,
             write_stderr: Writer | None, gone: threading.Event) -> Outcome:
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
