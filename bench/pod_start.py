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
import re
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report
from bench.vm_boot import (
    RPC_TIMEOUT,
    Cleanup,
    MarkerWatch,
    _raise_interrupt,
    log,
    tiny_image,
    tiny_world,
    wait_all,
)
from tests.helpers.containerd import BUSYBOX_IMAGE, ContainerdProcess

from virtlet.cri.gen import api_pb2 as api

GRACE_S = 30


# The CRI calls one pod's life makes, in order; StopContainer is bounded by the guest's own shutdown.
CALLS = ("RunPodSandbox", "CreateContainer", "StartContainer", "PodSandboxStatus", "ContainerStatus",
         "ListPodSandbox", "ListContainers", "ImageStatus", "StopContainer", "RemoveContainer", "StopPodSandbox",
         "RemovePodSandbox")
START = ("RunPodSandbox", "CreateContainer", "StartContainer")
GUEST_BOUND = ("StopContainer",)

Times = dict[str, float]  # call -> seconds


def one_pod(rt: Any, img: Any, base: Path, label: str, n: int, image: str, vm: bool, timeout: float) -> Times:
    """Start one pod, wait until it runs (VM: the ready line in its CRI log), stop and remove it; each call timed."""
    logs = base / "logs" / f"{label}-{n}"
    logs.mkdir(parents=True)
    ann = {"kubernetes.io/target-runtime": "virtlet.cloud"} if vm else {}
    sb_cfg = api.PodSandboxConfig(metadata=api.PodSandboxMetadata(name=f"start-{label}-{n}", namespace="bench",
                                                                   uid=f"uid-start-{label}-{n}-{base.name}"),
                                  hostname=f"start-{n}", log_directory=str(logs), annotations=ann)
    times: Times = {}

    def timed(name: str, call: Any) -> Any:
        t0 = time.perf_counter()
        out = call()
        times[name] = time.perf_counter() - t0
        return out

    sid = timed("RunPodSandbox", lambda: rt.RunPodSandbox(api.RunPodSandboxRequest(
        config=sb_cfg, runtime_handler="virtlet" if vm else ""), timeout=RPC_TIMEOUT)).pod_sandbox_id
    try:
        cfg = api.ContainerConfig(metadata=api.ContainerMetadata(name="c"), image=api.ImageSpec(image=image),
                                  log_path="c.log", annotations=ann,
                                  command=[] if vm else ["sleep", "3600"])
        cid = timed("CreateContainer", lambda: rt.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=sid, config=cfg, sandbox_config=sb_cfg), timeout=RPC_TIMEOUT)).container_id
        timed("StartContainer", lambda: rt.StartContainer(api.StartContainerRequest(container_id=cid),
                                                          timeout=RPC_TIMEOUT))
        if vm:
            wait_all([MarkerWatch(logs / "c.log")], time.monotonic(), timeout, "virtletd pod")
        timed("PodSandboxStatus", lambda: rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid)))
        timed("ContainerStatus", lambda: rt.ContainerStatus(api.ContainerStatusRequest(container_id=cid)))
        timed("ListPodSandbox", lambda: rt.ListPodSandbox(api.ListPodSandboxRequest()))
        timed("ListContainers", lambda: rt.ListContainers(api.ListContainersRequest()))
        timed("ImageStatus", lambda: img.ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=image))))
        timed("StopContainer", lambda: rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=GRACE_S),
                                                        timeout=RPC_TIMEOUT))
        timed("RemoveContainer", lambda: rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid),
                                                            timeout=RPC_TIMEOUT))
    finally:
        timed("StopPodSandbox", lambda: rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid),
                                                          timeout=RPC_TIMEOUT))
        timed("RemovePodSandbox", lambda: rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid),
                                                              timeout=RPC_TIMEOUT))
    times["pod start"] = sum(times[c] for c in START)
    times["sandbox stop + remove"] = times["StopPodSandbox"] + times["RemovePodSandbox"]
    return times


