"""VM serial console -> CRI log file, exactly once across virtletd restarts.

Why this shape: libvirt's virtlogd appends every byte the guest prints to a RAW file (``<serial type='unix'>``
with ``<log file=RAW append='on'/>``) whether or not virtletd runs, so nothing is lost while virtletd is down.
virtletd only has to *tail* RAW and turn bytes into CRI log lines (``<RFC3339Nano> stdout F|P <text>``) for
``kubectl logs``.  To emit every line exactly once across a SIGKILL, the writer persists, after each batch,
where it is in RAW (inode, offset, a fingerprint of the file's head) and how long the CRI log was after the
batch.  On start it cuts the CRI log back to that length (bytes written after the last persisted state will be
produced again from RAW) and continues from the recorded RAW offset.

virtlogd rotates RAW by renaming ``RAW`` -> ``RAW.0`` -> ``RAW.1`` ... and starting a fresh ``RAW``; the
writer follows files by inode and finishes the old one before moving to the next, so a line spanning a
rotation comes out whole.  The kubelet rotates the CRI log by renaming it and calling ReopenContainerLog,
which lands in ``reopen()``.
"""

from __future__ import annotations

import calendar
import contextlib
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from virtlet import errors, failpoints

log = logging.getLogger(__name__)

#: A line longer than this is written as several ``P`` entries (containerd uses the same 16 KiB limit).
MAX_LINE = 16 * 1024
#: An unterminated line is written as a ``P`` entry once it has waited this long for its newline.
PARTIAL_DELAY = 0.5
#: How often the thread looks at RAW.
POLL_INTERVAL = 0.15
#: At most this many RAW bytes are turned into CRI lines per persisted batch (bounds memory when catching up).
BATCH_BYTES = 1024 * 1024
#: Bytes at the start of a RAW file kept in the state, to tell a reused inode number from the file we read.
HEAD_BYTES = 64
#: The failpoint between appending to the CRI log and persisting the state (the crash window tests use).
FAILPOINT_AFTER_CRI_WRITE = "console_log_after_cri_write"

STATE_VERSION = 1
STREAM = b"stdout"


# ---------------------------------------------------------------------------------------------- CRI format


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


def _cri_line(ts: bytes, tag: bytes, text: bytes) -> bytes:
    return ts + b" " + STREAM + b" " + tag + b" " + text + b"\n"


# ---------------------------------------------------------------------------------------------- state


@dataclass
class LogState:
    """Where the writer is: persisted after every batch, read back on start."""

    raw_dev: int | None = None
    raw_inode: int | None = None
    raw_offset: int = 0
    raw_head: str = ""  # hex of the first min(HEAD_BYTES, raw_offset) bytes of that RAW file
    cri_dev: int | None = None
    cri_inode: int | None = None
    cri_size: int = 0

    @classmethod
    def load(cls, path: Path) -> LogState | None:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise errors.Internal(f"console log state {path} is unreadable ({exc}); remove it to start over "
                                  "(the CRI log may then repeat lines)") from exc
        if doc.get("version") != STATE_VERSION:
            raise errors.Internal(f"console log state {path} has version {doc.get('version')!r}, "
                                  f"this virtletd understands {STATE_VERSION}")
        doc.pop("version")
        try:
            return cls(**doc)
        except TypeError as exc:
            raise errors.Internal(f"console log state {path} has unknown fields ({exc})") from exc

    def save(self, path: Path, fsync: bool = True) -> None:
        """Atomically replace ``path`` (tmp + fsync + rename), so a crash leaves the old or the new state."""
        doc = {"version": STATE_VERSION, **self.__dict__}
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, json.dumps(doc, sort_keys=True).encode())
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# ---------------------------------------------------------------------------------------------- RAW files


