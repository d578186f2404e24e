"""The CRI log file format: ``<RFC3339Nano> <stream> <F|P> <text>`` lines, as the kubelet reads them.

Writing (``cri_line``, ``format_rfc3339nano``) is used by the console writer; parsing (``parse_cri_log``,
``read_cri_lines``) by tests, tools and anything that wants the whole lines back.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

#: A line longer than this is written as several ``P`` entries (containerd uses the same 16 KiB limit).
MAX_LINE = 16 * 1024
#: The stream every console line is written to (a serial console has one).
STREAM = b"stdout"


def format_rfc3339nano(ns: int) -> str:
    """``ns`` since the epoch as Go's ``time.RFC3339Nano`` in UTC (trailing zeros of the fraction dropped)."""
    secs, frac = divmod(ns, 1_000_000_000)
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))
    if frac:
        base += "." + f"{frac:09d}".rstrip("0")
    return base + "Z"


_TS_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def parse_rfc3339nano(ts: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 timestamp with up to 9 fraction digits.

    Raises ``ValueError`` when ``ts`` is not such a timestamp (``datetime`` stops at microseconds).
    """
    m = _TS_RE.match(ts)
    if not m:
        raise ValueError(f"not an RFC3339Nano timestamp: {ts!r}")
    year, mon, day, hour, minute, sec = (int(x) for x in m.group(1, 2, 3, 4, 5, 6))
    secs = calendar.timegm((year, mon, day, hour, minute, sec, 0, 0, 0))
    frac = int((m.group(7) or "").ljust(9, "0"))
    zone = m.group(8)
    if zone != "Z":
        sign = 1 if zone[0] == "+" else -1
        secs -= sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return secs * 1_000_000_000 + frac


class CriLogEntry(NamedTuple):
    """One line of a CRI log file: timestamp, stream (stdout/stderr), tag (F full, P partial) and text."""

    ts: str
    stream: str
    tag: str
    text: str


def parse_cri_log(text: str | bytes) -> list[CriLogEntry]:
    """Split a CRI log file into entries; raises ``ValueError`` on a malformed line.

    Bytes are decoded with ``surrogateescape`` so invalid UTF-8 from a guest survives a round trip.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    out: list[CriLogEntry] = []
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for n, line in enumerate(lines, 1):
        parts = line.split(" ", 3)
        if len(parts) < 3 or parts[1] not in ("stdout", "stderr") or parts[2] not in ("F", "P"):
            raise ValueError(f"line {n} is not a CRI log line: {line[:80]!r}")
        out.append(CriLogEntry(parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else ""))
    return out


def join_cri_entries(entries: Iterable[CriLogEntry]) -> list[str]:
    """Whole lines from entries: ``P`` pieces join the ``F`` that ends them (a trailing ``P`` ends one)."""
    lines: list[str] = []
    cur: list[str] = []
    for e in entries:
        cur.append(e.text)
        if e.tag == "F":
            lines.append("".join(cur))
            cur = []
    if cur:
        lines.append("".join(cur))
    return lines


def read_cri_lines(path: Path) -> list[str]:
    """The whole lines of a CRI log file (empty list when it does not exist yet): a helper for tests."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return join_cri_entries(parse_cri_log(data))


def cri_line(ts: bytes, tag: bytes, text: bytes) -> bytes:
    """One CRI log line (``tag`` is ``F`` for a whole line, ``P`` for a piece of one)."""
    return ts + b" " + STREAM + b" " + tag + b" " + text + b"\n"
