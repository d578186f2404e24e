"""Wake console log writers when virtlogd writes, instead of every writer looking at its RAW file on a timer.

Why: a writer that polls its RAW file every 0.15 s costs CPU on every idle VM pod (50 pods are 330 looks a
second) and makes a console line wait up to 0.15 s before ``kubectl logs`` shows it.  With inotify the writer
sleeps until virtlogd writes, renames (rotation) or creates a RAW generation.

One inotify instance and one thread serve every writer in the process: the kernel allows few inotify instances
per user (``fs.inotify.max_user_instances``, 128 by default, shared with every other program of root), while
watches are plentiful (``max_user_watches``).  Each writer watches its RAW file's directory (a rename makes a
new RAW file, which a watch on the file itself would not see) and is woken only for names of its RAW chain.
When inotify is not available (no instance or watch left, an unusual file system), ``watch()`` returns
``None`` and the writer polls as before.  The library is ``inotify_simple``, a thin ctypes wrapper.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from inotify_simple import INotify, flags

from virtlet.console.rotation import generation

log = logging.getLogger(__name__)

#: What a writer needs to hear about in its directory: writes (and truncation), a RAW file appearing by
#: creation or rename, and the old one renamed away.
WATCH_MASK = flags.MODIFY | flags.CREATE | flags.MOVED_TO | flags.MOVED_FROM | flags.CLOSE_WRITE
#: After the first event, wait this long before reading, so a burst of writes wakes each writer once.
READ_DELAY_MS = 10
#: The thread looks whether ``close()`` was called this often (once a second costs nothing).
CLOSE_CHECK_MS = 1000

Wake = Callable[[], None]


class RawWatcher:
    """The process's inotify instance, its reader thread and who to wake for which directory and names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inotify: INotify | None = None
        self._failed = False
        self._closed = False
        self._by_wd: dict[int, dict[int, tuple[str, Wake]]] = {}
        self._wd_of_token: dict[int, int] = {}
        self._next = 0

    def watch(self, raw_path: Path, wake: Wake) -> int | None:
        """Call ``wake`` whenever a file named like ``raw_path`` (``RAW``, ``RAW.N``) in its directory changes.

        Returns a token for ``unwatch``, or ``None`` when inotify cannot be used (the caller polls instead).
        """
        directory = os.fspath(raw_path.parent)
        with self._lock:
            inotify = self._instance()
            if inotify is None:
                return None
            try:
                wd = inotify.add_watch(directory, WATCH_MASK)
            except OSError as exc:
                log.warning("console log %s: cannot watch its directory (%s); polling it instead", raw_path, exc)
                return None
            self._next += 1
            token = self._next
            self._by_wd.setdefault(wd, {})[token] = (raw_path.name, wake)
            self._wd_of_token[token] = wd
            return token

    def unwatch(self, token: int) -> None:
        with self._lock:
            wd = self._wd_of_token.pop(token, None)
            if wd is None:
                return
            waiters = self._by_wd.get(wd, {})
            waiters.pop(token, None)
            if waiters:
                return
            self._by_wd.pop(wd, None)
            if self._inotify is not None:
                try:
                    self._inotify.rm_watch(wd)
                except OSError:
                    pass  # the directory is gone, and the kernel dropped the watch with it

    def watched_dirs(self) -> int:
        """How many directories are watched (tests; every writer's stop should bring this back down)."""
        with self._lock:
            return len(self._by_wd)

    def _instance(self) -> INotify | None:
        if self._inotify is None and not self._failed and not self._closed:
            try:
                self._inotify = INotify()
            except OSError as exc:
                self._failed = True
                log.warning("inotify is not available (%s): console log writers poll their RAW files", exc)
                return None
            threading.Thread(target=self._run, args=(self._inotify,), name="console-log-watch", daemon=True).start()
        return self._inotify

    def close(self) -> None:
        """Stop the thread (within ``CLOSE_CHECK_MS``) and close the instance; writers still watching poll."""
        with self._lock:
            self._closed = True
            self._by_wd.clear()
            self._wd_of_token.clear()

    def _run(self, inotify: INotify) -> None:
        try:
            self._read_events(inotify)
        finally:
            with self._lock:
                self._inotify = None
                self._failed = True  # no new watches: writers that start now poll
            inotify.close()

    def _read_events(self, inotify: INotify) -> None:
        while not self._closed:
            try:
                events = inotify.read(timeout=CLOSE_CHECK_MS, read_delay=READ_DELAY_MS)
            except OSError:
                log.exception("reading inotify events failed: console log writers wake on their safety poll only")
                return
            to_wake: dict[int, Wake] = {}
            with self._lock:
                for ev in events:
                    if ev.mask & flags.Q_OVERFLOW:  # events were lost: wake everyone
                        for waiters in self._by_wd.values():
                            to_wake.update((t, w) for t, (_, w) in waiters.items())
                        continue
                    for token, (name, wake) in self._by_wd.get(ev.wd, {}).items():
                        if ev.mask & flags.IGNORED or generation(name, ev.name) is not None:
                            to_wake[token] = wake
            for wake in to_wake.values():
                try:
                    wake()
                except Exception:
                    log.exception("waking a console log writer failed")


_watcher: RawWatcher | None = None
_watcher_lock = threading.Lock()


def watcher() -> RawWatcher:
    """The process-wide watcher (made on first use)."""
    global _watcher
    with _watcher_lock:
        if _watcher is None:
            _watcher = RawWatcher()
        return _watcher
