"""Added latency of virtlet-criproxy: the same CRI calls to containerd directly and through the proxy.

Usage: .venv/bin/python bench/criproxy_latency.py [--pods 50] [--calls 300]
Starts a real containerd (tests/helpers/containerd.py), a real virtletd (libvirt test driver, loopback CNI)
and the proxy in front of both, runs ``--pods`` ordinary pod sandboxes on containerd, then times Version,
ListPodSandbox (all pods; the proxy also asks virtletd) and PodSandboxStatus, alternating direct and proxied
calls so machine load hits both alike.  Prints p50/p99 of each, the added p50 and the p50 ratio; the goal is
at most 0.5 ms added at p50 on every call (issue 20).  Everything it started is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report
from bench.stats import percentile
from tests.helpers.containerd import ContainerdProcess
from tests.helpers.daemon import VirtletdProcess

from virtlet.cri import versions
from virtlet.cri.gen import api_pb2 as api


def _start_proxy(base: Path, primary: str, virtlet: str) -> tuple[subprocess.Popen[bytes], grpc.Channel]:
    sock = base / "criproxy.sock"
    with open(base / "criproxy.log", "ab") as log:
        cmd = [sys.executable, "-m", "virtlet.proxy.main", "--listen", str(sock), "--primary", primary,
               "--secondary", f"virtlet.cloud={virtlet}", "--log-level", "warning",
               "--state-dir", str(base / "criproxy-state")]
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    channel = grpc.insecure_channel(f"unix://{sock}")
    deadline = time.monotonic() + 20
    while True:
        try:
            versions.runtime_stub(channel).Version(api.VersionRequest(), timeout=2)
            return proc, channel
        except grpc.RpcError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("virtlet-criproxy did not start; see criproxy.log") from None
            time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="virtlet-bench-proxy-", dir="/var/tmp"))
    conf = base / "cni"
    conf.mkdir()
    (conf / "10-lo.conflist").write_text(
        '{"cniVersion": "1.0.0", "name": "virtlet-bench-lo", "plugins": [{"type": "loopback"}]}\n')
    containerd = ContainerdProcess()
    virtletd = VirtletdProcess(base / "virtletd", ["--libvirt-uri", "test:///default", "--kvm", "off",
                                                   "--cni-conf-dir", str(conf),
                                                   "--image-dir", str(base / "img")])
    (base / "virtletd").mkdir()
    proc = None
    try:
        containerd.start()
        virtletd.start()
        proc, channel = _start_proxy(base, containerd.address, f"unix://{virtletd.socket}")
        direct, proxied = containerd.runtime(), versions.runtime_stub(channel)
        first = ""
        for i in range(args.pods):
            cfg = api.PodSandboxConfig(metadata=api.PodSandboxMetadata(name=f"bench-{i}", namespace="bench",
                                                                        uid=f"bench-uid-{i}"),
                                       log_directory=str(base / "logs" / str(i)))
            sid = direct.RunPodSandbox(api.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
            first = first or sid
        calls: dict[str, Callable[[Any], object]] = {
            "Version": lambda rt: rt.Version(api.VersionRequest(), timeout=10),
            f"ListPodSandbox ({args.pods} pods)": lambda rt: rt.ListPodSandbox(api.ListPodSandboxRequest(),
                                                                                timeout=10),
            "PodSandboxStatus": lambda rt: rt.PodSandboxStatus(
                api.PodSandboxStatusRequest(pod_sandbox_id=first), timeout=10),
        }
        rows = []
        for name, call in calls.items():
            samples: dict[str, list[float]] = {"direct": [], "proxy": []}
            for _ in range(10):  # warm both paths (channels, version probe)
                call(direct)
                call(proxied)
            for _ in range(args.calls):
                for label, rt in (("direct", direct), ("proxy", proxied)):
                    t0 = time.perf_counter()
                    call(rt)
                    samples[label].append((time.perf_counter() - t0) * 1000)
            d50, p50 = percentile(samples["direct"], 0.5), percentile(samples["proxy"], 0.5)
            d99, p99 = percentile(samples["direct"], 0.99), percentile(samples["proxy"], 0.99)
            rows.append((name, d50, d99, p50, p99, p50 - d50, p50 / d50 if d50 else float("nan")))
        print(f"virtlet-criproxy added latency, {args.calls} calls each (containerd 1.6 direct vs through "
              "the proxy, which also asks virtletd for lists)")
        head = ("call", "direct p50", "p99", "proxy p50", "p99", "added p50", "ratio")
        print(f"{head[0]:<28}{head[1]:>11}{head[2]:>8}{head[3]:>11}{head[4]:>8}{head[5]:>11}{head[6]:>7}")
        for name, d50, d99, p50, p99, added, ratio in rows:
            print(f"{name:<28}{d50:>11.2f}{d99:>8.2f}{p50:>11.2f}{p99:>8.2f}{added:>11.2f}{ratio:>7.2f}")
        print("(milliseconds; goal: added p50 <= 0.5 ms)")
        report.emit([report.Row("criproxy_latency", f"proxy added p50: {name}", added, "ms", 0.5,
                                note=f"containerd direct p50 {d50:.2f} ms")
                     for name, d50, _d99, _p50, _p99, added, _ratio in rows])
        channel.close()
        return 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        containerd.stop()
        virtletd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
