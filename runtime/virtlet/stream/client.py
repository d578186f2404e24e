"""A small SPDY client for streaming URLs: what ``virtletctl`` (and the tests) use to attach and forward ports.

``upgrade(url, protocols)`` does the HTTP upgrade; ``AttachClient`` opens the remote-command streams;
``ExecClient`` runs one command (stdin sent whole, output read to its end, the Status with its exit code);
``PortForwardClient`` opens one (error, data) stream pair per forwarded connection on one SPDY connection
(the URL's token is single-use, so one connection carries every forwarded connection).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from virtlet.stream.spdy_conn import SpdyConnection, SpdyStream, StreamClosed


class UpgradeError(Exception):
    """The server refused the upgrade; ``status`` is its HTTP status (403 for a bad token)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body.strip()}")
        self.status = status
        self.body = body


@dataclass
class Upgraded:
    sock: socket.socket
    protocol: str
    rest: bytes


def _connect(url: str, timeout: float) -> tuple[socket.socket, str, str]:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// streaming URLs are supported, got {url!r}")
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return sock, f"{parts.hostname}:{parts.port}", target


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise UpgradeError(0, "connection closed before a response")
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def upgrade(url: str, protocols: list[str], *, transport: str = "spdy", method: str = "POST",
            timeout: float = 10.0, extra_headers: dict[str, str] | None = None) -> Upgraded:
    """Open ``url`` and upgrade it to SPDY/3.1 (or ``transport="websocket"``), offering ``protocols``."""
    sock, hostport, target = _connect(url, timeout)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {hostport}", "Connection: Upgrade"]
    if transport == "spdy":
        lines.append("Upgrade: SPDY/3.1")
        lines += [f"X-Stream-Protocol-Version: {p}" for p in protocols]
    else:
        lines += ["Upgrade: websocket", "Sec-WebSocket-Version: 13",
                  f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}"]
        if protocols:
            lines.append(f"Sec-WebSocket-Protocol: {', '.join(protocols)}")
    lines += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
    try:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status, headers, rest = _read_head(sock)
        if status != 101:
            sock.settimeout(2)
            body = rest
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    body += chunk
            raise UpgradeError(status, body.decode(errors="replace"))
    except BaseException:
        sock.close()
        raise
    sock.settimeout(None)
    proto = headers.get("x-stream-protocol-version" if transport == "spdy" else "sec-websocket-protocol", "")
    return Upgraded(sock, proto, rest)