class _RawFile:
    """One open RAW generation; the fd keeps it readable after virtlogd renames or deletes it."""

    def __init__(self, fd: int) -> None:
        st = os.fstat(fd)
        self.fd = fd
        self.ident = (st.st_dev, st.st_ino)

    def head(self, n: int) -> bytes:
        return os.pread(self.fd, min(n, HEAD_BYTES), 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class _Segment:
    """A run of pending (read but not yet written) bytes and where in RAW it came from."""

    file: _RawFile
    start: int
    length: int


def _raw_chain(raw: Path) -> list[Path]:
    """RAW generations oldest first: ``RAW.N`` ... ``RAW.0``, ``RAW`` (only those that exist)."""
    gens: list[tuple[int, Path]] = []
    prefix = raw.name + "."
    try:
        names = os.listdir(raw.parent)
    except FileNotFoundError:
        return []
    for name in names:
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            gens.append((int(name[len(prefix):]), raw.parent / name))
    chain = [p for _, p in sorted(gens, reverse=True)]
    if raw.name in names:
        chain.append(raw)
    return chain


def _ident(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


# ---------------------------------------------------------------------------------------------- writer


Subscriber = Callable[[bytes], None]


class ConsoleLogWriter:
    """Tails one VM's RAW console file into its CRI log file; see the module docstring for the guarantees.

    Use ``start()`` (thread) or call ``poll()`` yourself; ``stop()`` drains and ends; ``reopen()`` after the
    kubelet renamed the CRI log.  ``state_path`` belongs to this writer (delete it with the container).
    """

    def __init__(self, raw_path: Path, cri_log_path: Path, state_path: Path, *,
                 poll_interval: float = POLL_INTERVAL, partial_delay: float = PARTIAL_DELAY,
                 max_line: int = MAX_LINE, durable: bool = True) -> None:
        self.raw_path = Path(raw_path)
        self.cri_log_path = Path(cri_log_path)
        self.state_path = Path(state_path)
        self.poll_interval = poll_interval
        self.partial_delay = partial_delay
        self.max_line = max_line
        self.durable = durable
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opened = False
        self._cri_fd = -1
        self._cri_ident: tuple[int, int] | None = None
        self._cri_size = 0
        self._cur: _RawFile | None = None  # the RAW generation being read
        self._read_off = 0  # next offset to read in _cur
        self._files: list[_RawFile] = []  # every open generation (pending bytes may span two)
        self._pending = bytearray()
        self._segments: deque[_Segment] = deque()
        self._partial_since: float | None = None
        self._saved: LogState | None = None
        self._subs: dict[int, Subscriber] = {}
        self._next_sub = 0

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Recover from the persisted state (cutting a CRI log tail that was never recorded) and persist."""
        with self._lock:
            if self._opened:
                return
            state = LogState.load(self.state_path)
            self.cri_log_path.parent.mkdir(parents=True, exist_ok=True)
            self._open_cri()
            if state is not None:
                self._recover_cri(state)
                self._recover_raw(state)
            self._opened = True
            self._persist(force=True)

    def start(self) -> None:
        """Recover and start the tailing thread."""
        self.open()
        with self._lock:
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"console-log:{self.raw_path.name}",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write everything RAW holds now (an unterminated line as ``P``), persist, close the files."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            if not self._opened:
                return
            try:
                self.poll(force_partial=True)
            finally:
                self._close()

    def flush(self, partial: bool = False) -> int:
        """Process what RAW holds now (tests; ``partial`` also writes an unterminated line as ``P``)."""
        return self.poll(force_partial=partial)

    def reopen(self) -> None:
        """ReopenContainerLog: the kubelet renamed the CRI log; continue in a fresh file at the same path."""
        with self._lock:
            if not self._opened:
                self.open()
                return
            os.close(self._cri_fd)
            self._open_cri()
            self._persist(force=True)

    def _close(self) -> None:
        if self._cri_fd >= 0:
            os.close(self._cri_fd)
            self._cri_fd = -1
        for f in self._files:
            f.close()
        self._files = []
        self._cur = None
        self._pending.clear()
        self._segments.clear()
        self._opened = False

    def _run(self) -> None:
        failing = ""
        while not self._stop.is_set():
            try:
                self.poll()
                if failing:
                    log.info("console log %s -> %s works again", self.raw_path, self.cri_log_path)
                    failing = ""
            except Exception as exc:  # keep tailing: a full disk or a vanished dir may heal
                if str(exc) != failing:  # once per distinct error, not every poll
                    log.exception("console log %s -> %s: poll failed", self.raw_path, self.cri_log_path)
                failing = str(exc) or type(exc).__name__
            self._stop.wait(self.poll_interval)

    # ------------------------------------------------------------------ attach hook

    def subscribe(self, callback: Subscriber) -> int:
        """Call ``callback`` with raw console bytes as they are read from RAW; returns a token."""
        with self._lock:
            self._next_sub += 1
            self._subs[self._next_sub] = callback
            return self._next_sub

    def unsubscribe(self, token: int) -> None:
        with self._lock:
            self._subs.pop(token, None)

    # ------------------------------------------------------------------ recovery

    def _open_cri(self) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._cri_fd = os.open(self.cri_log_path, flags, 0o640)
        st = os.fstat(self._cri_fd)
        self._cri_ident = (st.st_dev, st.st_ino)
        self._cri_size = st.st_size

    def _recover_cri(self, state: LogState) -> None:
        if (state.cri_dev, state.cri_inode) == self._cri_ident:
            if self._cri_size > state.cri_size:
                os.ftruncate(self._cri_fd, state.cri_size)
            elif self._cri_size < state.cri_size:
                log.warning("CRI log %s is shorter (%d) than recorded (%d): lines may be missing",
                            self.cri_log_path, self._cri_size, state.cri_size)
            self._cri_size = min(self._cri_size, state.cri_size)
            return
        # The file at the path is new: the kubelet rotated it while we were down (or we died inside reopen()).
        # Cut the unrecorded tail of the old generation if it is still next to it under another name.
        for entry in os.scandir(self.cri_log_path.parent):
            if not entry.name.startswith(self.cri_log_path.name) or not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            if (st.st_dev, st.st_ino) == (state.cri_dev, state.cri_inode) and st.st_size > state.cri_size:
                os.truncate(entry.path, state.cri_size)
                log.info("cut unrecorded tail of rotated CRI log %s to %d bytes", entry.path, state.cri_size)

    def _recover_raw(self, state: LogState) -> None:
        if state.raw_inode is None:
            return
        want = (state.raw_dev, state.raw_inode)
        head = bytes.fromhex(state.raw_head)
        for path in _raw_chain(self.raw_path):
            if _ident(path) != want:
                continue
            try:
                f = _RawFile(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            except FileNotFoundError:
                continue
            if f.ident == want and os.fstat(f.fd).st_size >= state.raw_offset and \
                    f.head(state.raw_offset) == head:
                self._files.append(f)
                self._cur, self._read_off = f, state.raw_offset
                return
            f.close()
        log.warning("console log %s: the RAW file at the recorded position is gone (rotated away while "
                    "virtletd was down?); continuing with the oldest RAW generation, output may be missing",
                    self.raw_path)

    # ------------------------------------------------------------------ tailing

    def poll(self, force_partial: bool = False) -> int:
        """Read what RAW holds, append CRI lines, persist the state; returns CRI bytes written."""
        written = 0
        with self._lock:
            if not self._opened:
                self.open()
            while True:
                got = self._fill(BATCH_BYTES)
                written += self._emit(force_partial)
                if got < BATCH_BYTES:
                    return written

    def _fill(self, budget: int) -> int:
        got = 0
        while got < budget:
            if self._cur is None and not self._open_next():
                break
            assert self._cur is not None
            data = os.pread(self._cur.fd, budget - got, self._read_off)
            if not data:
                if os.fstat(self._cur.fd).st_size < self._read_off:
                    self._truncated()
                    continue
                # End of this generation: move on only once virtlogd has started a newer one, after reading
                # what it wrote before the switch.
                if _ident(self.raw_path) in (None, self._cur.ident):
                    break
                data = os.pread(self._cur.fd, budget - got, self._read_off)
                if not data:
                    if not self._open_next():
                        break
                    continue
            self._take(data)
            got += len(data)
        return got

    def _take(self, data: bytes) -> None:
        assert self._cur is not None
        last = self._segments[-1] if self._segments else None
        if last is not None and last.file is self._cur and last.start + last.length == self._read_off:
            last.length += len(data)
        else:
            self._segments.append(_Segment(self._cur, self._read_off, len(data)))
        self._pending += data
        self._read_off += len(data)
        for cb in list(self._subs.values()):
            try:
                cb(data)
            except Exception:
                log.exception("console subscriber failed")

    def _open_next(self) -> bool:
        """Switch to the RAW generation after the current one (or the oldest one when we have none)."""
        chain = _raw_chain(self.raw_path)
        idents = [_ident(p) for p in chain]
        nxt: Path | None = None
        want: tuple[int, int] | None = None
        if self._cur is not None and self._cur.ident in idents:
            i = idents.index(self._cur.ident)
            nxt = chain[i + 1] if i + 1 < len(chain) else None
            want = idents[i + 1] if nxt is not None else None
        elif chain:
            nxt, want = chain[0], idents[0]
        if nxt is None or want is None:
            return False
        try:
            f = _RawFile(os.open(nxt, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            return False
        if f.ident != want or (self._cur is not None and f.ident == self._cur.ident):
            f.close()  # renamed again under us: look next poll
            return False
        self._files.append(f)
        self._cur, self._read_off = f, 0
        self._release_files()
        return True

    def _truncated(self) -> None:
        assert self._cur is not None
        log.warning("console RAW %s was truncated: following it from its start", self.raw_path)
        self._pending.clear()
        self._segments.clear()
        self._partial_since = None
        self._read_off = 0

    def _release_files(self) -> None:
        keep = {id(s.file) for s in self._segments}
        if self._cur is not None:
            keep.add(id(self._cur))
        for f in self._files:
            if id(f) not in keep:
                f.close()
        self._files = [f for f in self._files if id(f) in keep]

    def _emit(self, force_partial: bool) -> int:
        buf = self._pending
        out = bytearray()
        ts = format_rfc3339nano(time.time_ns()).encode()
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            line = bytes(buf[pos:nl]).rstrip(b"\r")
            while len(line) > self.max_line:
                out += _cri_line(ts, b"P", line[: self.max_line])
                line = line[self.max_line:]
            out += _cri_line(ts, b"F", line)
            pos = nl + 1
        while len(buf) - pos >= self.max_line:
            out += _cri_line(ts, b"P", bytes(buf[pos: pos + self.max_line]))
            pos += self.max_line
        now = time.monotonic()
        if pos < len(buf):
            if self._partial_since is None or pos > 0:
                self._partial_since = now
            if force_partial or now - self._partial_since >= self.partial_delay:
                text = bytes(buf[pos:]).rstrip(b"\r")  # a CR that ends a piece would be re-joined to its LF
                if text:
                    out += _cri_line(ts, b"P", text)
                pos = len(buf)
        if pos == len(buf):
            self._partial_since = None
        if out:
            _write_all(self._cri_fd, bytes(out))
            self._cri_size += len(out)
            if self.durable:
                os.fsync(self._cri_fd)
            failpoints.hit(FAILPOINT_AFTER_CRI_WRITE)
        self._consume(pos)
        self._persist()
        return len(out)

    def _consume(self, n: int) -> None:
        del self._pending[:n]
        while n:
            seg = self._segments[0]
            take = min(n, seg.length)
            seg.start += take
            seg.length -= take
            n -= take
            if seg.length == 0:
                self._segments.popleft()
        self._release_files()

    def _position(self) -> tuple[_RawFile | None, int]:
        if self._segments:
            return self._segments[0].file, self._segments[0].start
        return self._cur, self._read_off

    def _persist(self, force: bool = False) -> None:
        f, off = self._position()
        state = LogState(cri_dev=self._cri_ident[0] if self._cri_ident else None,
                         cri_inode=self._cri_ident[1] if self._cri_ident else None, cri_size=self._cri_size)
        if f is not None:
            state.raw_dev, state.raw_inode, state.raw_offset = f.ident[0], f.ident[1], off
        if not force and self._saved is not None and _same_position(self._saved, state):
            return
        if f is not None:
            state.raw_head = f.head(off).hex()
        state.save(self.state_path, fsync=self.durable)
        self._saved = state


def _same_position(a: LogState, b: LogState) -> bool:
    return (a.raw_dev, a.raw_inode, a.raw_offset, a.cri_dev, a.cri_inode, a.cri_size) == \
        (b.raw_dev, b.raw_inode, b.raw_offset, b.cri_dev, b.cri_inode, b.cri_size)


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``python -m virtlet.vm.console_log RAW CRI STATE``: run one writer until SIGTERM (debugging, tests)."""
    import argparse
    import signal

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("raw", type=Path)
    ap.add_argument("cri", type=Path)
    ap.add_argument("state", type=Path)
    ap.add_argument("--poll-interval", type=float, default=POLL_INTERVAL)
    ap.add_argument("--no-fsync", action="store_true", help="skip fsync (a process crash is still safe)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    w = ConsoleLogWriter(args.raw, args.cri, args.state, poll_interval=args.poll_interval,
                         durable=not args.no_fsync)
    w.start()
    print("ready", flush=True)
    done.wait()
    w.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
