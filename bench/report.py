"""One result format for every bench, so ``bench/run_all.py`` can print them all in one table.

A bench calls ``emit(rows)`` once at the end.  Each row is one measured quantity with its goal: ``measured``
compared with ``goal`` in the direction ``better`` says ("lower" or "higher").  When the bench runs alone the
rows are only printed by the bench itself (its own table stays as it was); when ``run_all.py`` runs it, the
environment variable ``VIRTLET_BENCH_JSON`` names a file the rows are appended to as JSON lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass

ENV = "VIRTLET_BENCH_JSON"


@dataclass(frozen=True)
class Row:
    bench: str  # the bench script's name, e.g. "vm_boot"
    measure: str  # what was measured, e.g. "boot ratio virtletd/virsh (medians)"
    measured: float
    unit: str  # "s", "ms", "MiB", "ratio", "count"
    goal: float | None = None  # None: reported, no goal
    better: str = "lower"  # "lower": measured <= goal is OK; "higher": measured >= goal is OK
    note: str = ""  # what holds a MISSED row back, or how it was measured

    @property
    def status(self) -> str:
        if self.goal is None:
            return "-"
        ok = self.measured <= self.goal if self.better == "lower" else self.measured >= self.goal
        return "OK" if ok else "MISSED"

    @property
    def ratio(self) -> float | None:
        """measured / goal (how far from the goal; <= 1 is good for "lower", >= 1 for "higher")."""
        if self.goal in (None, 0):
            return None
        return self.measured / self.goal


def emit(rows: Iterable[Row]) -> None:
    """Append ``rows`` to the file ``VIRTLET_BENCH_JSON`` names, if it is set."""
    path = os.environ.get(ENV)
    if not path:
        return
    with open(path, "a", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(asdict(row)) + "\n")


def load(path: str) -> list[Row]:
    rows = []
    with open(path, encoding="utf-8") as src:
        for line in src:
            if line.strip():
                rows.append(Row(**json.loads(line)))
    return rows


def table(rows: Iterable[Row]) -> str:
    """The one table: bench, measure, measured, goal, ratio, status."""
    head = ("bench", "measure", "measured", "goal", "ratio", "status")
    lines = []
    for r in rows:
        cmp = "<=" if r.better == "lower" else ">="
        goal = f"{cmp} {r.goal:g} {r.unit}" if r.goal is not None else ""
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        lines.append((r.bench, r.measure, f"{r.measured:.3g} {r.unit}", goal, ratio, r.status))
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    out = [line.rstrip() for line in out]
    return "\n".join(out)
