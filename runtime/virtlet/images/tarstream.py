"""A streaming tar reader for containerDisk layers: one pass, no seeking, payload read straight into the caller's
buffer.

Why not ``tarfile``: in stream mode (``r|``) it reads through a 10 KiB Python-level buffer with a bytes
concatenation per read, which capped registry pulls at a fifth of a plain download (``bench/image_pull.py``).
This reader parses the 512-byte headers itself and hands the member's bytes to ``readinto`` of the
underlying stream, so a 1 MiB read of the disk file is one call into the socket.

What it understands, as far as a containerDisk needs: ustar and GNU headers (octal and base-256 sizes, the
ustar name prefix, header checksums), GNU long names (``L``), pax extended headers (``x``: ``path`` and
``size``; global ``g`` headers are skipped) and the end-of-archive zero block.  Every byte it reads for itself
(headers, padding, skipped members) is given to ``on_meta``, in stream order, so the caller can hash the
whole stream.  Hostile input is bounded: a long name or pax header larger than ``MAX_META`` is refused, a
stream ending inside a header or member raises ``TarError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

BLOCK = 512
MAX_META = 1 << 20  # a long name or pax header larger than this is not a real one
SKIP_CHUNK = 1 << 20
REGULAR = (b"0", b"\0", b"7")  # regular file, old regular file, contiguous file
SPARSE = b"S"


class TarError(ValueError):
    """The stream is not a readable tar archive (the message says where)."""


@dataclass(frozen=True)
class Member:
    name: str
    size: int
    type: bytes  # the typeflag byte

    def isreg(self) -> bool:
        return self.type in REGULAR


class TarStream:
    """``next()`` gives the members in order (None at the end); between two calls, ``readinto`` reads the
    current member's content (what is left unread is skipped by the next ``next()``)."""

    def __init__(self, read_into: Callable[[memoryview], int], on_meta: Callable[[bytes], None]) -> None:
        self._read_into = read_into
        self._on_meta = on_meta
        self._left = 0  # unread bytes of the current member's content
        self._pad = 0  # padding after it

    def next(self) -> Member | None:
        self._skip(self._left + self._pad)
        self._left = self._pad = 0
        long_name: str | None = None
        pax: dict[str, str] = {}
        while True:
            header = self._exact(BLOCK, allow_eof=True)
            if not header or header == bytes(BLOCK):
                return None  # end of archive (a zero block, or a stream without one)
            _check_sum(header)
            kind, size = header[156:157], _size(header[124:136])
            if kind in (b"L", b"x", b"g", b"K"):
                if size > MAX_META:
                    raise TarError(f"a {kind.decode()!r} header of {size} bytes (more than {MAX_META})")
                data = self._exact(size)
                self._skip(-size % BLOCK)
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    pax = _pax(data)
                continue
            name = long_name if long_name is not None else _name(header)
            name = pax.get("path", name)
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError as exc:
                    raise TarError(f"pax size {pax['size'][:40]!r} is not a number") from exc
                if size < 0:
                    raise TarError("negative pax size")
            if kind in (b"1", b"2", b"3", b"4", b"5", b"6"):  # links, devices, dirs, fifos: no content
                size = 0
            if any(k.startswith("GNU.sparse.") for k in pax):  # pax sparse: the content holds a map, not the file
                kind = SPARSE
            self._left, self._pad = size, -size % BLOCK
            return Member(name, size, kind)

    def readinto(self, view: memoryview) -> int:
        """Up to ``len(view)`` bytes of the current member's content (not given to ``on_meta``); 0 at its end.
        A stream ending inside the member raises ``TarError``."""
        want = min(len(view), self._left)
        if not want:
            return 0
        n = self._read_into(view[:want])
        if not n:
            raise TarError(f"the archive ends {self._left} bytes before the end of a member")
        self._left -= n
        return n

    def drain(self) -> None:
        """Read (and give to ``on_meta``) whatever follows the end of the archive."""
        self._skip(self._left + self._pad)
        self._left = self._pad = 0
        buf = bytearray(SKIP_CHUNK)
        while n := self._read_into(memoryview(buf)):
            self._on_meta(bytes(buf[:n]))

    def _skip(self, n: int) -> None:
        while n > 0:
            chunk = min(n, SKIP_CHUNK)
            self._exact(chunk)
            n -= chunk

    def _exact(self, n: int, allow_eof: bool = False) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            r = self._read_into(view[got:])
            if not r:
                if allow_eof and got == 0:
                    return b""
                self._on_meta(bytes(buf[:got]))  # so the caller's hash has seen every byte read
                raise TarError(f"the archive ends inside a header or padding ({got} of {n} bytes)")
            got += r
        data = bytes(buf)
        self._on_meta(data)
        return data


def _name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX ustar: a prefix (GNU uses these bytes for other fields)
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _size(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        if field[0] == 0xFF:
            raise TarError("negative member size")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError as exc:
        raise TarError(f"member size {field!r} is not octal") from exc


def _check_sum(header: bytes) -> None:
    text = header[148:156].split(b"\0", 1)[0].strip()
    try:
        stored = int(text, 8)
    except ValueError as exc:
        raise TarError("a header's checksum field is not octal") from exc
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b >= 0x80)
    if stored not in (unsigned, signed):
        raise TarError("a header checksum does not match (not a tar archive, or a corrupt one)")


def _pax(data: bytes) -> dict[str, str]:
    """``"<len> <key>=<value>\\n"`` records."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError as exc:
            raise TarError("a pax header record has no length") from exc
        if space < 0 or length <= space - pos or pos + length > len(data):
            raise TarError("a pax header record is malformed")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out
