"""The Kubernetes remote-command protocol for ``attach``, over SPDY streams or WebSocket channels.

Attach copies the VM's serial console: guest output to stdout, stdin to the guest.  A TTY resize is accepted
and ignored (a serial console has no window size).  The session ends when the console ends (the VM stopped or
virtletd lost the console: a Success status is sent on the error stream/channel), when the console cannot be
opened (a Failure status), or when the client goes away (nothing more can be sent).  The client's stdin EOF
does not end the session: ``echo cmd | kubectl attach -i`` must still see the output.

Status on the error stream: v4/v5 send a JSON ``metav1.Status``; older versions send only failures, as text.
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


def json_status(error: str | None) -> bytes:
    """The v4 ``metav1.Status`` for a session's end."""
    if error is None:
        return json.dumps({"metadata": {}, "status": "Success"}).encode()
    return json.dumps({"metadata": {}, "status": "Failure", "message": error, "reason": "InternalError",
                       "details": {"causes": [{"message": error}]}, "code": 500}).encode()


def status_bytes(protocol: str, error: str | None) -> bytes:
    if protocol.startswith(("v4.", "v5.")):
        return json_status(error)
    return error.encode() if error else b""


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
               creation_timeout: float = STREAM_CREATION_TIMEOUT) -> None:
    """Serve one attach over an upgraded SPDY connection (the 101 was already sent)."""
    req = normalize(req)
    arrived: queue.Queue[SpdyStream] = queue.Queue()
    conn = SpdyConnection(sock, server=True, on_stream=arrived.put, initial=initial).start()
    resize_ok = protocol not in ("", "channel.k8s.io", "v2.channel.k8s.io")
    expected = 1 + req.stdin + req.stdout + req.stderr + (req.tty and resize_ok)
    streams: dict[str, SpdyStream] = {}
    deadline = time.monotonic() + creation_timeout
    try:
        while len(streams) < expected:
            try:
                stream = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                log.info("attach %s: client did not create its streams in time", req.container_id)
                return
            kind = stream.header("streamtype")
            if kind not in ("error", "stdin", "stdout", "stderr", "resize") or kind in streams:
                stream.abort()
                continue
            if kind == "resize":
                stream.discard = True  # sizes are accepted and ignored
            streams[kind] = stream
        gone = threading.Event()
        threading.Thread(target=lambda: (conn.closed.wait(), gone.set()), daemon=True).start()
        stdin, stdout = streams.get("stdin"), streams.get("stdout")
        error = run_attach(backend, req, _stream_reader(stdin) if stdin else None,
                           stdout.write if stdout else None, gone)
        if not conn.closed.is_set():
            data = status_bytes(protocol, error)
            with contextlib.suppress(StreamClosed, OSError):
                if data:
                    streams["error"].write(data)
    finally:
        for s in streams.values():
            s.close()
        conn.close()


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
    # Kubernetes tells the client the connection is up with an empty message on the lowest writable channel.
    first = STDOUT if req.stdout else STDERR if req.stderr else ERROR
    gone = threading.Event()
    stdin_q: queue.Queue[bytes] = queue.Queue()
    try:
        ws.send(first, b"")
    except OSError:
        return

    def receive() -> None:
        while True:
            msg = ws.receive()
            if msg is None:
                break
            channel, data = msg
            if channel == STDIN and req.stdin and data:
                stdin_q.put(data)
            elif channel == CLOSE_CHANNEL and ws.protocol.startswith("v5.") and data[:1] == bytes([STDIN]):
                stdin_q.put(b"")
            # RESIZE and anything else: ignored
        gone.set()
        stdin_q.put(b"")

    reader = threading.Thread(target=receive, daemon=True, name="attach-ws-reader")
    reader.start()

    def write_stdout(data: bytes) -> None:
        ws.send(STDOUT, data)

    error = run_attach(backend, req, stdin_q.get if req.stdin else None, write_stdout if req.stdout else None,
                       gone)
    if not gone.is_set():
        data = status_bytes(ws.protocol, error)
        with contextlib.suppress(OSError):
            if data:
                ws.send(ERROR, data)
    ws.close()
    reader.join(5)
