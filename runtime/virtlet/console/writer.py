"""VM serial console -> CRI log file, exactly once across virtletd restarts.

Why this shape: libvirt's virtlogd appends every byte the guest prints to a RAW file (``<serial type='unix'>``
with ``<log file=RAW append='on'/>``) whether or not virtletd runs, so nothing is lost while virtletd is down.
virtletd only has to *tail* RAW and turn bytes into CRI log lines (``<RFC3339Nano> stdout F|P <text>``, see
``cri_format``) for ``kubectl logs``.  To emit every line exactly once across a SIGKILL, the writer persists,
after each batch, where it is in RAW (inode, offset, a fingerprint of the file's head) and how long the CRI log
was after the batch (``state``).  On start it cuts the CRI log back to that length (bytes written after the
last persisted state will be produced again from RAW) and continues from the recorded RAW offset.

The writer follows RAW generations by inode and finishes the old one before moving to the next, so a line
spanning a virtlogd rotation comes out whole (``rotation``).  The kubelet rotates the CRI log by renaming it
and calling ReopenContainerLog, which lands in ``reopen()``.

The thread sleeps until virtlogd touches the RAW chain (``watch``: inotify on RAW's directory), then reads at
most every ``MIN_GAP`` (a burst of console output is one batch, one fsync); an unterminated line is still
written when its ``PARTIAL_DELAY`` ends, and a slow safety poll covers anything inotify could not tell.  Without
inotify it polls every ``POLL_INTERVAL``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from virtlet import failpoints
from virtlet.console.cri_format import MAX_LINE, cri_line, format_rfc3339nano
from virtlet.console.rotation import RawFile, Segment, cut_rotated_cri_tail, ident, open_recorded_raw, raw_chain
from virtlet.console.state import LogState, write_all
from virtlet.console.watch import watcher

log = logging.getLogger(__name__)

#: An unterminated line is written as a ``P`` entry once it has waited this long for its newline.
PARTIAL_DELAY = 0.5
#: How often the thread looks at RAW when inotify cannot tell it that RAW changed.
POLL_INTERVAL = 0.15
#: With inotify: the least time between two reads (a burst of output is read in batches, not per write) ...
MIN_GAP = 0.1
#: ... and a look at RAW this often even without an event (belt and braces; costs nothing measurable).
SAFETY_INTERVAL = 5.0
#: At most this many RAW bytes are turned into CRI lines per persisted batch (bounds memory when catching up).
BATCH_BYTES = 1024 * 1024
#: The failpoint between appending to the CRI log and persisting the state (the crash window tests use).
FAILPOINT_AFTER_CRI_WRITE = "console_log_after_cri_write"


Subscriber = Callable[[bytes], None]

#: RAW lives in a directory of its own in the container's directory, so the inotify watch on that directory
#: hears virtlogd only, not QEMU writing the root overlay next to it (an event per guest disk write).
RAW_DIR = "console"
RAW_NAME = "console.raw"


def raw_path(container_dir: Path) -> Path:
    """Where a container's RAW is: ``<dir>/console/console.raw``; in the container directory itself for
    containers created before RAW had a directory of its own (CreateContainer makes ``console/``)."""
    own = container_dir / RAW_DIR
    return own / RAW_NAME if own.is_dir() else container_dir / RAW_NAME


class ConsoleLogWriter:
    """Tails one VM's RAW console file into its CRI log file; see the module docstring for the guarantees.

    Use ``start()`` (thread) or call ``poll()`` yourself; ``stop()`` drains and ends; ``reopen()`` after the
    kubelet renamed the CRI log.  ``state_path`` belongs to this writer (delete it with the container).
    """

    def __init__(self, raw_path: Path, cri_log_path: Path, state_path: Path, *,
                 poll_interval: float = POLL_INTERVAL, partial_delay: float = PARTIAL_DELAY,
                 max_line: int = MAX_LINE, durable: bool = True, inotify: bool = True) -> None:
        self.raw_path = Path(raw_path)
        self.cri_log_path = Path(cri_log_path)
        self.state_path = Path(state_path)
        self.poll_interval = poll_interval
        self.partial_delay = partial_delay
        self.max_line = max_line
        self.durable = durable
        self.inotify = inotify
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._watch: int | None = None  # the inotify watch's token while the thread runs with one
        self._thread: threading.Thread | None = None
        self._opened = False
        self._cri_fd = -1
        self._cri_ident: tuple[int, int] | None = None
        self._cri_size = 0
        self._cur: RawFile | None = None  # the RAW generation being read
        self._read_off = 0  # next offset to read in _cur
        self._files: list[RawFile] = []  # every open generation (pending bytes may span two)
        self._pending = bytearray()
        self._segments: deque[Segment] = deque()
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
            self._watch = watcher().watch(self.raw_path, self._wake.set) if self.inotify else None
            self._thread = threading.Thread(target=self._run, name=f"console-log:{self.raw_path.name}",
                                            daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write everything RAW holds now (an unterminated line as ``P``), persist, close the files."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._watch is not None:
            watcher().unwatch(self._watch)
            self._watch = None
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
            if self._watch is None:
                self._stop.wait(self.poll_interval)
                continue
            last = time.monotonic()
            self._wake.wait(self._idle_wait())
            self._wake.clear()
            self._stop.wait(MIN_GAP - (time.monotonic() - last))  # returns at once when the gap has passed

    def _idle_wait(self) -> float:
        """With inotify: how long to sleep without an event (until a waiting partial line is due, at most the
        safety interval)."""
        since = self._partial_since
        if since is None:
            return SAFETY_INTERVAL
        return min(SAFETY_INTERVAL, max(0.0, self.partial_delay - (time.monotonic() - since)))

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
        if (state.cri_dev, state.cri_inode) != self._cri_ident:
            cut_rotated_cri_tail(self.cri_log_path, state)
            return
        if self._cri_size > state.cri_size:
            os.ftruncate(self._cri_fd, state.cri_size)
        elif self._cri_size < state.cri_size:
            log.warning("CRI log %s is shorter (%d) than recorded (%d): lines may be missing",
                        self.cri_log_path, self._cri_size, state.cri_size)
        self._cri_size = min(self._cri_size, state.cri_size)

    def _recover_raw(self, state: LogState) -> None:
        f = open_recorded_raw(self.raw_path, state)
        if f is not None:
            self._files.append(f)
            self._cur, self._read_off = f, state.raw_offset

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
                if ident(self.raw_path) in (None, self._cur.ident):
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
            self._segments.append(Segment(self._cur, self._read_off, len(data)))
        self._pending += data
        self._read_off += len(data)
        for cb in list(self._subs.values()):
            try:
                cb(data)
            except Exception:
                log.exception("console subscriber failed")

    def _open_next(self) -> bool:
        """Switch to the RAW generation after the current one (or the oldest one when we have none)."""
        chain = raw_chain(self.raw_path)
        idents = [ident(p) for p in chain]
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
            f = RawFile(os.open(nxt, os.O_RDONLY | os.O_CLOEXEC))
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
                out += cri_line(ts, b"P", line[: self.max_line])
                line = line[self.max_line:]
            out += cri_line(ts, b"F", line)
            pos = nl + 1
        while len(buf) - pos >= self.max_line:
            out += cri_line(ts, b"P", bytes(buf[pos: pos + self.max_line]))
            pos += self.max_line
        now = time.monotonic()
        if pos < len(buf):
            if self._partial_since is None or pos > 0:
                self._partial_since = now
            if force_partial or now - self._partial_since >= self.partial_delay:
                text = bytes(buf[pos:]).rstrip(b"\r")  # a CR that ends a piece would be re-joined to its LF
                if text:
                    out += cri_line(ts, b"P", text)
                pos = len(buf)
        if pos == len(buf):
            self._partial_since = None
        if out:
            write_all(self._cri_fd, bytes(out))
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

    def _position(self) -> tuple[RawFile | None, int]:
        if self._segments:
            return self._segments[0].file, self._segments[0].start
        return self._cur, self._read_off

    def _persist(self, force: bool = False) -> None:
        f, off = self._position()
        state = LogState(cri_dev=self._cri_ident[0] if self._cri_ident else None,
                         cri_inode=self._cri_ident[1] if self._cri_ident else None, cri_size=self._cri_size)
        if f is not None:
            state.raw_dev, state.raw_inode, state.raw_offset = f.ident[0], f.ident[1], off
        if not force and self._saved is not None and self._saved.same_position(state):
            return
        if f is not None:
            state.raw_head = f.head(off).hex()
        state.save(self.state_path, fsync=self.durable)
        self._saved = state
