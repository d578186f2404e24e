"""Where downloaded bytes go: a file, hashed on the way, with hashing and writing off the network thread.

A pull must keep up with ``curl -o`` (see ``bench/image_pull.py``): receiving, sha256 and writing each cost
about the same, so doing them one after another in one thread would triple the time.  ``write`` copies the
chunk once, into a pooled buffer, for two worker threads, one hashing and one writing; both release the GIL,
so the network read of the next chunk overlaps them.  The writer asks the kernel to start writeback of every
finished ``WRITEBACK_BYTES`` block (``sync_file_range``), so the final fsync has little left to wait for and
a large image does not fill the page cache with dirty pages.  Disk errors become user-facing errors (ENOSPC ->
ResourceExhausted) and surface on the next ``write`` or on ``finish``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import os
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

from virtlet import errors
from virtlet.images.progress import ProgressLog

T = TypeVar("T")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
BUFFER_BYTES = 1 << 20
POOL_BUFFERS = 16
WRITEBACK_BYTES = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2
OUTER_QUEUE = 2 * POOL_BUFFERS  # at most this many chunks (each <= 1 MiB) wait for the outer hash
_Item = tuple[bytearray | bytes | threading.Event, int, bool]  # (data, length, from the pool)


def disk(op: Callable[[], T], what: str, written: int | None = None) -> T:
    """Run a filesystem operation; map OSError to ResourceExhausted (disk full) or Internal."""
    try:
        return op()
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            at = f" after {written} bytes" if written is not None else ""
            raise errors.ResourceExhausted(
                f"{what}: no space left in the image directory{at}; free space or remove unused images"
            ) from exc
        raise errors.Internal(f"{what}: cannot write to the image directory: {exc}") from exc


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()


class HashingFileSink:
    """Implements ``fetch.Sink``.  Call ``finish()`` (returns the hex digest) or ``abort()`` exactly once.

    Data lives in a pool of pre-allocated buffers (fresh 1 MiB allocations would page-fault on every chunk):
    a fetcher either fills one in place (``buffer``/``commit``: no copy) or hands bytes to ``write`` (one
    copy).  A buffer returns to the pool when every worker it was queued to is done with it.
    """

    def __init__(self, fd: int, progress: ProgressLog, what: str, hash_image: bool = True) -> None:
        """``hash_image=False``: the caller knows the image's id otherwise (a registry layer's verified digest,
        see ``containerdisk``) and ``finish`` returns ""; one sha256 pass less."""
        self.fd = fd
        self.hash = hashlib.sha256()
        self.size = 0
        self.progress = progress
        self.what = what
        self._error: BaseException | None = None
        self._stop = False
        self._synced = 0
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(POOL_BUFFERS):
            self._free.put(bytearray(BUFFER_BYTES))
        self._current: bytearray | None = None
        self._pending: dict[int, int] = {}
        self._pending_lock = threading.Lock()
        self._queues: list[queue.Queue[_Item | None]] = []
        self._workers: list[threading.Thread] = []
        self.outer: hashlib._Hash | None = None  # see track_outer
        self._outer_q: queue.Queue[_Item | None] | None = None
        self._hash_image = hash_image
        self._image_queues = [self._start(job) for job in ((self._hash, self._write) if hash_image
                                                           else (self._write,))]

    def _start(self, job: Callable[[memoryview], None], bound: int = 0) -> queue.Queue[_Item | None]:
        q: queue.Queue[_Item | None] = queue.Queue(bound)
        self._queues.append(q)
        w = threading.Thread(target=self._run, args=(q, job), name="image-sink", daemon=True)
        self._workers.append(w)
        w.start()
        return q

    def track_outer(self) -> None:
        """Also hash an *outer* stream the image bytes are a part of (a registry layer blob around the disk
        file), in a third worker, so a containerDisk pull reads its blob once and hashes it off the network
        thread.  The outer stream is, in order: what ``outer_only`` gets (tar headers, other members) and
        what ``commit(n, outer=True)`` gets.  ``outer_digest`` waits for it and starts a new one."""
        if self.outer is None:
            self.outer = hashlib.sha256()
            # bounded: ``outer_only`` copies (a skipped member, a compressed blob) must not pile up in memory
            # when the network is faster than sha256; the pooled buffers are bounded by the pool already
            self._outer_q = self._start(self._hash_outer, OUTER_QUEUE)

    def outer_only(self, data: bytes) -> None:
        """Bytes of the outer stream that are not image bytes (hashed in order, never written)."""
        if self._outer_q is None:
            raise ValueError("outer_only() needs track_outer()")
        if data:
            self._outer_q.put((data, len(data), False))

    def outer_digest(self) -> str:
        """The outer stream's sha256 hex digest so far (after every byte given before this call); resets."""
        if self._outer_q is None or self.outer is None:
            raise ValueError("outer_digest() needs track_outer()")
        done = threading.Event()
        self._outer_q.put((done, 0, False))
        while not done.wait(1.0):
            if self._error is not None:
                raise self._error
        if self._error is not None:
            raise self._error
        digest, self.outer = self.outer.hexdigest(), hashlib.sha256()
        return digest

    def expect(self, total: int | None) -> None:
        self.progress.expect(total)

    def buffer(self) -> memoryview:
        """A free buffer for the caller to fill, then ``commit``; blocks while the workers are behind."""
        if self._current is None:
            self._current = self._take_buffer()
        return memoryview(self._current)

    def commit(self, n: int, outer: bool = False) -> None:
        """The first ``n`` bytes of the buffer from ``buffer()`` are the next part of the image (and, with
        ``outer``, of the outer stream: see ``track_outer``)."""
        buf, self._current = self._current, None
        if buf is None or not 0 < n <= len(buf):
            raise ValueError("commit() needs a buffer() and 0 < n <= its size")
        queues = self._image_queues + ([self._outer_q] if outer and self._outer_q is not None else [])
        with self._pending_lock:
            self._pending[id(buf)] = len(queues)
        for q in queues:
            q.put((buf, n, True))
        self.progress.add(n)

    def write(self, data: memoryview) -> None:
        for off in range(0, len(data), BUFFER_BYTES):
            part = data[off:off + BUFFER_BYTES]
            with self.buffer() as view:
                view[:len(part)] = part
            self.commit(len(part))

    def finish(self) -> str:
        """Wait for all bytes to be hashed, written and fsynced; the sha256 hex digest ("" without
        ``hash_image``)."""
        for q in self._queues:
            q.put(None)
        for w in self._workers:
            w.join()
        if self._error is not None:
            raise self._error
        disk(lambda: os.fsync(self.fd), self.what, self.size)
        return self.hash.hexdigest() if self._hash_image else ""

    def abort(self) -> None:
        self._stop = True
        for q in self._queues:
            q.put(None)
        for w in self._workers:
            w.join()

    def _take_buffer(self) -> bytearray:
        while True:
            if self._error is not None:
                raise self._error
            try:
                return self._free.get(timeout=1.0)
            except queue.Empty:
                continue

    def _hash(self, view: memoryview) -> None:
        self.hash.update(view)

    def _hash_outer(self, view: memoryview) -> None:
        assert self.outer is not None
        self.outer.update(view)

    def _write(self, view: memoryview) -> None:
        while view:
            n = disk(functools.partial(os.write, self.fd, view), self.what, self.size)
            view = view[n:]
            self.size += n
        if _sync_file_range is not None and self.size - self._synced >= WRITEBACK_BYTES:
            _sync_file_range(self.fd, self._synced, self.size - self._synced, _SYNC_FILE_RANGE_WRITE)
            self._synced = self.size

    def _run(self, q: queue.Queue[_Item | None], job: Callable[[memoryview], None]) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            buf, n, pooled = item
            if isinstance(buf, threading.Event):  # outer_digest's marker: everything before it is hashed
                buf.set()
                continue
            try:
                if self._error is None and not self._stop:
                    with memoryview(buf) as view:
                        job(view[:n])
            except BaseException as exc:  # handed to the fetching thread
                self._error = exc
            finally:
                if pooled:
                    self._release(buf)

    def _release(self, buf: bytearray | bytes) -> None:
        """One worker is done with a pooled buffer; the last one returns it to the pool."""
        with self._pending_lock:
            self._pending[id(buf)] -= 1
            done = self._pending[id(buf)] == 0
            if done:
                del self._pending[id(buf)]
        if done:
            assert isinstance(buf, bytearray)
            self._free.put(buf)
