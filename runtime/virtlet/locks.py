"""One re-entrant lock per resource id, dropped when nobody holds or waits for it.

Calls on one sandbox or container serialise and calls on others do not wait.  Ids come from callers (the
kubelet, or anyone who can reach the CRI socket), so a table that kept a lock for every id ever named would grow
without bound under calls with made-up ids (found by the CRI fuzzer): an entry lives only while it is in use.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class KeyedLocks:
    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[str, tuple[threading.RLock, list[int]]] = {}  # key -> (lock, [users])

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        with self._guard:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = (threading.RLock(), [0])
            entry[1][0] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1][0] -= 1
                if entry[1][0] == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        """Entries in use (for tests)."""
        with self._guard:
            return len(self._entries)
