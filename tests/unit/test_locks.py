"""KeyedLocks: per-id mutual exclusion, re-entrant, and no entry left for ids nobody uses any more."""

from __future__ import annotations

import threading
import time

from virtlet.locks import KeyedLocks


def test_entries_go_when_unused() -> None:
    locks = KeyedLocks()
    for i in range(1000):
        with locks(f"made-up-{i}"):
            pass
    assert len(locks) == 0


def test_reentrant_and_exclusive_per_key() -> None:
    locks = KeyedLocks()
    order: list[str] = []

    def other() -> None:
        with locks("a"):
            order.append("other")

    with locks("a"), locks("a"):  # re-entrant in one thread
        t = threading.Thread(target=other)
        with locks("b"):
            pass  # another key does not wait
        t.start()
        time.sleep(0.1)
        order.append("holder")
        assert len(locks) == 1
    t.join(5)
    assert order == ["holder", "other"]
    assert len(locks) <= 1
