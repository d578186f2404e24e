"""CRI call latency of virtletd: p50/p99 of Version, ListPodSandbox and PodSandboxStatus with N sandboxes.

Usage: .venv/bin/python bench/cri_latency.py [--sandboxes 100] [--calls 500]
Starts a real virtletd (libvirt test driver, a real bridge + host-local CNI network on a bench-only bridge) in
a temp dir, creates the sandboxes, measures, removes everything and prints a table.  The goal (issue 20):
p99 <= 5 ms for Status and List with many pods; reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report
from bench.stats import percentile
from tests.helpers.daemon import VirtletdProcess

from virtlet.cri.gen import api_pb2 as api


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sandboxes", type=int, default=100)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="virtlet-bench-", dir="/var/tmp"))
    conf = base / "cni"
    conf.mkdir()
    net, bridge = f"virtlet-bench-{base.name[-6:]}", f"vtbench{base.name[-6:]}"[:15]
    (conf / "10-bench.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": net, "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.98.0.0/16"}]]}},
            {"type": "loopback"}]}))
    daemon = VirtletdProcess(base, ["--libvirt-uri", "test:///default", "--kvm", "off", "--cni-conf-dir", str(conf),
                                    "--image-dir", str(base / "images"), "--log-level", "warning"])
    ids: list[str] = []
    try:
        daemon.start()
        rt = daemon.runtime()
        t0 = time.monotonic()
        for i in range(args.sandboxes):
            cfg = api.PodSandboxConfig(metadata=api.PodSandboxMetadata(
                name=f"bench-{i}", namespace="bench", uid=f"uid-{i}"), labels={"app": "bench"})
            ids.append(rt.RunPodSandbox(api.RunPodSandboxRequest(config=cfg)).pod_sandbox_id)
        create_s = time.monotonic() - t0
        calls: dict[str, Callable[[], object]] = {
            "Version": lambda: rt.Version(api.VersionRequest()),
            f"ListPodSandbox ({args.sandboxes})": lambda: rt.ListPodSandbox(api.ListPodSandboxRequest()),
            "PodSandboxStatus": lambda: rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=ids[0])),
        }
        rows = []
        for name, call in calls.items():
            for _ in range(20):
                call()  # warm up
            samples = []
            for _ in range(args.calls):
                start = time.perf_counter()
                call()
                samples.append((time.perf_counter() - start) * 1000)
            rows.append((name, statistics.median(samples), percentile(samples, 0.99)))
        print(f"virtletd CRI latency, {args.calls} calls each, {args.sandboxes} sandboxes "
              f"(created in {create_s:.1f} s)")
        print(f"{'call':<28}{'p50 ms':>10}{'p99 ms':>10}")
        for name, p50, p99 in rows:
            print(f"{name:<28}{p50:>10.2f}{p99:>10.2f}")
        report.emit([report.Row("cri_latency", f"p99 {name}", p99, "ms", 5.0, note=f"p50 {p50:.2f} ms")
                     for name, p50, p99 in rows])
    finally:
        try:
            rt = daemon.runtime()
            for sid in ids:
                rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid))
                rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))
        finally:
            daemon.stop()
            subprocess.run(["ip", "link", "del", bridge], capture_output=True)
            shutil.rmtree(Path("/var/lib/cni/networks") / net, ignore_errors=True)
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
