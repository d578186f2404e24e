"""Just enough HTTP/1.1 for an upgrade: read one request head, write one response.

The streaming server only ever answers upgrade requests (or refuses them), so a full HTTP server would only add
ways to keep a connection half-used.  Anything that is not a well-formed request head within the limits is a
400 and the connection ends.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

MAX_HEAD = 64 * 1024  # virtlet.stream.limits.Limits.max_head
HEAD_TIMEOUT = 10.0  # virtlet.stream.limits.Limits.head_timeout
REASONS = {101: "Switching Protocols", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 500: "Internal Server Error", 503: "Service Unavailable"}


class BadRequest(Exception):
    """The request head is malformed (answered with 400)."""


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, list[str]] = field(default_factory=dict)  # lowercase names
    rest: bytes = b""  # bytes that came after the head (already the upgraded protocol)

    def header(self, name: str) -> str:
        values = self.headers.get(name.lower())
        return values[0].strip() if values else ""

    def header_list(self, name: str) -> list[str]:
        """All values of a header, comma-separated items split out, in order."""
        out = []
        for value in self.headers.get(name.lower(), []):
            out += [v.strip() for v in value.split(",") if v.strip()]
        return out


def read_request(sock: socket.socket, timeout: float = HEAD_TIMEOUT, max_head: int = MAX_HEAD) -> Request | None:
    """The next request head; ``None`` when the peer closed before sending one.

    ``timeout`` bounds the whole head, not each read: a client trickling a byte every few seconds is cut off
    when it runs out (slowloris).  ``max_head`` bounds its size; no read asks for more than fits.
    """
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > max_head:
            raise BadRequest(f"request head larger than {max_head} bytes")
        left = deadline - time.monotonic()
        if left <= 0:
            raise BadRequest(f"request head not received within {timeout:g}s")
        sock.settimeout(left)
        try:
            data = sock.recv(max_head + 4 - len(buf) if len(buf) < max_head else 1)
        except TimeoutError as exc:
            raise BadRequest(f"request head not received within {timeout:g}s") from exc
        if not data:
            if buf:
                raise BadRequest("connection closed inside the request head")
            return None
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    sock.settimeout(None)
    try:
        lines = head.decode("latin-1").split("\r\n")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest("undecodable head") from exc
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        raise BadRequest(f"bad request line {lines[0][:100]!r}")
    method, target, _ = parts
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(f"bad header line {line[:100]!r}")
        headers.setdefault(name.lower(), []).append(value.strip())
    url = urlsplit(target)
    return Request(method=method.upper(), path=unquote(url.path), query=parse_qs(url.query), headers=headers,
                   rest=rest)


def respond(sock: socket.socket, status: int, body: str = "", headers: dict[str, str] | None = None) -> None:
    """Write a response head (and a text body for errors)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    data = body.encode()
    if status != 101:
        lines += ["Content-Type: text/plain; charset=utf-8", f"Content-Length: {len(data)}", "Connection: close"]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)
