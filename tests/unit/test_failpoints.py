"""Failpoints: unset, other names and a bounded sleep go on; the exact name freezes (tested in integration)."""

from __future__ import annotations

import time

import pytest

from virtlet import failpoints


def test_other_names_and_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VIRTLET_FAILPOINT", raising=False)
    failpoints.hit("a.b")
    monkeypatch.setenv("VIRTLET_FAILPOINT", "a.bc")
    failpoints.hit("a.b")  # a longer name is another failpoint
    monkeypatch.setenv("VIRTLET_FAILPOINT", "a.b:sleep=0.2")
    start = time.monotonic()
    failpoints.hit("a.b")
    assert time.monotonic() - start >= 0.2
    monkeypatch.setenv("VIRTLET_FAILPOINT", "a.b:sleep=x")
    failpoints.hit("a.b")  # a malformed value does nothing
