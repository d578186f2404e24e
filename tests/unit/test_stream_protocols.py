"""Remote-command and port-forward protocols through the real server, with a fake console and loopback TCP."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from virtlet.stream.client import AttachClient, PortForwardClient, UpgradeError, upgrade
from virtlet.stream.model import AttachRequest, PortForwardRequest
from virtlet.stream.server import StreamServer, negotiate_spdy, negotiate_ws
from virtlet.stream.websocket import FrameReader, encode_frame


class FakeConsole:
    """Echoes input as ``echo:<input>``; ``end()`` ends the console like a stopped VM."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.out: list[bytes] = []
        self.ended = False
        self.closed = False

    def read(self, timeout: float | None = None) -> bytes | None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.out or self.ended or self.closed, timeout):
                return None
            return self.out.pop(0) if self.out else b""

    def write(self, data: bytes) -> None:
        with self.cond:
            self.out.append(b"echo:" + data)
            self.cond.notify_all()

    def end(self) -> None:
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()


class FakeBackend:
    def __init__(self) -> None:
        self.consoles: list[FakeConsole] = []

    def open_console(self, container_id: str) -> FakeConsole:
        if container_id == "missing":
            raise LookupError("console socket is gone")
        c = FakeConsole()
        self.consoles.append(c)
        return c

    def dial(self, sandbox_id: str, port: int, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def exec_channel(self, container_id: str, *, tty: bool, gone: object) -> None:
        return None


@pytest.fixture
def server() -> Iterator[StreamServer]:
    srv = StreamServer("127.0.0.1:0", FakeBackend()).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def echo_port() -> Iterator[int]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                s, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=lambda s=s: (_echo(s)), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield ls.getsockname()[1]
    finally:
        stop.set()
        ls.close()


def _echo(s: socket.socket) -> None:
    with s:
        while data := s.recv(4096):
            s.sendall(data)


def _read_until(read, needle: bytes) -> bytes:  # type: ignore[no-untyped-def]
    got = b""
    while needle not in got:
        data = read(5)
        assert data, f"stream ended before {needle!r}; got {got!r}"
        got += data
    return got


def test_negotiation_rules() -> None:
    assert negotiate_spdy(["v2.channel.k8s.io", "v4.channel.k8s.io"], ("v4.channel.k8s.io", "v2.channel.k8s.io")) \
        == "v4.channel.k8s.io"
    assert negotiate_spdy([], ("v4.channel.k8s.io",)) == ""
    assert negotiate_spdy(["v9"], ("v4.channel.k8s.io",)) is None
    assert negotiate_ws(["v5.channel.k8s.io", "v4.channel.k8s.io"], ("v4.channel.k8s.io", "v5.channel.k8s.io")) \
        == "v5.channel.k8s.io"


def test_spdy_attach_echo_then_success_status(server: StreamServer) -> None:
    client = AttachClient(server.attach_url(AttachRequest("c", stdin=True, stdout=True, tty=True)))
    assert client.protocol == "v4.channel.k8s.io"
    client.send_resize(80, 24)
    client.write(b"hi")
    assert _read_until(client.read, b"echo:hi")
    server.backend.consoles[0].end()  # type: ignore[attr-defined]
    assert _read_until(lambda t: client.read(t) or b"END", b"END")
    assert client.status() == {"metadata": {}, "status": "Success"}
    client.close()


def test_spdy_attach_failure_v4_json_and_v2_text(server: StreamServer) -> None:
    c4 = AttachClient(server.attach_url(AttachRequest("missing", stdin=True, stdout=True, tty=True)))
    status = c4.status()
    assert isinstance(status, dict) and status["status"] == "Failure"
    assert "console socket is gone" in status["message"]
    c4.close()
    c2 = AttachClient(server.attach_url(AttachRequest("missing", stdin=False, stdout=True, tty=True)),
                      stdin=False, protocols=["v2.channel.k8s.io"])
    assert c2.protocol == "v2.channel.k8s.io"
    assert "console socket is gone" in str(c2.status())
    c2.close()


def test_token_reuse_unknown_path_and_protocol_mismatch(server: StreamServer) -> None:
    url = server.attach_url(AttachRequest("c", stdout=True))
    AttachClient(url, stdin=False).close()
    with pytest.raises(UpgradeError) as exc:
        AttachClient(url, stdin=False)
    assert exc.value.status == 403
    with pytest.raises(UpgradeError) as exc:
        upgrade(server.base_url + "/run/x", ["v4.channel.k8s.io"])
    assert exc.value.status == 404
    with pytest.raises(UpgradeError) as exc:
        upgrade(server.base_url + "/exec/x", ["v4.channel.k8s.io"])
    assert exc.value.status == 403
    with pytest.raises(UpgradeError) as exc:
        upgrade(server.attach_url(AttachRequest("c")), ["v99.channel.k8s.io"])
    assert exc.value.status == 403
    # the port-forward token cannot open an attach
    token = server.port_forward_url(PortForwardRequest("s", (1,))).rsplit("/", 1)[1]
    with pytest.raises(UpgradeError) as exc:
        upgrade(f"{server.base_url}/attach/{token}", ["v4.channel.k8s.io"])
    assert exc.value.status == 403


def test_spdy_port_forward_parallel_and_closed_port(server: StreamServer, echo_port: int) -> None:
    pf = PortForwardClient(server.port_forward_url(PortForwardRequest("s", (echo_port,))))
    closed_data, closed_err = pf.open(1)  # nothing listens on port 1
    assert closed_err.read(5).startswith(b"error forwarding port 1")
    assert closed_data.read(5) == b""
    pairs = [pf.open(echo_port) for _ in range(5)]
    for i, (data, _) in enumerate(pairs):
        data.write(f"msg{i}".encode())
    for i, (data, _) in enumerate(pairs):
        assert data.read(5) == f"msg{i}".encode()
        data.close()
        assert data.read(5) == b""
    pf.close()


def _ws_messages(reader: FrameReader, count: int) -> list[tuple[int, bytes]]:
    out = []
    while len(out) < count:
        opcode, payload = reader.message()
        if opcode in (0x1, 0x2):
            out.append((payload[0], payload[1:]))
        elif opcode == 0x8:
            break
    return out


def test_websocket_attach_v5_and_status(server: StreamServer) -> None:
    up = upgrade(server.attach_url(AttachRequest("c", stdin=True, stdout=True, tty=True)),
                 ["v5.channel.k8s.io", "v4.channel.k8s.io"], transport="websocket", method="GET")
    assert up.protocol == "v5.channel.k8s.io"
    reader = FrameReader(up.sock, up.rest, expect_masked=False)
    assert _ws_messages(reader, 1) == [(1, b"")]  # "connected" marker on stdout
    up.sock.sendall(encode_frame(0x2, b"\x04" + json.dumps({"Width": 1, "Height": 1}).encode(), mask=True))
    up.sock.sendall(encode_frame(0x2, b"\x00ls", mask=True))
    assert _ws_messages(reader, 1) == [(1, b"echo:ls")]
    up.sock.sendall(encode_frame(0x2, b"\xff\x00", mask=True))  # v5: stdin closed; output continues
    server.backend.consoles[0].end()  # type: ignore[attr-defined]
    assert _ws_messages(reader, 1) == [(3, b'{"metadata": {}, "status": "Success"}')]
    up.sock.close()


def test_websocket_port_forward_prefix_and_error(server: StreamServer, echo_port: int) -> None:
    url = server.port_forward_url(PortForwardRequest("s", ())) + f"?port={echo_port}&port=1"
    up = upgrade(url, ["v4.channel.k8s.io"], transport="websocket", method="GET")
    reader = FrameReader(up.sock, up.rest, expect_masked=False)
    first = _ws_messages(reader, 5)
    p = struct.pack("<H", echo_port)
    one = struct.pack("<H", 1)
    assert first[:4] == [(0, p), (1, p), (2, one), (3, one)]
    assert first[4][0] == 3 and b"error forwarding port 1" in first[4][1]
    up.sock.sendall(encode_frame(0x2, b"\x00ping", mask=True))
    assert _ws_messages(reader, 1) == [(0, b"ping")]
    up.sock.close()


@pytest.mark.parametrize("raw", [
    b"garbage\r\n\r\n",
    b"GET /attach/x HTTP/1.1\r\nHost: a\r\n\r\n",  # no upgrade
    b"GET /attach/x HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",  # no key
    b"DELETE /attach/x HTTP/1.1\r\nUpgrade: SPDY/3.1\r\n\r\n",
    b"GET /attach/x HTTP/1.1\r\nbad header line\r\n\r\n",
])
def test_malformed_requests_get_4xx_and_server_survives(server: StreamServer, raw: bytes) -> None:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    s.sendall(raw)
    answer = s.recv(4096)
    s.close()
    assert answer.startswith(b"HTTP/1.1 4"), answer
    client = AttachClient(server.attach_url(AttachRequest("c", stdout=True)), stdin=False)
    client.close()