def med(rows: list[Times], field: str) -> float:
    return statistics.median(r[field] for r in rows)


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
        base, daemon, vm_image = tiny_world("virtlet-podstart-", image, stack)
        containerd = ContainerdProcess()
        stack.callback(containerd.stop)
        containerd.start()
        vrt, crt = (daemon.runtime(), daemon.image()), (containerd.runtime(), containerd.image())
        one_pod(*crt, base, "warm-cd", 0, BUSYBOX_IMAGE, False, args.timeout)  # first-pod costs of both
        one_pod(*vrt, base, "warm-vm", 0, vm_image, True, args.timeout)
        for r in range(args.rounds):
            order = ("vm", "cd") if r % 2 == 0 else ("cd", "vm")
            for which in order:
                if which == "vm":
                    vm_rows.append(one_pod(*vrt, base, "vm", r, vm_image, True, args.timeout))
                else:
                    cd_rows.append(one_pod(*crt, base, "cd", r, BUSYBOX_IMAGE, False, args.timeout))
            log(f"round {r + 1}: start virtletd {vm_rows[-1]['pod start']:.3f} s, containerd "
                f"{cd_rows[-1]['pod start']:.3f} s")
        qemu = qemu_start_ms(daemon.log_path)[1:]  # the warm-up pod's first
    print_table(vm_rows, cd_rows, qemu)
    return 0


def qemu_start_ms(daemon_log: Path) -> list[float]:
    """QEMU's own share of each StartContainer, from virtletd's log line (libvirt's domain create, in order)."""
    return [float(m.group(1)) for m in re.finditer(r"started: QEMU start ([0-9.]+) ms",
                                                     daemon_log.read_text(errors="replace"))]


def print_table(vm: list[Times], cd: list[Times], qemu: list[float] | None = None) -> None:
    fields = (*CALLS, "pod start", "sandbox stop + remove")
    print(f"CRI calls of one pod's life, medians of {len(vm)} rounds (milliseconds)")
    print(f"{'call':<24}{'virtletd':>10}{'containerd':>12}{'ratio':>8}")
    for f in fields:
        v, c = med(vm, f) * 1000, med(cd, f) * 1000
        print(f"{f:<24}{v:>10.1f}{c:>12.1f}{v / c if c else float('nan'):>8.2f}")
    rows = [report.Row("pod_start", "pod start virtletd/containerd (Run+Create+Start)",
                       med(vm, "pod start") / med(cd, "pod start"), "ratio", 1.0,
                       note=f"virtletd {med(vm, 'pod start'):.3f} s, containerd {med(cd, 'pod start'):.3f} s"),
            report.Row("pod_start", "StopPodSandbox + RemovePodSandbox", med(vm, "sandbox stop + remove"), "s",
                       0.5, note=f"containerd {med(cd, 'sandbox stop + remove'):.3f} s"),
            report.Row("pod_start", "StopContainer of a guest honouring ACPI", med(vm, "StopContainer"), "s",
                       note="bounded by the tiny guest's own shutdown; goal: shutdown + 0.2 s")]
    if qemu:
        q = statistics.median(qemu)
        start_ms = med(vm, "StartContainer") * 1000
        print(f"StartContainer: QEMU's own start (libvirt domain create) {q:.1f} ms of {start_ms:.1f} ms")
        rows.append(report.Row("pod_start", "StartContainer: QEMU's own start (libvirt domain create)", q, "ms",
                               note=f"of StartContainer's {start_ms:.1f} ms; the rest is virtletd's (taps, log "
                                    f"writer, state)"))
    for call in CALLS:
        if call in GUEST_BOUND:
            continue
        v, c = med(vm, call), med(cd, call)
        rows.append(report.Row("pod_start", f"{call} virtletd/containerd", v / c if c else float("inf"),
                               "ratio", 1.0, note=f"{v * 1000:.1f} ms vs {c * 1000:.1f} ms"))
    report.emit(rows)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    log("interrupted; everything the bench made was removed")
    sys.exit(130)
