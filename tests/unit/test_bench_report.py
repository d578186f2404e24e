"""bench/report.py: the one row format every bench emits and run_all prints."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
from bench import report


def test_status_follows_the_goal_direction() -> None:
    assert report.Row("b", "m", 0.9, "ratio", 1.0).status == "OK"
    assert report.Row("b", "m", 1.1, "ratio", 1.0).status == "MISSED"
    assert report.Row("b", "m", 0.95, "ratio", 0.9, better="higher").status == "OK"
    assert report.Row("b", "m", 0.8, "ratio", 0.9, better="higher").status == "MISSED"
    assert report.Row("b", "m", 3.0, "s").status == "-"
    assert report.Row("b", "m", 3.0, "s").ratio is None


def test_emit_appends_json_lines_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [report.Row("b", "first", 1.0, "s", 2.0), report.Row("b", "second", 5.0, "ms")]
    monkeypatch.delenv(report.ENV, raising=False)
    report.emit(rows)  # alone: nothing written anywhere
    sink = tmp_path / "rows.jsonl"
    monkeypatch.setenv(report.ENV, str(sink))
    report.emit(rows[:1])
    report.emit(rows[1:])
    assert [json.loads(line)["measure"] for line in sink.read_text().splitlines()] == ["first", "second"]
    assert report.load(str(sink)) == rows


def test_table_has_one_line_per_row_with_status() -> None:
    text = report.table([report.Row("pod_start", "ratio", 2.5, "ratio", 1.0),
                         report.Row("image_pull", "throughput", 0.95, "ratio", 0.9, better="higher")])
    lines = text.splitlines()
    assert lines[0].split() == ["bench", "measure", "measured", "goal", "ratio", "status"]
    assert lines[2].endswith("MISSED") and "<= 1 ratio" in lines[2]
    assert lines[3].endswith("OK") and ">= 0.9 ratio" in lines[3]


def test_a_partial_run_keeps_the_other_benches_rows(tmp_path: Path) -> None:
    from bench import run_all

    earlier = [report.Row("pod_start", "p", 2.0, "ratio", 1.0), report.Row("vm_boot", "v", 1.2, "ratio", 1.1),
               report.Row("image_pull", "i", 0.8, "ratio", 0.9, better="higher")]
    path = tmp_path / "latest.json"
    path.write_text(json.dumps({"when": "yesterday", "rows": [asdict(r) | {"status": r.status} for r in earlier]}))
    fresh = [report.Row("vm_boot", "v", 0.99, "ratio", 1.1)]
    rows, note, times = run_all.merge_earlier(path, ["vm_boot"], fresh, "today")
    assert [(r.bench, r.measured) for r in rows] == [("pod_start", 2.0), ("vm_boot", 0.99), ("image_pull", 0.8)]
    assert note == " (vm_boot; pod_start, image_pull from the run of yesterday)"
    assert times == {"vm_boot": "today", "pod_start": "yesterday", "image_pull": "yesterday"}
    # the next partial run still knows when each kept bench ran
    path.write_text(json.dumps({"when": "today", "bench_when": times,
                                "rows": [asdict(r) | {"status": r.status} for r in rows]}))
    rows, note, times = run_all.merge_earlier(path, ["image_pull"], [report.Row("image_pull", "i", 0.95, "ratio",
                                                                                0.9, better="higher")], "tomorrow")
    assert note == " (image_pull; pod_start from the run of yesterday; vm_boot from the run of today)"
    assert times == {"image_pull": "tomorrow", "pod_start": "yesterday", "vm_boot": "today"}
    # a run in which no bench gave rows (all failed) keeps every earlier row
    rows, note, times = run_all.merge_earlier(path, [], [], "later")
    assert [r.bench for r in rows] == ["pod_start", "vm_boot", "image_pull"]
    assert note.startswith(" (no bench gave rows; ") and "later" not in times.values()
    # no earlier run (or an unreadable one): only what ran
    assert run_all.merge_earlier(tmp_path / "none.json", ["vm_boot"], fresh, "now") == (fresh, "", {"vm_boot": "now"})
