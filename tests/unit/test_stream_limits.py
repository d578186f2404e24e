"""The streaming server's bounds (issue 13) with real sockets against the real server: total head time
(slowloris), head size, concurrent connections, frame lengths, bytes buffered per stream, stalled peers and idle
connections.  The backend is a fake console and loopback TCP."""

from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from tests.unit.test_stream_protocols import FakeBackend, _echo
from virtlet.stream.client import PortForwardClient, upgrade
from virtlet.stream.limits import Limits
from virtlet.stream.model import PortForwardRequest
from virtlet.stream.server import StreamServer
from virtlet.stream.spdy_conn import StreamClosed
from virtlet.stream.websocket import FrameReader, encode_frame


def _server(**kw: float) -> StreamServer:
    return StreamServer("127.0.0.1:0", FakeBackend(), limits=Limits(**kw)).start()  # type: ignore[arg-type]


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A loopback port standing in for a VM port; accepted connections are collected (and closed after)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(16)
    accepted: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                s, _ = ls.accept()
            except OSError:
                return
            accepted.append(s)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield ls, accepted
    finally:
        ls.close()
        for s in accepted:
            s.close()


def _echo_listener() -> tuple[socket.socket, int]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()

    def serve() -> None:
        while True:
            try:
                s, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(s,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return ls, ls.getsockname()[1]


def _port_forward_roundtrip(srv: StreamServer, port: int) -> None:
    pf = PortForwardClient(srv.port_forward_url(PortForwardRequest("sb", (port,))))
    try:
        data, _ = pf.open(port)
        data.write(b"ping")
        assert data.read(10) == b"ping"
    finally:
        pf.close()


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes ``sock``; fails if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    return got


def test_defaults() -> None:
    d = Limits()
    assert d.head_timeout == 10 and d.max_connections >= 16 and d.max_frame <= 16 << 20
    assert d.idle_timeout == 4 * 3600  # the kubelet's --streaming-connection-idle-timeout default


def test_slowloris_is_cut_off_after_the_total_head_time_while_others_are_served() -> None:
    srv = _server(head_timeout=3)
    echo, port = _echo_listener()
    slow = socket.create_connection(("127.0.0.1", srv.port))
    try:
        start = time.monotonic()
        cut = threading.Event()

        def trickle() -> None:
            for b in b"GET /attach/x HTTP/1.1\r\nX-Slow: " + b"a" * 100:
                try:
                    slow.send(bytes([b]))
                except OSError:
                    break
                if cut.wait(0.5):  # a byte every half second: each read is quick, the head never ends
                    break

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        _port_forward_roundtrip(srv, port)  # served meanwhile
        answer = _closed_within(slow, 30)
        elapsed = time.monotonic() - start
        cut.set()
        assert answer.startswith(b"HTTP/1.1 400") and b"not received within 3s" in answer
        assert 2.5 <= elapsed < 15, elapsed
        t.join(5)
    finally:
        slow.close()
        echo.close()
        srv.stop()


def test_head_size_is_bounded() -> None:
    srv = _server()
    try:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(b"GET /attach/x HTTP/1.1\r\n" + b"X: " + b"a" * (70 * 1024))
        assert _closed_within(s, 10).startswith(b"HTTP/1.1 400")
        s.close()
    finally:
        srv.stop()


def test_connection_limit_n_plus_one_is_refused_politely_then_served_again() -> None:
    srv = _server(max_connections=4, head_timeout=60)
    echo, port = _echo_listener()
    held = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
    try:
        deadline = time.monotonic() + 10
        while len(srv._conns) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        extra = socket.create_connection(("127.0.0.1", srv.port))
        answer = _closed_within(extra, 10)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer, answer
        assert b"at most 4" in answer and srv.refused == 1
        held.pop().close()
        deadline = time.monotonic() + 10
        while len(srv._conns) > 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        _port_forward_roundtrip(srv, port)  # a slot is free again
    finally:
        for s in held:
            s.close()
        echo.close()
        srv.stop()


def test_huge_spdy_frame_length_is_refused_without_allocating_it() -> None:
    srv = _server()
    try:
        up = upgrade(srv.port_forward_url(PortForwardRequest("sb", (1,))), ["portforward.k8s.io"])
        tracemalloc.start()
        try:
            up.sock.sendall(struct.pack(">II", 1, 0xFFFFFF))  # DATA frame head: 16 MiB promised, none sent
            answer = _closed_within(up.sock, 10)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert answer[:4] == b"\x80\x03\x00\x07"  # GOAWAY, then the connection ends
        assert peak < 4 << 20, peak
        up.sock.close()
    finally:
        srv.stop()


@pytest.mark.parametrize("length", [8 << 20, 1 << 62])
def test_huge_websocket_frame_length_is_refused_without_reading_it(length: int) -> None:
    srv = _server()
    echo, port = _echo_listener()
    try:
        up = upgrade(srv.port_forward_url(PortForwardRequest("sb", (port,))), ["v4.channel.k8s.io"],
                     transport="websocket", method="GET")
        reader = FrameReader(up.sock, up.rest, expect_masked=False)
        for _ in range(2):
            reader.message()  # the port prefixes on channels 0 and 1
        tracemalloc.start()
        try:
            up.sock.sendall(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", length) + b"mask")
            up.sock.settimeout(10)
            opcode, payload = reader.message()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert opcode == 0x8 and struct.unpack(">H", payload[:2])[0] == 1009, payload
        assert peak < 4 << 20, peak
        up.sock.close()
    finally:
        echo.close()
        srv.stop()


def test_a_vm_port_that_does_not_read_holds_a_bounded_buffer(listener: tuple[socket.socket, list]) -> None:
    """Port-forward into a port that never reads: the server stops reading from the client (back-pressure)
    instead of buffering everything it sends, and drops the forwarded connection after send_timeout."""
    ls, accepted = listener
    port = ls.getsockname()[1]
    srv = _server(send_timeout=3)
    pf = PortForwardClient(srv.port_forward_url(PortForwardRequest("sb", (port,))))
    sent = [0]
    tracemalloc.start()
    try:
        data, err = pf.open(port)
        chunk = b"x" * 32768

        def flood() -> None:
            try:
                for _ in range(64 * 32):  # 64 MiB, far more than socket buffers and the stream buffer
                    data.write(chunk)
                    sent[0] += len(chunk)
            except (StreamClosed, OSError):
                pass

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        t.join(30)
        _, peak = tracemalloc.get_traced_memory()
        assert sent[0] < 48 << 20, "the server kept reading what it cannot deliver"
        assert peak < 24 << 20, peak
        # the forwarded connection was given up; the port-forward connection itself still works for others
        assert data.read(30) == b""
    finally:
        tracemalloc.stop()
        pf.close()
        srv.stop()


def test_a_client_that_does_not_read_a_flooding_vm_port_is_dropped() -> None:
    """The VM side floods, the client never reads: the server's sends stall and it drops the client after
    send_timeout, closing its connection to the VM (the flooder sees it)."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    vm_done = threading.Event()

    def flood() -> None:
        s, _ = ls.accept()
        with s:
            try:
                while True:
                    s.sendall(b"y" * 65536)
            except OSError:
                vm_done.set()

    threading.Thread(target=flood, daemon=True).start()
    srv = _server(send_timeout=2)
    try:
        up = upgrade(srv.port_forward_url(PortForwardRequest("sb", (0,))), ["portforward.k8s.io"])
        from virtlet.stream import spdy

        codec = spdy.HeaderCodec()
        port = str(ls.getsockname()[1])
        for sid, kind in ((1, "error"), (3, "data")):
            up.sock.sendall(spdy.encode(spdy.SynStream(stream_id=sid, headers={
                "streamtype": [kind], "port": [port], "requestid": ["0"]}), codec))
        up.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        assert vm_done.wait(40), "the VM connection was never closed"
        up.sock.close()
    finally:
        ls.close()
        srv.stop()


def test_idle_connection_is_closed() -> None:
    srv = _server(idle_timeout=1.5)
    try:
        up = upgrade(srv.port_forward_url(PortForwardRequest("sb", (1,))), ["portforward.k8s.io"])
        start = time.monotonic()
        answer = _closed_within(up.sock, 20)
        assert answer[:4] == b"\x80\x03\x00\x07"  # GOAWAY
        assert 1.0 <= time.monotonic() - start < 15
        up.sock.close()
    finally:
        srv.stop()


def test_too_many_spdy_streams_are_refused() -> None:
    srv = _server(max_streams=4)
    try:
        up = upgrade(srv.port_forward_url(PortForwardRequest("sb", (1,))), ["portforward.k8s.io"])
        from virtlet.stream import spdy

        codec = spdy.HeaderCodec()
        for i in range(6):
            up.sock.sendall(spdy.encode(spdy.SynStream(stream_id=2 * i + 1, headers={
                "streamtype": ["error"], "requestid": [str(i)], "port": ["1"]}), codec))
        up.sock.settimeout(10)
        buf = b""
        decoder = spdy.HeaderCodec()
        frames: list[spdy.Frame] = []
        while sum(isinstance(f, spdy.RstStream) for f in frames) < 2:
            buf += up.sock.recv(65536)
            while len(buf) >= 8:
                n = spdy.parse_head(buf[:8])[3]
                if len(buf) < 8 + n:
                    break
                frames.append(spdy.decode(buf[:8], buf[8:8 + n], decoder))
                buf = buf[8 + n:]
        refused = [f.stream_id for f in frames if isinstance(f, spdy.RstStream)]
        assert refused == [9, 11]
        up.sock.close()
    finally:
        srv.stop()


def test_websocket_frames_within_the_limit_still_work() -> None:
    srv = _server()
    echo, port = _echo_listener()
    try:
        up = upgrade(srv.port_forward_url(PortForwardRequest("sb", (port,))), ["v4.channel.k8s.io"],
                     transport="websocket", method="GET")
        reader = FrameReader(up.sock, up.rest, expect_masked=False)
        reader.message()
        reader.message()
        payload = b"z" * 200_000
        up.sock.sendall(encode_frame(0x2, b"\x00" + payload, mask=True))
        got = b""
        up.sock.settimeout(10)
        while len(got) < len(payload):
            _, msg = reader.message()
            got += msg[1:]
        assert got == payload
        up.sock.close()
    finally:
        echo.close()
        srv.stop()
