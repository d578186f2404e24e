"""A SPDY/3.1 connection over a socket: streams, replies, pings, half-close, GOAWAY.

One reader thread decodes frames and routes them; writers share one lock (frames never interleave).  The
server side replies SYN_REPLY to every SYN_STREAM (Kubernetes clients wait for it and drop data on streams
that were not replied) and hands the stream to ``on_stream``.  The client side opens odd-numbered streams.

Flow control: like the Go implementation Kubernetes uses (moby/spdystream), window sizes are not enforced and
no WINDOW_UPDATE is sent; received WINDOW_UPDATE and SETTINGS frames are accepted and ignored.

Bounds (``virtlet.stream.limits``): a frame longer than ``max_frame`` ends the connection from its head, before
the payload is read; each stream buffers at most ``stream_buffer`` unread bytes, then the reader waits
(back-pressure: the peer's TCP window fills), and resets a stream whose consumer takes nothing for
``send_timeout``; at most ``max_streams`` streams are open; a send that makes no progress for ``send_timeout``
ends the connection, and so do ``idle_timeout`` seconds without a frame either way.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable

from virtlet.stream import spdy
from virtlet.stream.limits import DEFAULT, Activity, IdleTimeout, Limits

log = logging.getLogger(__name__)

CHUNK = 32 * 1024
FLOW_CONTROL_ERROR = 7  # RST_STREAM status: the stream's consumer did not take its data


class StreamClosed(Exception):
    """The stream was reset or the connection ended."""


class SpdyStream:
    """One bidirectional SPDY stream: ``read()`` until ``b""`` (peer FIN), ``write()``, ``close()`` (our FIN)."""

    def __init__(self, conn: SpdyConnection, stream_id: int, headers: spdy.Headers) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self.remote_closed = False  # peer sent FIN (or reset)
        self.local_closed = False  # we sent FIN (or reset)
        self.reset = False
        self.discard = False  # drop what arrives (resize streams: sizes are ignored)
        self.replied = threading.Event()  # SYN_REPLY came, or the stream was reset (then ``accepted`` stays False)
        self.accepted = False
        self.reply_headers: spdy.Headers = {}

    def header(self, name: str) -> str:
        return spdy.header(self.headers, name)

    # -- fed by the connection's reader ------------------------------------------------------------------
    def _feed(self, data: bytes, fin: bool) -> bool:
        """Buffer ``data``; waits (up to ``send_timeout``) while the buffer is full.  ``False``: no room came."""
        limits = self.conn.limits
        with self._cond:
            if data and not self.discard:
                room = self._cond.wait_for(
                    lambda: self._buffered + len(data) <= limits.stream_buffer or not self._buffered
                    or self.reset or self.conn.closed.is_set(), limits.send_timeout)
                if not room:
                    return False
                if not self.reset:
                    self._chunks.append(data)
                    self._buffered += len(data)
            if fin:
                self.remote_closed = True
            self._cond.notify_all()
        return True

    def _reset(self) -> None:
        with self._cond:
            self.reset = self.remote_closed = self.local_closed = True
            self._cond.notify_all()
        self.replied.set()

    # -- user side ---------------------------------------------------------------------------------------
    def read(self, timeout: float | None = None) -> bytes | None:
        """Buffered data; ``b""`` at the peer's FIN or a reset; ``None`` on timeout."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._chunks or self.remote_closed, timeout):
                return None
            if self._chunks:
                data = self._chunks.popleft()
                self._buffered -= len(data)
                self._cond.notify_all()
                return data
            return b""

    def write(self, data: bytes) -> None:
        if self.local_closed:
            raise StreamClosed(f"stream {self.id} is closed")
        for i in range(0, len(data), CHUNK):
            self.conn.send(spdy.DataFrame(stream_id=self.id, data=data[i:i + CHUNK]))

    def close(self) -> None:
        """Half-close: send FIN (idempotent)."""
        with self._cond:
            if self.local_closed:
                return
            self.local_closed = True
        with contextlib.suppress(OSError, StreamClosed):
            self.conn.send(spdy.DataFrame(stream_id=self.id, flags=spdy.FLAG_FIN))
        self.conn._maybe_forget(self)

    def abort(self, status: int = spdy.CANCEL) -> None:
        """Reset the stream (RST_STREAM)."""
        if not self.reset:
            with contextlib.suppress(OSError, StreamClosed):
                self.conn.send(spdy.RstStream(stream_id=self.id, status=status))
        self._reset()
        self.conn._forget(self)


