"""Failpoints: unset, other names and a bounded sleep go on; the exact name freezes (tested in integration).
The failpoint list in ``virtlet.failpoints.NAMES`` and the ``hit(...)`` calls in the code agree (the crash matrix is
parametrised by the list, so a failpoint missing from it would never be tested)."""

from __future__ import annotations

import re
import time
from pathlib import Path

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


RUNTIME = Path(failpoints.__file__).resolve().parent
_HIT = re.compile(r"failpoints\.hit\(\s*([^)]*)\)")
_LITERAL = re.compile(r'^"([^"]+)"$')
_CONSTANT = re.compile(r'^(FAILPOINT_[A-Z0-9_]+)\s*=\s*"([^"]+)"', re.M)


def _names_in_code() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(RUNTIME.rglob("*.py")):
        text = path.read_text()
        constants = dict(_CONSTANT.findall(text))
        for arg in _HIT.findall(text):
            arg = arg.strip()
            literal = _LITERAL.match(arg)
            name = literal.group(1) if literal else constants.get(arg)
            assert name, f"{path}: failpoints.hit({arg}) must name a string literal or a FAILPOINT_ constant"
            found.setdefault(name, []).append(str(path.relative_to(RUNTIME)))
    return found


def test_every_failpoint_in_the_code_is_listed() -> None:
    unlisted = {n: where for n, where in _names_in_code().items() if n not in failpoints.NAMES}
    assert not unlisted, f"failpoints hit in the code but not in virtlet.failpoints.NAMES: {unlisted}"


def test_every_listed_failpoint_is_hit_exactly_once() -> None:
    found = _names_in_code()
    assert sorted(failpoints.NAMES) == sorted(found), set(failpoints.NAMES) ^ set(found)
    twice = {n: where for n, where in found.items() if len(where) > 1}
    assert not twice, f"a failpoint name must mark one place: {twice}"


def test_every_mutating_rpc_has_failpoints() -> None:
    prefixes = ("sandbox.run.", "sandbox.stop.", "sandbox.remove.", "container.create.", "container.start.",
                "container.stop.", "container.remove.", "image.pull.", "image.remove.")
    for prefix in prefixes:
        assert any(n.startswith(prefix) for n in failpoints.NAMES), prefix


def test_hit_is_a_no_op_unless_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIRTLET_FAILPOINT", "something.else")
    for name in failpoints.NAMES:
        failpoints.hit(name)  # returns at once
