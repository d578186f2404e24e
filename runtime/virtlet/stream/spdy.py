"""SPDY/3.1 frames: encode and decode, and the zlib-compressed header blocks.

Why our own: the kubelet, ``kubectl`` and ``crictl`` still speak SPDY/3.1 to a CRI streaming server, and no
maintained Python library does.  Only what Kubernetes uses is here: SYN_STREAM, SYN_REPLY, RST_STREAM,
SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE and DATA frames.

Wire facts (SPDY/3 draft, section 2): every frame has an 8-byte head.  A control frame starts with the control
bit, version 3 (15 bits) and type (16 bits); a data frame with a 0 bit and the 31-bit stream id.  Both continue
with 8 bits of flags and a 24-bit length.  Header blocks are ``count, (len, name, len, value)*`` with 32-bit
big-endian lengths, multiple values joined by NUL, names lowercase; each direction of a connection compresses
its blocks with ONE zlib stream primed with the fixed SPDY/3 dictionary, flushed (Z_SYNC_FLUSH) per block.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

VERSION = 3
SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
CANCEL = 5
INTERNAL_ERROR = 6

MAX_LENGTH = (1 << 24) - 1
MAX_HEADER_BLOCK = 1 << 20  # a decompressed header block larger than this is an attack, not a request


class SpdyError(Exception):
    """A peer sent bytes that are not SPDY/3.1 (the connection must end)."""


def _build_dictionary() -> bytes:
    # The SPDY/3 header dictionary: length-prefixed well-known words, then a run of common value text.
    words = (
        "options head post put delete trace accept accept-charset accept-encoding accept-language "
        "accept-ranges age allow authorization cache-control connection content-base content-encoding "
        "content-language content-length content-location content-md5 content-range content-type date etag "
        "expect expires from host if-match if-modified-since if-none-match if-range if-unmodified-since "
        "last-modified location max-forwards pragma proxy-authenticate proxy-authorization range referer "
        "retry-after server te trailer transfer-encoding upgrade user-agent vary via warning www-authenticate "
        "method get status"
    ).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
    head = b"".join(struct.pack(">I", len(w)) + w.encode() for w in words)
    tail = (
        "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
        "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
        "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
        "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    )
    return head + tail.encode()


DICTIONARY = _build_dictionary()
assert len(DICTIONARY) == 1423, len(DICTIONARY)

Headers = dict[str, list[str]]


def header(headers: Mapping[str, Sequence[str]], name: str) -> str:
    """The first value of ``name`` (case-insensitive), or ``""``."""
    values = headers.get(name.lower()) or []
    return values[0] if values else ""


class HeaderCodec:
    """The two zlib contexts of one connection end: one compresses what we send, one inflates what we get."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zlib.DEFLATED, 15, 9,
                                         zlib.Z_DEFAULT_STRATEGY, DICTIONARY)
        self._inflate = zlib.decompressobj(15, DICTIONARY)

    def encode(self, headers: Mapping[str, Sequence[str] | str]) -> bytes:
        parts = [struct.pack(">I", len(headers))]
        for name, values in headers.items():
            if isinstance(values, str):
                values = [values]
            key = name.lower().encode()
            value = "\x00".join(values).encode()
            parts += [struct.pack(">I", len(key)), key, struct.pack(">I", len(value)), value]
        raw = b"".join(parts)
        return self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def decode(self, block: bytes) -> Headers:
        try:
            raw = self._inflate.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise SpdyError(f"header block does not inflate: {exc}") from exc
        if self._inflate.unconsumed_tail:
            raise SpdyError("header block too large")
        return parse_header_block(raw)


def parse_header_block(raw: bytes) -> Headers:
    """An uncompressed header block into ``{lowercase-name: [values]}``."""
    try:
        (count,), pos = struct.unpack_from(">I", raw), 4
        out: Headers = {}
        for _ in range(count):
            (n,) = struct.unpack_from(">I", raw, pos)
            name = raw[pos + 4:pos + 4 + n]
            pos += 4 + n
            (v,) = struct.unpack_from(">I", raw, pos)
            value = raw[pos + 4:pos + 4 + v]
            pos += 4 + v
            if len(name) != n or len(value) != v or not name:
                raise SpdyError("truncated header block")
            key = name.decode("latin-1")
            if key != key.lower():
                raise SpdyError(f"header name {key!r} is not lowercase")
            out.setdefault(key, []).extend(value.decode("latin-1").split("\x00"))
        return out
    except struct.error as exc:
        raise SpdyError("truncated header block") from exc


# -- frames -------------------------------------------------------------------------------------------------
@dataclass
class Frame:
    flags: int = 0


@dataclass
class DataFrame(Frame):
    stream_id: int = 0
    data: bytes = b""


@dataclass
class SynStream(Frame):
    stream_id: int = 0
    associated_id: int = 0
    priority: int = 0
    headers: Headers = field(default_factory=dict)


@dataclass
class SynReply(Frame):
    stream_id: int = 0
    headers: Headers = field(default_factory=dict)


@dataclass
class HeadersFrame(Frame):
    stream_id: int = 0
    headers: Headers = field(default_factory=dict)


@dataclass
class RstStream(Frame):
    stream_id: int = 0
    status: int = 0


@dataclass
class Settings(Frame):
    entries: list[tuple[int, int, int]] = field(default_factory=list)  # (flags, id, value)


@dataclass
class Ping(Frame):
    ping_id: int = 0


