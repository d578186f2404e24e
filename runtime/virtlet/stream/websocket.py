"""WebSocket (RFC 6455) for the streaming server: handshake, frames, and Kubernetes channel messages.

Kubernetes multiplexes streams over one WebSocket by prefixing every binary message with a channel byte
(``channel.k8s.io`` family: 0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize; port-forward: 2*i data and
2*i+1 error for the i-th port).  ``base64.channel.k8s.io`` variants send text messages: the channel as an
ASCII digit, then base64 data.  ``v5.channel.k8s.io`` adds message ``[255, channel]`` meaning "this channel is
closed" (the client's stdin EOF).

Bounds (``virtlet.stream.limits``): a frame or message longer than ``max_frame`` is refused from its length
field (close code 1009) before any of it is read; reads wait at most ``idle_timeout`` without traffic either
way, and a send that makes no progress for ``send_timeout`` fails (the connection ends).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import threading
from dataclasses import dataclass

from virtlet.stream.limits import DEFAULT, Activity, IdleTimeout, Limits

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
CLOSE_CHANNEL = 255
MAX_MESSAGE = DEFAULT.max_frame
CLOSE_TOO_BIG = 1009
CLOSE_PROTOCOL_ERROR = 1002


class WebSocketError(Exception):
    """The peer broke the WebSocket protocol (the connection must end)."""

    close_code = CLOSE_PROTOCOL_ERROR


class TooBig(WebSocketError):
    close_code = CLOSE_TOO_BIG


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def encode_frame(opcode: int, payload: bytes, *, mask: bool = False, fin: bool = True) -> bytes:
    """One frame; clients must mask (``mask=True``), servers must not."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    n = len(payload)
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 1 << 16:
        head.append(mbit | 126)
        head += struct.pack(">H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack(">Q", n)
    if mask:
        key = os.urandom(4)
        head += key
        payload = apply_mask(payload, key)
    return bytes(head) + payload


def apply_mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return data
    n = len(data)
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes


class FrameReader:
    """Reads frames from a socket (with bytes already read past the HTTP head in ``initial``)."""

    def __init__(self, sock: socket.socket, initial: bytes = b"", *, expect_masked: bool,
                 max_message: int = MAX_MESSAGE, activity: Activity | None = None) -> None:
        self.sock = sock
        self._buf = bytearray(initial)
        self.expect_masked = expect_masked
        self.max_message = max_message
        self.activity = activity

    def _exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            if self.activity is not None:
                self.activity.wait_readable()
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("connection closed")
            self._buf += data
            if self.activity is not None:
                self.activity.touch()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def frame(self) -> Frame:
        b0, b1 = self._exact(2)
        if b0 & 0x70:
            raise WebSocketError("reserved bits set (no extension was negotiated)")
        masked, n = bool(b1 & 0x80), b1 & 0x7F
        if masked != self.expect_masked:
            raise WebSocketError("client frames must be masked" if self.expect_masked
                                 else "server frames must not be masked")
        if n == 126:
            (n,) = struct.unpack(">H", self._exact(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", self._exact(8))
        opcode = b0 & 0x0F
        if opcode >= 0x8 and (not b0 & 0x80 or n > 125):
            raise WebSocketError("control frames must be final and at most 125 bytes")
        if n > self.max_message:  # refused from the length field: nothing of it is read
            raise TooBig(f"frame of {n} bytes is larger than {self.max_message}")
        key = self._exact(4) if masked else b""
        payload = self._exact(n)
        if masked:
            payload = apply_mask(payload, key)
        return Frame(bool(b0 & 0x80), opcode, payload)

    def message(self) -> tuple[int, bytes]:
        """The next data message (fragments joined) or control frame, as ``(opcode, payload)``."""
        first = self.frame()
        if first.opcode >= 0x8 or first.fin:
            if first.opcode == OP_CONT:
                raise WebSocketError("continuation frame without a start")
            return first.opcode, first.payload
        parts, size = [first.payload], len(first.payload)
        while True:
            nxt = self.frame()
            if nxt.opcode >= 0x8:
                raise WebSocketError("control frame inside a fragmented message is not supported")
            if nxt.opcode != OP_CONT:
                raise WebSocketError("new message before the previous one ended")
            parts.append(nxt.payload)
            size += len(nxt.payload)
            if size > self.max_message:
                raise TooBig(f"message of more than {self.max_message} bytes")
            if nxt.fin:
                return first.opcode, b"".join(parts)


class ChannelSocket:
    """A server-side WebSocket carrying Kubernetes channel messages."""

    def __init__(self, sock: socket.socket, initial: bytes, protocol: str, limits: Limits = DEFAULT) -> None:
        self.sock = sock
        self.protocol = protocol
        self.base64 = "base64." in protocol
        self.limits = limits
        self.activity = Activity(sock, limits.idle_timeout)
        sock.settimeout(limits.send_timeout)  # bounds sendall; reads wait in Activity.wait_readable
        self.reader = FrameReader(sock, initial, expect_masked=True, max_message=limits.max_frame,
                                  activity=self.activity)
        self._send_lock = threading.Lock()
        self.closed = False
        self.error = ""

    def _send(self, opcode: int, payload: bytes) -> None:
        with self._send_lock:
            if self.closed and opcode != OP_CLOSE:
                raise OSError("websocket closed")
            self.sock.sendall(encode_frame(opcode, payload))
        self.activity.touch()

    def send(self, channel: int, data: bytes) -> None:
        if self.base64:
            self._send(OP_TEXT, str(channel).encode() + base64.b64encode(data))
        else:
            self._send(OP_BINARY, bytes([channel]) + data)

    def receive(self) -> tuple[int, bytes] | None:
        """The next ``(channel, data)``; ``None`` when the peer closed.  Pings are answered here."""
        while True:
            try:
                opcode, payload = self.reader.message()
            except (EOFError, OSError):
                return None
            except WebSocketError as exc:  # the peer broke the protocol or sent too much: only it is dropped
                self.close(exc.close_code, str(exc))
                self.error = str(exc)
                return None
            except IdleTimeout as exc:
                self.close(1001, f"idle: {exc}")
                self.error = f"idle: {exc}"
                return None
            if opcode == OP_PING:
                with contextlib.suppress(OSError):
                    self._send(OP_PONG, payload)
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                with contextlib.suppress(OSError):
                    self._send(OP_CLOSE, payload[:2])
                self.closed = True
                return None
            if not payload:
                continue
            if opcode == OP_TEXT and self.base64:
                try:
                    return int(chr(payload[0])), base64.b64decode(payload[1:])
                except ValueError:
                    self.close(CLOSE_PROTOCOL_ERROR, "bad base64 channel message")
                    self.error = "bad base64 channel message"
                    return None
            return payload[0], payload[1:]

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        with contextlib.suppress(OSError):
            self._send(OP_CLOSE, struct.pack(">H", code) + reason.encode()[:120])
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
