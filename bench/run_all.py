"""Every bench with its goal, one table: ``sudo .venv/bin/python bench/run_all.py [--quick] [--only NAME ...]``.

Runs each bench below as its own process (so one failing bench does not hide the others' rows), collects the
rows each one emits (``bench/report.py``), prints one table (measured, goal, ratio, OK/MISSED) and writes the
rows as JSON (``--json``, default ``.cache/bench/latest.json``).  ``--update-docs`` puts the table, the date
and the machine into ``docs/performance.md`` between its ``bench:begin``/``bench:end`` markers, and the rows
into ``docs/performance.json`` beside it (committed: a fresh clone knows the rows the table shows).  A bench
that did not run, or failed without a row, keeps its earlier rows, from ``docs/performance.json`` with
``--update-docs`` (the table being updated), else from ``--json`` (or the docs' when that is missing).  Benches
compare against a reference measured in the same run (containerd, curl, a hand-made domain) because these
machines are shared and noisy; nothing here is asserted in the test command.  Needs what the README's test
command set up (venv, libvirt daemons, guest images, containerd).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "performance.md"
DOC_JSON = REPO / "docs" / "performance.json"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# name -> (arguments for a full run, arguments for --quick)
BENCHES: dict[str, tuple[list[str], list[str]]] = {
    "pod_start": (["--rounds", "3"], ["--rounds", "1"]),
    "vm_boot": (["--rounds", "3"], ["--rounds", "1"]),
    "density": (["--pods", "50", "--parallel", "10"], ["--pods", "5", "--parallel", "4"]),
    "cri_latency": (["--sandboxes", "50", "--calls", "500"], ["--sandboxes", "50", "--calls", "100"]),
    "criproxy_latency": (["--pods", "50", "--calls", "300"], ["--pods", "10", "--calls", "100"]),
    "image_pull": (["--size-mb", "1024"], ["--size-mb", "256", "--repeat", "2"]),
    "volumes": (["--size-mb", "256"], ["--size-mb", "32"]),
}


def machine() -> str:
    cpus = os.cpu_count()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    kvm = "KVM" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "TCG (no KVM)"
    return f"{platform.node()}: {cpus} CPUs, {mem_gib:.0f} GiB, {platform.release()}, {kvm}"


def run_one(name: str, args: list[str], sink: Path) -> tuple[int, float]:
    env = dict(os.environ, **{report.ENV: str(sink)})
    print(f"== {name} {' '.join(args)}", flush=True)
    t0 = time.monotonic()
    rc = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *args], env=env, cwd=REPO).returncode
    return rc, time.monotonic() - t0


def markdown(rows: list[report.Row], when: str, where: str, failed: list[str]) -> str:
    lines = [f"Latest run: {when}, {where}.", "",
             "| bench | measure | measured | goal | ratio | status | note |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cmp = "≤" if r.better == "lower" else "≥"
        goal = f"{cmp} {r.goal:g} {r.unit}" if r.goal is not None else ""
        ratio = f"{r.ratio:.2f}" if r.ratio is not None else ""
        lines.append(f"| {r.bench} | {r.measure} | {r.measured:.3g} {r.unit} | {goal} | {ratio} | {r.status} | "
                     f"{r.note} |")
    if failed:
        lines += ["", f"Benches that failed in this run: {', '.join(failed)} (the rows above are their last "
                      "run's, where they gave none in this one)."]
    return "\n".join(lines) + "\n"


def merge_earlier(path: Path, ran: list[str], rows: list[report.Row],
                  when: str) -> tuple[list[report.Row], str, dict[str, str]]:
    """The rows of ``rows`` for the benches that ran, the rows of the other benches from the earlier JSON at
    ``path`` (if any), in BENCHES order; a note for the table's date line saying when each kept bench ran; and
    every bench's run time (``when`` for those that ran now), which the JSON keeps for the next partial run."""
    times = dict.fromkeys(ran, when)
    try:
        old = json.loads(path.read_text())
        kept = [report.Row(**{k: v for k, v in r.items() if k != "status"}) for r in old.get("rows", [])
                if r.get("bench") not in ran]
    except (OSError, ValueError, TypeError):
        return rows, "", times
    earlier = old.get("bench_when") or {}
    for r in kept:
        times.setdefault(r.bench, str(earlier.get(r.bench) or old.get("when", "?")))
    order = {name: i for i, name in enumerate(BENCHES)}
    merged = sorted(kept + rows, key=lambda r: order.get(r.bench, len(order)))  # stable: each bench's own order
    by_time: dict[str, list[str]] = {}
    for name in sorted({r.bench for r in kept}, key=lambda n: order.get(n, len(order))):
        by_time.setdefault(times[name], []).append(name)
    note = "; ".join(f"{', '.join(names)} from the run of {t}" for t, names in by_time.items())
    return merged, (f" ({', '.join(ran) or 'no bench gave rows'}; {note})" if kept else ""), times


def update_docs(doc: Path, table_md: str) -> None:
    text = doc.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(f"{head}{BEGIN}\n{table_md}{END}{tail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these benches")
    parser.add_argument("--json", type=Path, default=REPO / ".cache" / "bench" / "latest.json")
    parser.add_argument("--update-docs", action="store_true", help="write the table into docs/performance.md")
    args = parser.parse_args()
    names = args.only or list(BENCHES)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="virtlet-bench-all-") as tmp:
        sink = Path(tmp) / "rows.jsonl"
        sink.touch()
        for name in names:
            full, quick = BENCHES[name]
            rc, took = run_one(name, quick if args.quick else full, sink)
            print(f"== {name}: {'done' if rc == 0 else f'FAILED (exit {rc})'} in {took:.0f} s", flush=True)
            if rc != 0:
                failed.append(name)
        rows = report.load(str(sink))
    # the benches that gave rows replace theirs; every other bench keeps its rows from the last run
    source = DOC_JSON if args.update_docs or not args.json.exists() else args.json
    ran = [n for n in names if any(r.bench == n for r in rows)]
    rows, earlier, times = merge_earlier(source, ran, rows, when)
    print()
    print(report.table(rows))
    missed = [r for r in rows if r.status == "MISSED"]
    print(f"\n{len(rows)} rows, {len(missed)} MISSED, benches failed: {', '.join(failed) or 'none'}")
    result = json.dumps({"when": when, "bench_when": times, "machine": machine(), "failed": failed,
                         "rows": [asdict(r) | {"status": r.status} for r in rows]}, indent=1) + "\n"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(result)
    print(f"rows written to {args.json}")
    if args.update_docs:
        update_docs(DOC, markdown(rows, when + earlier, machine(), failed))
        DOC_JSON.write_text(result)
        print(f"table written to {DOC} and {DOC_JSON.name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
