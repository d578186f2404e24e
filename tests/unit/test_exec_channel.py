"""The exec channel's pieces that need no VM: the OPEN encoding, its bounds, the socket path, the domain XML
port, the resize parser, and the host side against a fake agent on a socketpair-backed unix socket."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.stream.remotecommand import MAX_RESIZE_MESSAGE, parse_sizes
from virtlet.vm import domain_xml as dx
from virtlet.vm import exec_channel as ec


def test_open_encoding_and_bounds() -> None:
    payload = ec.encode_open(["sh", "-c", "echo hi"], tty=True, stdin=True, rows=24, cols=80)
    assert payload == bytes([3]) + struct.pack(">HH", 24, 80) + b"sh\0-c\0echo hi\0\0"
    with pytest.raises(errors.InvalidArgument, match="NUL"):
        ec.encode_open(["a\0b"], tty=False, stdin=False)
    with pytest.raises(errors.InvalidArgument, match="longer"):
        ec.encode_open(["x" * ec.MAX_OPEN], tty=False, stdin=False)


def test_socket_path_next_to_console() -> None:
    assert ec.socket_path(Path("/run/virtlet/console/abc.sock")) == Path("/run/virtlet/console/abc.exec.sock")


def test_channel_xml_round_trip() -> None:
    chan = dx.GuestAgentChannel(name=ec.CHANNEL_NAME, path="/run/x.exec.sock")
    el = chan.to_xml()
    assert el.find("source").get("path") == "/run/x.exec.sock"  # type: ignore[union-attr]
    assert dx.GuestAgentChannel.from_xml(el) == chan
    # the guest agent's socket is libvirt's choice: a live XML's path is not kept
    ga = dx.GuestAgentChannel(path="/var/lib/libvirt/qemu/channel/target/x/org.qemu.guest_agent.0")
    assert dx.GuestAgentChannel.from_xml(ga.to_xml()) == dx.GuestAgentChannel()


def test_parse_sizes() -> None:
    seen: list[tuple[int, int]] = []
    rest = parse_sizes(b'{"Width":80,"Height":24}{"Width":100,"Height":37}{"Wid', lambda w, h: seen.append((w, h)))
    assert seen == [(80, 24), (100, 37)] and rest == b'{"Wid'
    assert parse_sizes(b'{"Width":-1,"Height":5}[1]', lambda w, h: seen.append((w, h))) == b""
    assert parse_sizes(b"{" * (MAX_RESIZE_MESSAGE + 1), lambda w, h: None) == b""
    assert seen == [(80, 24), (100, 37)]


def _frame(kind: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BBH", kind, sid, len(payload)) + payload


def _read_frame(conn: socket.socket) -> tuple[int, int, bytes]:
    head = conn.recv(4, socket.MSG_WAITALL)
    kind, sid, size = struct.unpack(">BBH", head)
    return kind, sid, conn.recv(size, socket.MSG_WAITALL) if size else b""


def test_channel_against_fake_agent(tmp_path: Path) -> None:
    """HELLO, OPEN, streamed output, EXIT; an output flood past MAX_QUEUED ends only that session."""
    path = tmp_path / "c.exec.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    got: dict[str, object] = {}
    flooded = threading.Event()
    closed = threading.Event()

    def agent() -> None:
        conn, _ = server.accept()
        with conn:
            assert _read_frame(conn)[0] == ec.HELLO
            conn.sendall(_frame(ec.G_HELLO, 0, b"virtlet-exec 1"))
            kind, sid, payload = _read_frame(conn)
            got["open"] = (kind, sid, payload)
            conn.sendall(_frame(ec.G_STDOUT, sid, b"out") + _frame(ec.G_STDERR, sid, b"err")
                         + _frame(ec.G_EXIT, sid, struct.pack(">I", 3)))
            kind, sid, _ = _read_frame(conn)  # the second session: flood it
            chunk = _frame(ec.G_STDOUT, sid, b"x" * ec.MAX_PAYLOAD)
            for _ in range(ec.MAX_QUEUED // ec.MAX_PAYLOAD + 2):
                conn.sendall(chunk)
            flooded.set()
            got["close"] = _read_frame(conn)[:2]
            closed.wait(30)
            conn.sendall(_frame(ec.G_STDOUT, sid, b"late") + _frame(ec.G_EXIT, sid, struct.pack(">I", 137)))
            _read_frame(conn)  # the other session's OPEN

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    channel = ec.ExecChannel(path)
    try:
        channel.connect()
        assert channel.wait_ready(10)
        session = channel.open(["sh"], tty=False, stdin=False)
        events = [session.next_event(10) for _ in range(3)]
        assert [(e.kind, e.data, e.code) for e in events if e] == [("stdout", b"out", 0), ("stderr", b"err", 0),
                                                                   ("exit", b"", 3)]
        session.close()
        flood = channel.open(["yes"], tty=False, stdin=False)
        assert flooded.wait(30)  # a client that reads nothing meanwhile...
        deadline = time.monotonic() + 30
        while not flood.done:  # ...until the channel's reader has taken the flood in
            assert time.monotonic() < deadline
            time.sleep(0.05)
        while True:
            event = flood.next_event(10)
            assert event is not None
            if event.kind != "stdout":
                break
        assert event.kind == "lost" and b"client read none" in event.data
        flood.close()
        deadline = time.monotonic() + 30
        while "close" not in got:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert got["close"] == (ec.CLOSE, flood.sid)
        # until the agent answers CLOSE with EXIT, the id is not reused: a new session gets another one
        other = channel.open(["true"], tty=False, stdin=False)
        assert other.sid != flood.sid
        other.close()
        closed.set()
        deadline = time.monotonic() + 30
        while flood.sid in channel._sessions:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        thread.join(10)
        late = [other.next_event(0.2) for _ in range(3)]
        assert all(e is None or e.kind != "stdout" for e in late), late  # the old command's output went nowhere
    finally:
        channel.close()
        server.close()


class _ChannelBackend:
    """A streaming backend whose VM has the exec agent (a fake one on a unix socket)."""

    def __init__(self, channel: ec.ExecChannel) -> None:
        self.channel = channel

    def exec_channel(self, container_id: str, *, tty: bool, gone: object) -> ec.ExecChannel:
        return self.channel


def test_websocket_tty_exec_resize_stdin_exit_code(tmp_path: Path) -> None:
    """kubectl exec -it over WebSocket v5: the size (channel 4) becomes RESIZE, stdin STDIN, the agent's output
    reaches stdout, and its exit code 3 the NonZeroExitCode Status."""
    import json

    from tests.unit.test_stream_protocols import _ws_messages
    from virtlet.stream.client import upgrade
    from virtlet.stream.model import ExecRequest
    from virtlet.stream.server import StreamServer
    from virtlet.stream.websocket import FrameReader, encode_frame

    path = tmp_path / "c.exec.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    seen: list[tuple[int, int, bytes]] = []

    def agent() -> None:
        conn, _ = listener.accept()
        with conn:
            _read_frame(conn)  # HELLO
            conn.sendall(_frame(ec.G_HELLO, 0, b"virtlet-exec 1"))
            while True:
                kind, sid, payload = _read_frame(conn)
                seen.append((kind, sid, payload))
                if kind == ec.STDIN:
                    conn.sendall(_frame(ec.G_ACK, sid, struct.pack(">I", len(payload)))
                                 + _frame(ec.G_STDOUT, sid, b"got:" + payload)
                                 + _frame(ec.G_EXIT, sid, struct.pack(">I", 3)))
                    return

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    channel = ec.ExecChannel(path)
    channel.connect()
    assert channel.wait_ready(10)
    srv = StreamServer("127.0.0.1:0", _ChannelBackend(channel)).start()  # type: ignore[arg-type]
    try:
        url = srv.exec_url(ExecRequest("c", ("sh",), stdin=True, stdout=True, stderr=False, tty=True))
        up = upgrade(url, ["v5.channel.k8s.io"], transport="websocket", method="GET")
        reader = FrameReader(up.sock, up.rest, expect_masked=False)
        assert _ws_messages(reader, 1) == [(1, b"")]
        up.sock.sendall(encode_frame(0x2, b"\x04" + json.dumps({"Width": 120, "Height": 40}).encode(), mask=True))
        time.sleep(0.5)  # the size first, as kubectl sends it before any typing
        up.sock.sendall(encode_frame(0x2, b"\x00hi", mask=True))
        out = _ws_messages(reader, 2)
        assert out[0] == (1, b"got:hi")
        assert out[1][0] == 3 and json.loads(out[1][1])["details"]["causes"] == [
            {"reason": "ExitCode", "message": "3"}]
        up.sock.close()
        thread.join(10)
        opened = seen[0]
        assert opened[0] == ec.OPEN and opened[2][0] == 3  # tty + stdin
        # the size reaches the guest in OPEN (it came before the session opened) or as a RESIZE
        assert opened[2][1:5] == struct.pack(">HH", 40, 120) or (
            ec.RESIZE, opened[1], struct.pack(">HH", 40, 120)) in seen, seen
    finally:
        srv.stop()
        channel.close()
        listener.close()