@dataclass
class GoAway(Frame):
    last_good_id: int = 0
    status: int = 0


@dataclass
class WindowUpdate(Frame):
    stream_id: int = 0
    delta: int = 0


@dataclass
class UnknownControl(Frame):
    frame_type: int = 0
    payload: bytes = b""


def _control(frame_type: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_LENGTH:
        raise SpdyError("control frame too large")
    return struct.pack(">HHI", 0x8000 | VERSION, frame_type, (flags << 24) | len(payload)) + payload


def encode(frame: Frame, codec: HeaderCodec | None = None) -> bytes:
    """The wire bytes of ``frame``; frames with headers need the connection's ``codec``."""
    if isinstance(frame, DataFrame):
        if len(frame.data) > MAX_LENGTH:
            raise SpdyError("data frame too large")
        return struct.pack(">II", frame.stream_id & 0x7FFFFFFF, (frame.flags << 24) | len(frame.data)) + frame.data
    if isinstance(frame, SynStream):
        assert codec is not None
        body = struct.pack(">IIBB", frame.stream_id & 0x7FFFFFFF, frame.associated_id & 0x7FFFFFFF,
                           (frame.priority & 7) << 5, 0)
        return _control(SYN_STREAM, frame.flags, body + codec.encode(frame.headers))
    if isinstance(frame, SynReply | HeadersFrame):
        assert codec is not None
        kind = SYN_REPLY if isinstance(frame, SynReply) else HEADERS
        return _control(kind, frame.flags, struct.pack(">I", frame.stream_id & 0x7FFFFFFF)
                        + codec.encode(frame.headers))
    if isinstance(frame, RstStream):
        return _control(RST_STREAM, 0, struct.pack(">II", frame.stream_id & 0x7FFFFFFF, frame.status))
    if isinstance(frame, Settings):
        body = struct.pack(">I", len(frame.entries)) + b"".join(
            struct.pack(">II", (f << 24) | (i & 0xFFFFFF), v) for f, i, v in frame.entries)
        return _control(SETTINGS, frame.flags, body)
    if isinstance(frame, Ping):
        return _control(PING, 0, struct.pack(">I", frame.ping_id))
    if isinstance(frame, GoAway):
        return _control(GOAWAY, 0, struct.pack(">II", frame.last_good_id & 0x7FFFFFFF, frame.status))
    if isinstance(frame, WindowUpdate):
        return _control(WINDOW_UPDATE, 0, struct.pack(">II", frame.stream_id & 0x7FFFFFFF,
                                                      frame.delta & 0x7FFFFFFF))
    raise SpdyError(f"cannot encode {type(frame).__name__}")


def parse_head(head: bytes) -> tuple[bool, int, int, int]:
    """``(is_control, type_or_stream_id, flags, length)`` of an 8-byte frame head."""
    first, second = struct.unpack(">II", head)
    flags, length = second >> 24, second & 0xFFFFFF
    if first & 0x80000000:
        version = (first >> 16) & 0x7FFF
        if version != VERSION:
            raise SpdyError(f"SPDY version {version} is not supported (only 3)")
        return True, first & 0xFFFF, flags, length
    return False, first & 0x7FFFFFFF, flags, length


def decode(head: bytes, payload: bytes, codec: HeaderCodec) -> Frame:
    """One frame from its head and payload (header blocks go through ``codec`` in arrival order)."""
    is_control, kind, flags, length = parse_head(head)
    if len(payload) != length:
        raise SpdyError("truncated frame")
    if not is_control:
        return DataFrame(flags=flags, stream_id=kind, data=payload)
    try:
        if kind == SYN_STREAM:
            sid, assoc, pri, _slot = struct.unpack_from(">IIBB", payload)
            return SynStream(flags=flags, stream_id=sid & 0x7FFFFFFF, associated_id=assoc & 0x7FFFFFFF,
                             priority=pri >> 5, headers=codec.decode(payload[10:]))
        if kind in (SYN_REPLY, HEADERS):
            (sid,) = struct.unpack_from(">I", payload)
            cls = SynReply if kind == SYN_REPLY else HeadersFrame
            return cls(flags=flags, stream_id=sid & 0x7FFFFFFF, headers=codec.decode(payload[4:]))
        if kind == RST_STREAM:
            sid, status = struct.unpack_from(">II", payload)
            return RstStream(flags=flags, stream_id=sid & 0x7FFFFFFF, status=status)
        if kind == SETTINGS:
            (n,) = struct.unpack_from(">I", payload)
            entries = []
            for i in range(n):
                fid, value = struct.unpack_from(">II", payload, 4 + 8 * i)
                entries.append((fid >> 24, fid & 0xFFFFFF, value))
            return Settings(flags=flags, entries=entries)
        if kind == PING:
            return Ping(flags=flags, ping_id=struct.unpack_from(">I", payload)[0])
        if kind == GOAWAY:
            last, status = struct.unpack_from(">II", payload) if len(payload) >= 8 else (
                struct.unpack_from(">I", payload)[0], 0)
            return GoAway(flags=flags, last_good_id=last & 0x7FFFFFFF, status=status)
        if kind == WINDOW_UPDATE:
            sid, delta = struct.unpack_from(">II", payload)
            return WindowUpdate(flags=flags, stream_id=sid & 0x7FFFFFFF, delta=delta & 0x7FFFFFFF)
    except struct.error as exc:
        raise SpdyError(f"control frame type {kind} is truncated") from exc
    return UnknownControl(flags=flags, frame_type=kind, payload=payload)