class AttachClient:
    """SPDY remote-command client for an attach URL (stdout, optional stdin, TTY)."""

    PROTOCOLS = ["v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]

    def __init__(self, url: str, *, stdin: bool = True, tty: bool = True, protocols: list[str] | None = None,
                 timeout: float = 10.0) -> None:
        up = upgrade(url, protocols or self.PROTOCOLS, timeout=timeout)
        self.protocol = up.protocol
        self.conn = SpdyConnection(up.sock, server=False, initial=up.rest).start()
        self.error = self.conn.open_stream({"streamType": "error"}, timeout)
        self.error.close()  # the client never writes on the error stream
        self.stdin: SpdyStream | None = None
        if stdin:
            self.stdin = self.conn.open_stream({"streamType": "stdin"}, timeout)
        self.stdout = self.conn.open_stream({"streamType": "stdout"}, timeout)
        self.resize: SpdyStream | None = None
        if tty and self.protocol not in ("", "channel.k8s.io", "v2.channel.k8s.io"):
            self.resize = self.conn.open_stream({"streamType": "resize"}, timeout)

    def send_resize(self, width: int, height: int) -> None:
        if self.resize is not None:
            self.resize.write(json.dumps({"Width": width, "Height": height}).encode())

    def write(self, data: bytes) -> None:
        if self.stdin is None:
            raise StreamClosed("attached without stdin")
        self.stdin.write(data)

    def read(self, timeout: float | None = None) -> bytes | None:
        """Console output; ``b""`` when the session ended; ``None`` on timeout."""
        return self.stdout.read(timeout)

    def status(self, timeout: float = 10.0) -> dict[str, Any] | str:
        """What the server wrote on the error stream at the end (v4: decoded JSON Status)."""
        return _read_status(self.error, self.protocol, timeout)

    def close(self) -> None:
        for s in (self.stdin, self.stdout, self.resize):
            if s is not None:
                s.close()
        self.conn.close(grace=1.0)


class ExecClient:
    """SPDY remote-command client for an exec URL: ``run()`` sends stdin, reads stdout and stderr to their end
    and returns them with the Status (v4: decoded JSON; exit code in ``exit_code(status)``)."""

    PROTOCOLS = AttachClient.PROTOCOLS

    def __init__(self, url: str, *, stdin: bool = False, stderr: bool = True, protocols: list[str] | None = None,
                 timeout: float = 10.0) -> None:
        up = upgrade(url, protocols or self.PROTOCOLS, timeout=timeout)
        self.protocol = up.protocol
        self.conn = SpdyConnection(up.sock, server=False, initial=up.rest).start()
        self.error = self.conn.open_stream({"streamType": "error"}, timeout)
        self.error.close()
        self.stdin = self.conn.open_stream({"streamType": "stdin"}, timeout) if stdin else None
        self.stdout = self.conn.open_stream({"streamType": "stdout"}, timeout)
        self.stderr = self.conn.open_stream({"streamType": "stderr"}, timeout) if stderr else None

    def run(self, stdin: bytes = b"", timeout: float = 60.0) -> tuple[bytes, bytes, dict[str, Any] | str]:
        if self.stdin is not None:
            if stdin:
                self.stdin.write(stdin)
            self.stdin.close()  # EOF: the command runs now
        got: dict[str, bytes] = {"stdout": b"", "stderr": b""}

        def drain(name: str, stream: SpdyStream) -> None:
            while chunk := stream.read(timeout):
                got[name] += chunk

        threads = [threading.Thread(target=drain, args=(n, s), daemon=True)
                   for n, s in (("stdout", self.stdout), ("stderr", self.stderr)) if s is not None]
        for t in threads:
            t.start()
        status = _read_status(self.error, self.protocol, timeout)
        for t in threads:
            t.join(timeout)
        return got["stdout"], got["stderr"], status

    @staticmethod
    def exit_code(status: dict[str, Any] | str) -> int:
        """0 for Success; the ExitCode cause of a NonZeroExitCode Status; 1 for any other failure."""
        if isinstance(status, str):
            return 1 if status else 0
        if status.get("status") == "Success":
            return 0
        for cause in (status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                return int(cause.get("message", "1"))
        return 1

    def close(self) -> None:
        for s in (self.stdin, self.stdout, self.stderr):
            if s is not None:
                s.close()
        self.conn.close(grace=1.0)


def _read_status(error: SpdyStream, protocol: str, timeout: float) -> dict[str, Any] | str:
    chunks = []
    while True:
        data = error.read(timeout)
        if not data:
            break
        chunks.append(data)
    text = b"".join(chunks).decode(errors="replace")
    if protocol.startswith(("v4.", "v5.")) and text:
        status: dict[str, Any] = json.loads(text)  # a Kubernetes metav1.Status
        return status
    return text


class PortForwardClient:
    """SPDY port-forward client: ``open(port)`` gives a socket-like stream pair per connection."""

    def __init__(self, url: str, timeout: float = 10.0) -> None:
        up = upgrade(url, ["portforward.k8s.io"], timeout=timeout)
        self.conn = SpdyConnection(up.sock, server=False, initial=up.rest).start()
        self._next = 0
        self._lock = threading.Lock()
        self.timeout = timeout

    def open(self, port: int) -> tuple[SpdyStream, SpdyStream]:
        """``(data, error)`` streams for one new connection to ``port``."""
        with self._lock:
            rid = str(self._next)
            self._next += 1
        error = self.conn.open_stream({"streamType": "error", "port": str(port), "requestID": rid}, self.timeout)
        error.close()
        data = self.conn.open_stream({"streamType": "data", "port": str(port), "requestID": rid}, self.timeout)
        return data, error

    def serve_local(self, local: socket.socket, port: int) -> None:
        """Copy between an accepted local socket and a new stream pair until both sides end."""
        try:
            data, error = self.open(port)
        except StreamClosed:
            local.close()
            return

        def down() -> None:
            while chunk := data.read():
                try:
                    local.sendall(chunk)
                except OSError:
                    break
            with contextlib.suppress(OSError):
                local.shutdown(socket.SHUT_WR)

        def errors_() -> None:
            msg = b""
            while chunk := error.read():
                msg += chunk
            if msg:
                print(f"port-forward: {msg.decode(errors='replace')}", file=sys.stderr)
                with contextlib.suppress(OSError):
                    local.shutdown(socket.SHUT_RDWR)

        t_down = threading.Thread(target=down, daemon=True)
        t_err = threading.Thread(target=errors_, daemon=True)
        t_down.start()
        t_err.start()
        try:
            while True:
                try:
                    chunk = local.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                data.write(chunk)
        except StreamClosed:
            pass
        finally:
            data.close()
            t_down.join()
            local.close()

    def close(self) -> None:
        self.conn.close(grace=1.0)
