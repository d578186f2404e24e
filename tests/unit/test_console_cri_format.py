"""The CRI log line format: RFC3339Nano timestamps, parsing and joining partial lines."""

from __future__ import annotations

import pytest

from virtlet.console import cri_format as cf


def test_rfc3339nano_format_and_parse() -> None:
    ns = 1_700_000_000_123_456_789
    assert cf.format_rfc3339nano(ns) == "2023-11-14T22:13:20.123456789Z"
    assert cf.format_rfc3339nano(1_700_000_000_120_000_000) == "2023-11-14T22:13:20.12Z"
    assert cf.format_rfc3339nano(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"
    for t in (ns, 1_700_000_000_120_000_000, 0, 1_700_000_000_000_000_000):
        assert cf.parse_rfc3339nano(cf.format_rfc3339nano(t)) == t
    assert cf.parse_rfc3339nano("2023-11-14T23:13:20.5+01:00") == 1_700_000_000_500_000_000
    with pytest.raises(ValueError):
        cf.parse_rfc3339nano("2023-11-14 22:13:20Z")


def test_parse_cri_log_rejects_garbage_and_joins_partials() -> None:
    text = ("2023-11-14T22:13:20Z stdout P ab\n2023-11-14T22:13:20Z stdout F c d\n"
            "2023-11-14T22:13:21Z stderr F \n")
    ents = cf.parse_cri_log(text)
    assert ents[1] == cf.CriLogEntry("2023-11-14T22:13:20Z", "stdout", "F", "c d")
    assert cf.join_cri_entries(ents) == ["abc d", ""]
    with pytest.raises(ValueError, match="line 1"):
        cf.parse_cri_log("just some text\n")
