"""Pod start and stop, runtime side: virtletd's VM pod against containerd's busybox pod in the same run.

Usage: .venv/bin/python bench/pod_start.py [--rounds 3] [--image PATH] [--timeout 300]

Per round (the two runtimes alternate which goes first, so drift in machine load hits both):

- start: RunPodSandbox + CreateContainer + StartContainer, the image already pulled (goal: virtletd's sum <=
  containerd's, ratio <= 1.0; issue 20 item 2).
- stop: after the guest printed its ready line, StopContainer with a 30 s grace period (the tiny guest powers
  off on the ACPI press; containerd's busybox ``sleep`` dies on SIGTERM at once), then StopPodSandbox +
  RemovePodSandbox (goal <= 0.5 s; item 8).

Everything the bench makes (both daemons, sandboxes, domains, bridges, temp dirs) is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report
from bench.vm_boot import (
    RPC_TIMEOUT,
    Cleanup,
    MarkerWatch,
    _raise_interrupt,
    bridge_cni,
    log,
    start_virtletd,
    tiny_image,
    wait_all,
)
from tests.helpers.containerd import BUSYBOX_IMAGE, ContainerdProcess
from tests.helpers.http_server import ImageHttpServer

from virtlet.cri.gen import api_pb2 as api

GRACE_S = 30


@dataclass(frozen=True)
class Times:
    run_sandbox: float
    create: float
    start: float
    stop_container: float
    stop_remove_sandbox: float

    @property
    def pod_start(self) -> float:
        return self.run_sandbox + self.create + self.start


def _timed(call: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = call()
    return out, time.perf_counter() - t0


def one_pod(rt: Any, base: Path, label: str, n: int, image: str, vm: bool, timeout: float) -> Times:
    """Start one pod, wait until it runs (VM: the ready line in its CRI log), stop and remove it."""
    logs = base / "logs" / f"{label}-{n}"
    logs.mkdir(parents=True)
    ann = {"kubernetes.io/target-runtime": "virtlet.cloud"} if vm else {}
    sb_cfg = api.PodSandboxConfig(metadata=api.PodSandboxMetadata(name=f"start-{label}-{n}", namespace="bench",
                                                                   uid=f"uid-start-{label}-{n}-{base.name}"),
                                  hostname=f"start-{n}", log_directory=str(logs), annotations=ann)
    resp, t_run = _timed(lambda: rt.RunPodSandbox(api.RunPodSandboxRequest(
        config=sb_cfg, runtime_handler="virtlet" if vm else ""), timeout=RPC_TIMEOUT))
    sid = resp.pod_sandbox_id
    try:
        cfg = api.ContainerConfig(metadata=api.ContainerMetadata(name="c"), image=api.ImageSpec(image=image),
                                  log_path="c.log", annotations=ann,
                                  command=[] if vm else ["sleep", "3600"])
        resp, t_create = _timed(lambda: rt.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg), timeout=RPC_TIMEOUT))
        cid = resp.container_id
        _, t_start = _timed(lambda: rt.StartContainer(api.StartContainerRequest(container_id=cid),
                                                      timeout=RPC_TIMEOUT))
        if vm:
            wait_all([MarkerWatch(logs / "c.log")], time.monotonic(), timeout, "virtletd pod")
        _, t_stop = _timed(lambda: rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=GRACE_S),
                                                    timeout=RPC_TIMEOUT))
        rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    finally:
        t0 = time.perf_counter()
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=RPC_TIMEOUT)
        rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=RPC_TIMEOUT)
        t_sandbox = time.perf_counter() - t0
    return Times(t_run, t_create, t_start, t_stop, t_sandbox)


def med(rows: list[Times], field: str) -> float:
    return statistics.median(getattr(r, field) for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", type=Path, help="tiny guest image (default: guest-images/build.sh tiny)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one boot may take")
    args = parser.parse_args()
    image = tiny_image(args.image)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    vm_rows: list[Times] = []
    cd_rows: list[Times] = []
    with Cleanup() as stack:
        base = Path(tempfile.mkdtemp(prefix="virtlet-podstart-", dir="/var/tmp"))
        base.chmod(0o755)
        stack.callback(shutil.rmtree, base, True)
        (base / "www").mkdir()
        shutil.copy(image, base / "www" / "tiny.qcow2")
        server = stack.enter_context(ImageHttpServer(base / "www"))
        daemon = start_virtletd(base, bridge_cni(base, stack), stack)
        containerd = ContainerdProcess()
        stack.callback(containerd.stop)
        containerd.start()
        vm_image = server.name("files/tiny.qcow2")
        daemon.image().PullImage(api.PullImageRequest(image=api.ImageSpec(image=vm_image)), timeout=300)
        vrt, crt = daemon.runtime(), containerd.runtime()
        one_pod(crt, base, "warm-cd", 0, BUSYBOX_IMAGE, False, args.timeout)  # first-pod costs of both
        one_pod(vrt, base, "warm-vm", 0, vm_image, True, args.timeout)
        for r in range(args.rounds):
            order = ("vm", "cd") if r % 2 == 0 else ("cd", "vm")
            for which in order:
                if which == "vm":
                    vm_rows.append(one_pod(vrt, base, "vm", r, vm_image, True, args.timeout))
                else:
                    cd_rows.append(one_pod(crt, base, "cd", r, BUSYBOX_IMAGE, False, args.timeout))
            log(f"round {r + 1}: start virtletd {vm_rows[-1].pod_start:.3f} s, containerd "
                f"{cd_rows[-1].pod_start:.3f} s")
    print_table(vm_rows, cd_rows)
    return 0


def print_table(vm: list[Times], cd: list[Times]) -> None:
    fields = ("run_sandbox", "create", "start", "pod_start", "stop_container", "stop_remove_sandbox")
    print(f"Pod start/stop, runtime side, medians of {len(vm)} rounds (seconds)")
    print(f"{'step':<22}{'virtletd':>10}{'containerd':>12}{'ratio':>8}")
    for f in fields:
        v, c = med(vm, f), med(cd, f)
        print(f"{f:<22}{v:>10.3f}{c:>12.3f}{v / c if c else float('nan'):>8.2f}")
    ratio = med(vm, "pod_start") / med(cd, "pod_start")
    report.emit([
        report.Row("pod_start", "pod start virtletd/containerd (Run+Create+Start)", ratio, "ratio", 1.0,
                   note=f"virtletd {med(vm, 'pod_start'):.3f} s, containerd {med(cd, 'pod_start'):.3f} s"),
        report.Row("pod_start", "StopContainer of a guest honouring ACPI", med(vm, "stop_container"), "s",
                   note="includes the guest's own shutdown (tiny image); goal: shutdown + 0.2 s"),
        report.Row("pod_start", "StopPodSandbox + RemovePodSandbox", med(vm, "stop_remove_sandbox"), "s", 0.5,
                   note=f"containerd {med(cd, 'stop_remove_sandbox'):.3f} s"),
    ])


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    log("interrupted; everything the bench made was removed")
    sys.exit(130)
