"""The Kubernetes remote-command protocol for ``attach`` and ``exec``, over SPDY streams or WebSocket channels.

The transport code (stream set-up, the stdin/stdout/stderr/error plumbing, the final Status) is shared; what
differs is the session: ``run_attach`` (below) or ``run_exec`` (``virtlet.stream.execute``), both called as
``session(read_stdin, write_stdout, write_stderr, gone) -> Outcome``.

Attach copies the VM's serial console: guest output to stdout, stdin to the guest.  A TTY resize is accepted
and ignored (a serial console has no window size); an exec session takes resizes (``on_resize``).  The
session ends when the console ends (the VM stopped or
virtletd lost the console: a Success status is sent on the error stream/channel), when the console cannot be
opened (a Failure status), or when the client goes away (nothing more can be sent).  The client's stdin EOF
does not end the session: ``echo cmd | kubectl attach -i`` must still see the output.

Status on the error stream: v4/v5 send a JSON ``metav1.Status`` (a non-zero exit of an exec as reason
``NonZeroExitCode`` with an ``ExitCode`` cause, which ``kubectl exec`` turns into its own exit code); older
versions send only failures, as text.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtlet.stream.limits import DEFAULT, Limits
from virtlet.stream.model import AttachRequest, Backend, ConsoleSessionLike
from virtlet.stream.spdy_conn import SpdyConnection, SpdyStream, StreamClosed
from virtlet.stream.websocket import CLOSE_CHANNEL, ChannelSocket

log = logging.getLogger(__name__)

# SPDY subprotocols (X-Stream-Protocol-Version), in the server's order of preference
SPDY_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
                  "channel.k8s.io")
# WebSocket subprotocols (Sec-WebSocket-Protocol); "" = the client named none (binary, v1 status)
WS_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io", "channel.k8s.io",
                "base64.channel.k8s.io")
STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
STREAM_CREATION_TIMEOUT = 30.0


@dataclass(frozen=True)
class Outcome:
    """How a session ended: ``error`` (a failure to report), else ``exit_code`` (non-zero: the command failed)."""

    error: str | None = None
    exit_code: int = 0


Reader = Callable[[], bytes]
Writer = Callable[[bytes], None]
Session = Callable[[Reader | None, Writer | None, Writer | None, threading.Event], Outcome]
OnResize = Callable[[int, int], None]  # width, height
MAX_RESIZE_MESSAGE = 4096


def parse_sizes(buf: bytes, on_resize: OnResize) -> bytes:
    """Call ``on_resize`` for each complete ``{"Width":W,"Height":H}`` in ``buf``; returns the unparsed rest
    (dropped when longer than ``MAX_RESIZE_MESSAGE``: a client's garbage never grows without bound)."""
    decoder = json.JSONDecoder()
    text = buf.decode("utf-8", "replace")
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return b""
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError:
            rest = text[pos:].encode()
            return b"" if len(rest) > MAX_RESIZE_MESSAGE else rest
        if isinstance(obj, dict):
            width, height = obj.get("Width"), obj.get("Height")
            if isinstance(width, int) and isinstance(height, int) and 0 < width < 65536 and 0 < height < 65536:
                on_resize(width, height)


def json_status(error: str | None, exit_code: int = 0) -> bytes:
    """The v4 ``metav1.Status`` for a session's end."""
    if error is not None:
        return json.dumps({"metadata": {}, "status": "Failure", "message": error, "reason": "InternalError",
                           "details": {"causes": [{"message": error}]}, "code": 500}).encode()
    if exit_code:
        return json.dumps({"metadata": {}, "status": "Failure",
                           "message": f"command terminated with non-zero exit code: exit status {exit_code}",
                           "reason": "NonZeroExitCode",
                           "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]}}).encode()
    return json.dumps({"metadata": {}, "status": "Success"}).encode()


def status_bytes(protocol: str, error: str | None, exit_code: int = 0) -> bytes:
    if protocol.startswith(("v4.", "v5.")):
        return json_status(error, exit_code)
    if error:
        return error.encode()
    return f"command terminated with non-zero exit code: exit status {exit_code}".encode() if exit_code else b""


def normalize(req: AttachRequest) -> AttachRequest:
    """A TTY has no separate stderr (as in Kubernetes)."""
    if req.tty and req.stderr:
        return AttachRequest(req.container_id, req.stdin, req.stdout, False, req.tty)
    return req


def run_attach(backend: Backend, req: AttachRequest, read_stdin: Callable[[], bytes] | None,
               write_stdout: Callable[[bytes], None] | None, gone: threading.Event) -> str | None:
    """Copy between the console and the client until one ends.  Returns the failure to report, or ``None``
    (console ended normally, or the client left)."""
    try:
        console: ConsoleSessionLike = backend.open_console(req.container_id)
    except Exception as exc:  # reported to the client on the error stream
        return f"cannot attach to container {req.container_id}: {exc}"
    try:
        if read_stdin is not None:
            threading.Thread(target=_copy_stdin, args=(read_stdin, console, gone), daemon=True,
                             name="attach-stdin").start()
        while not gone.is_set():
            data = console.read(0.5)
            if data is None:
                continue
            if data == b"":
                log.info("attach to %s: the console ended", req.container_id)
                return None
            if write_stdout is not None:
                try:
                    write_stdout(data)
                except (OSError, StreamClosed):
                    gone.set()
        return None
    finally:
        console.close()


def _copy_stdin(read_stdin: Callable[[], bytes], console: ConsoleSessionLike, gone: threading.Event) -> None:
    while not gone.is_set():
        try:
            data = read_stdin()
        except (OSError, StreamClosed):
            return
        if not data:
            return  # stdin EOF: stop reading, keep showing output
        try:
            console.write(data)
        except Exception as exc:
            log.info("attach: console write failed: %s", exc)
            return


# -- SPDY -----------------------------------------------------------------------------------------------------
def serve_spdy(sock: socket.socket, initial: bytes, protocol: str, req: AttachRequest, backend: Backend,
               creation_timeout: float = STREAM_CREATION_TIMEOUT, *, limits: Limits = DEFAULT) -> None:
    """Serve one attach over an upgraded SPDY connection (the 101 was already sent)."""
    req = normalize(req)
    serve_spdy_session(sock, initial, protocol, _flags(req), f"attach {req.container_id}",
                       _attach_session(backend, req), creation_timeout, limits=limits)


def serve_spdy_session(sock: socket.socket, initial: bytes, protocol: str, flags: tuple[bool, bool, bool, bool],
                       label: str, session: Session, creation_timeout: float = STREAM_CREATION_TIMEOUT, *,
                       limits: Limits = DEFAULT, on_resize: OnResize | None = None) -> None:
    """Wait for the client's streams (``flags`` = stdin, stdout, stderr, tty), run ``session``, send the Status."""
    stdin_on, stdout_on, stderr_on, tty = flags
    arrived: queue.Queue[SpdyStream] = queue.Queue(maxsize=16)  # more than the 5 a session uses are refused
    conn = SpdyConnection(sock, server=True, on_stream=lambda s: _offer(arrived, s), initial=initial,
                          limits=limits).start()
    resize_ok = protocol not in ("", "channel.k8s.io", "v2.channel.k8s.io")
    expected = 1 + stdin_on + stdout_on + stderr_on + (tty and resize_ok)
    streams: dict[str, SpdyStream] = {}
    deadline = time.monotonic() + creation_timeout
    try:
        while len(streams) < expected:
            try:
                stream = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                log.info("%s: client did not create its streams in time", label)
                return
            kind = stream.header("streamtype")
            if kind not in ("error", "stdin", "stdout", "stderr", "resize") or kind in streams:
                stream.abort()
                continue
            if kind == "resize":
                if on_resize is None:
                    stream.discard = True  # sizes are accepted and ignored
                else:
                    threading.Thread(target=_read_sizes, args=(stream, on_resize), daemon=True,
                                     name="remotecommand-resize").start()
            streams[kind] = stream
        gone = threading.Event()

        def watch_close() -> None:
            conn.closed.wait()
            gone.set()

        threading.Thread(target=watch_close, daemon=True).start()
        stdin, stdout, stderr = streams.get("stdin"), streams.get("stdout"), streams.get("stderr")
        outcome = session(_stream_reader(stdin) if stdin else None, stdout.write if stdout else None,
                          stderr.write if stderr else None, gone)
        if not conn.closed.is_set():
            data = status_bytes(protocol, outcome.error, outcome.exit_code)
            with contextlib.suppress(StreamClosed, OSError):
                if data:
                    streams["error"].write(data)
    finally:
        for s in streams.values():
            s.close()
        conn.close()


def _read_sizes(stream: SpdyStream, on_resize: OnResize) -> None:
    buf = b""
    while True:
        data = stream.read(1.0)
        if data is None:
            continue
        if not data:
            return
        buf = parse_sizes(buf + data, on_resize)


def _offer(arrived: queue.Queue[SpdyStream], stream: SpdyStream) -> None:
    try:
        arrived.put_nowait(stream)
    except queue.Full:
        stream.abort()


def _flags(req: Any) -> tuple[bool, bool, bool, bool]:
    return bool(req.stdin), bool(req.stdout), bool(req.stderr), bool(req.tty)


def _attach_session(backend: Backend, req: AttachRequest) -> Session:
    def session(read_stdin: Reader | None, write_stdout: Writer | None, _write_stderr: Writer | None,
                gone: threading.Event) -> Outcome:
        return Outcome(error=run_attach(backend, req, read_stdin, write_stdout, gone))
    return session


def _stream_reader(stream: SpdyStream) -> Callable[[], bytes]:
    def read() -> bytes:
        while True:
            data = stream.read(1.0)
            if data is not None:
                return data
    return read


# -- WebSocket ----------------------------------------------------------------------------------------------
def serve_websocket(ws: ChannelSocket, req: AttachRequest, backend: Backend) -> None:
    """Serve one attach over an upgraded WebSocket (the 101 was already sent)."""
    req = normalize(req)
    serve_websocket_session(ws, _flags(req), _attach_session(backend, req))


def serve_websocket_session(ws: ChannelSocket, flags: tuple[bool, bool, bool, bool], session: Session,
                            on_resize: OnResize | None = None) -> None:
    """Run ``session`` over the channels of ``ws`` (``flags`` = stdin, stdout, stderr, tty), send the Status.

    stdin ends (``b""``) with v5's close-channel message or when the client goes away."""
    stdin_on, stdout_on, stderr_on, _tty = flags
    # Kubernetes tells the client the connection is up with an empty message on the lowest writable channel.
    first = STDOUT if stdout_on else STDERR if stderr_on else ERROR
    gone = threading.Event()
    finished = threading.Event()
    # stdin not yet taken by the session: a few messages (each at most max_frame); when full, reading from the
    # socket waits (back-pressure), and a session that takes nothing for send_timeout loses its client
    stdin_q: queue.Queue[bytes] = queue.Queue(maxsize=max(1, ws.limits.stream_buffer // (64 * 1024)))
    try:
        ws.send(first, b"")
    except OSError:
        return

    def put(data: bytes) -> bool:
        deadline = time.monotonic() + ws.limits.send_timeout
        while not finished.is_set() and time.monotonic() < deadline:
            try:
                stdin_q.put(data, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def receive() -> None:
        while True:
            msg = ws.receive()
            if msg is None:
                break
            channel, data = msg
            if channel == STDIN and stdin_on and data:
                if not put(data):
                    break
            elif channel == CLOSE_CHANNEL and ws.protocol.startswith("v5.") and data[:1] == bytes([STDIN]):
                put(b"")
            elif channel == RESIZE and on_resize is not None:
                parse_sizes(data[:MAX_RESIZE_MESSAGE], on_resize)
            # anything else: ignored
        gone.set()
        with contextlib.suppress(queue.Full):
            stdin_q.put_nowait(b"")

    reader = threading.Thread(target=receive, daemon=True, name="remotecommand-ws-reader")
    reader.start()

    def writer(channel: int) -> Writer:
        return lambda data: ws.send(channel, data)

    def read_stdin() -> bytes:
        while True:
            try:
                return stdin_q.get(timeout=0.5)
            except queue.Empty:
                if gone.is_set():
                    return b""

    try:
        outcome = session(read_stdin if stdin_on else None, writer(STDOUT) if stdout_on else None,
                          writer(STDERR) if stderr_on else None, gone)
    finally:
        finished.set()
    if not gone.is_set():
        data = status_bytes(ws.protocol, outcome.error, outcome.exit_code)
        with contextlib.suppress(OSError):
            if data:
                ws.send(ERROR, data)
    ws.close()
    reader.join(5)