class SpdyConnection:
    """Both ends of SPDY over ``sock``: ``server=True`` accepts streams, else opens them."""

    def __init__(self, sock: socket.socket, *, server: bool,
                 on_stream: Callable[[SpdyStream], None] | None = None, initial: bytes = b"",
                 limits: Limits = DEFAULT) -> None:
        self.sock = sock
        self.limits = limits
        self.activity = Activity(sock, limits.idle_timeout)
        sock.settimeout(limits.send_timeout)  # bounds sendall; reads wait in Activity.wait_readable
        self.server = server
        self.on_stream = on_stream
        self.codec = spdy.HeaderCodec()
        self._send_lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._lock = threading.Lock()
        self._streams: dict[int, SpdyStream] = {}
        self._next_id = 2 if server else 1
        self._last_received = 0
        self._buf = bytearray(initial)
        self.closed = threading.Event()
        self.error: str = ""
        self.goaway = False
        self._reader = threading.Thread(target=self._read_loop, name="spdy-reader", daemon=True)

    def start(self) -> SpdyConnection:
        self._reader.start()
        return self

    # -- sending -----------------------------------------------------------------------------------------
    def send(self, frame: spdy.Frame) -> None:
        if self.closed.is_set():
            raise StreamClosed("connection closed")
        with self._send_lock:
            data = spdy.encode(frame, self.codec)  # header compression order must equal send order
            try:
                self.sock.sendall(data)
            except OSError as exc:
                why = f"peer took nothing for {self.limits.send_timeout:g}s" if isinstance(exc, TimeoutError) \
                    else str(exc)
                self._shutdown(f"send failed: {why}")
                raise StreamClosed(f"connection closed: {why}") from exc
            self.activity.touch()

    def open_stream(self, headers: dict[str, str], timeout: float = 10.0) -> SpdyStream:
        """Client side: SYN_STREAM with ``headers``; waits for the SYN_REPLY."""
        with self._open_lock:  # ids must reach the wire in increasing order
            with self._lock:
                sid = self._next_id
                self._next_id += 2
                stream = SpdyStream(self, sid, {k.lower(): [v] for k, v in headers.items()})
                self._streams[sid] = stream
            self.send(spdy.SynStream(stream_id=sid, headers=stream.headers))
        # A stream the server replied to was accepted, even when the server has already finished and closed the
        # connection by the time this thread looks (a failed attach answers at once): reads then return b"".
        if not stream.replied.wait(timeout) or not stream.accepted:
            stream.abort()
            raise StreamClosed(f"stream {sid} was not accepted by the server")
        return stream

    def ping(self, ping_id: int) -> None:
        self.send(spdy.Ping(ping_id=ping_id))

    def close(self, grace: float = 2.0) -> None:
        """GOAWAY, then end the socket once the peer closes (or after ``grace``)."""
        if self.closed.is_set():
            return
        with contextlib.suppress(StreamClosed, OSError):
            self.send(spdy.GoAway(last_good_id=self._last_received, status=0))
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        if threading.current_thread() is not self._reader:
            self.closed.wait(grace)
        self._shutdown("closed")

    def _shutdown(self, why: str) -> None:
        if not self.closed.is_set():
            self.error = why
            self.closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
        for s in streams:
            s._reset()

    def _forget(self, stream: SpdyStream) -> None:
        with self._lock:
            self._streams.pop(stream.id, None)

    def _maybe_forget(self, stream: SpdyStream) -> None:
        if stream.local_closed and stream.remote_closed:
            self._forget(stream)

    # -- receiving ---------------------------------------------------------------------------------------
    def _recv_exact(self, n: int) -> bytes | None:
        while len(self._buf) < n:
            try:
                self.activity.wait_readable()
                data = self.sock.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            self._buf += data
            self.activity.touch()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _read_loop(self) -> None:
        try:
            while True:
                head = self._recv_exact(8)
                if head is None:
                    break
                _, _, _, length = spdy.parse_head(head)
                if length > self.limits.max_frame:  # refused from the head: nothing of it is read
                    raise spdy.SpdyError(f"frame of {length} bytes is larger than {self.limits.max_frame}")
                payload = self._recv_exact(length)
                if payload is None:
                    break
                frame = spdy.decode(head, payload, self.codec)
                if not self._handle(frame):
                    break
        except IdleTimeout as exc:
            log.info("SPDY connection idle: %s; closing it", exc)
            with contextlib.suppress(StreamClosed, OSError):
                self.send(spdy.GoAway(last_good_id=self._last_received, status=0))
            self._shutdown(f"idle: {exc}")
            return
        except spdy.SpdyError as exc:
            log.info("SPDY protocol error from peer: %s", exc)
            with contextlib.suppress(StreamClosed, OSError):
                self.send(spdy.GoAway(last_good_id=self._last_received, status=1))
            self._shutdown(f"protocol error: {exc}")
            return
        except Exception:  # a bug must not kill the process: end this connection only
            log.exception("SPDY reader failed")
        self._shutdown("peer closed the connection")

    def _handle(self, frame: spdy.Frame) -> bool:
        if isinstance(frame, spdy.DataFrame):
            with self._lock:
                stream = self._streams.get(frame.stream_id)
            if stream is not None:
                if not stream._feed(frame.data, bool(frame.flags & spdy.FLAG_FIN)):
                    log.info("SPDY stream %d: nothing read of its %d buffered bytes for %gs; resetting it",
                             stream.id, stream._buffered, self.limits.send_timeout)
                    stream.abort(FLOW_CONTROL_ERROR)
                    return True
                self._maybe_forget(stream)
            return True
        if isinstance(frame, spdy.SynStream):
            return self._on_syn_stream(frame)
        if isinstance(frame, spdy.SynReply):
            with self._lock:
                stream = self._streams.get(frame.stream_id)
            if stream is not None:
                stream.reply_headers = frame.headers
                stream.accepted = True
                stream.replied.set()
                if frame.flags & spdy.FLAG_FIN:
                    stream._feed(b"", True)
            return True
        if isinstance(frame, spdy.HeadersFrame):
            with self._lock:
                stream = self._streams.get(frame.stream_id)
            if stream is not None and frame.flags & spdy.FLAG_FIN:
                stream._feed(b"", True)
            return True
        if isinstance(frame, spdy.RstStream):
            with self._lock:
                stream = self._streams.pop(frame.stream_id, None)
            if stream is not None:
                stream._reset()
            return True
        if isinstance(frame, spdy.Ping):
            if (frame.ping_id & 1) != (0 if self.server else 1):  # the peer's ping: echo it
                with contextlib.suppress(StreamClosed):
                    self.send(frame)
            return True
        if isinstance(frame, spdy.GoAway):
            self.goaway = True  # no new streams; those in flight finish, then the peer closes the socket
            return True
        return True  # SETTINGS, WINDOW_UPDATE, unknown control frames: ignored

    def _on_syn_stream(self, frame: spdy.SynStream) -> bool:
        sid = frame.stream_id
        if not self.server or sid == 0 or sid % 2 == 0 or sid <= self._last_received:
            with contextlib.suppress(StreamClosed):
                self.send(spdy.RstStream(stream_id=sid, status=spdy.PROTOCOL_ERROR))
            return True
        self._last_received = sid
        with self._lock:
            full = len(self._streams) >= self.limits.max_streams
        if full:
            log.info("SPDY: refusing stream %d: %d streams are open", sid, self.limits.max_streams)
            with contextlib.suppress(StreamClosed):
                self.send(spdy.RstStream(stream_id=sid, status=spdy.REFUSED_STREAM))
            return True
        stream = SpdyStream(self, sid, frame.headers)
        with self._lock:
            self._streams[sid] = stream
        if frame.flags & spdy.FLAG_FIN:
            stream.remote_closed = True
        self.send(spdy.SynReply(stream_id=sid, headers={}))
        stream.accepted = True
        stream.replied.set()
        if self.on_stream is not None:
            self.on_stream(stream)
        return True
