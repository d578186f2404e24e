"""Density and concurrency: N tiny VM pods started at once on one node, and 10 parallel starts against one.

Usage: sudo .venv/bin/python bench/density.py [--pods 50] [--parallel 10] [--memory-mib 128] [--timeout 900]
(``--pods 0``: only the parallel starts, a minute instead of several)

What is measured (issue 20 items 4 and 5):

- concurrency: one pod start (RunPodSandbox + CreateContainer + StartContainer) alone, then ``--parallel``
  starts at once from as many threads; the ratio of the parallel batch's wall time to the single start
  (goal <= 2: no global lock around libvirt, CNI or the state database beyond what correctness needs).
- density: ``--pods`` pods started at once (threads); time until every StartContainer returned (all Running),
  time until every guest answers on TCP port 22 (dropbear in the tiny image) at its pod IP; then, with all
  running: virtletd's RSS (goal <= 100 MB), per-VM host overhead = QEMU's RSS minus the resident part of its
  guest-RAM mapping (median, goal <= 64 MiB), and p99 of PodSandboxStatus and ListPodSandbox/ListContainers
  (goal <= 5 ms).  For sizing a node (no goal): the host CPU the booted, idle guests keep busy and virtletd's
  share of it over ``IDLE_S`` seconds, and the disk one VM pod takes on the node after the boot (its dir in
  virtletd's state: overlay, config drive, raw console; and its CRI log).

Guests get ``--memory-mib`` of RAM (the container's memory limit).  Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import report
from bench.stats import MachineCpu, allocated_bytes, percentile, process_cpu_s
from bench.vm_boot import RPC_TIMEOUT, Cleanup, _raise_interrupt, log, tiny_image, tiny_world

from virtlet.console import writer as console_writer
from virtlet.cri.gen import api_pb2 as api
from virtlet.vm.designer import domain_name

ANN = {"kubernetes.io/target-runtime": "virtlet.cloud"}
IDLE_S = 10.0  # how long the idle CPU of the booted pods is sampled


class Pods:
    """Starts VM pods on one virtletd and remembers what it made (for the measures and the clean-up)."""

    def __init__(self, rt: Any, base: Path, image: str, memory_mib: int) -> None:
        self.rt, self.base, self.image, self.memory = rt, base, image, memory_mib * 2**20
        self.lock = threading.Lock()
        self.made: list[tuple[str, str]] = []  # (sandbox id, container id)

    def start(self, name: str) -> tuple[str, str, float]:
        logs = self.base / "logs" / name
        logs.mkdir(parents=True)
        sb_cfg = api.PodSandboxConfig(metadata=api.PodSandboxMetadata(name=name, namespace="density",
                                                                       uid=f"uid-{name}-{self.base.name}"),
                                      hostname=name, log_directory=str(logs), annotations=ANN)
        t0 = time.perf_counter()
        sid = self.rt.RunPodSandbox(api.RunPodSandboxRequest(config=sb_cfg, runtime_handler="virtlet"),
                                    timeout=RPC_TIMEOUT).pod_sandbox_id
        with self.lock:
            self.made.append((sid, ""))
        cfg = api.ContainerConfig(metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=self.image),
                                  log_path="vm.log", annotations=ANN,
                                  linux=api.LinuxContainerConfig(resources=api.LinuxContainerResources(
                                      memory_limit_in_bytes=self.memory)))
        cid = self.rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=sid, config=cfg,
                                                                 sandbox_config=sb_cfg),
                                      timeout=RPC_TIMEOUT).container_id
        with self.lock:
            self.made.append((sid, cid))
        self.rt.StartContainer(api.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
        return sid, cid, time.perf_counter() - t0

    def ip(self, sid: str) -> str:
        st = self.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid), timeout=RPC_TIMEOUT)
        return str(st.status.network.ip)

    def remove_all(self) -> None:
        for sid, cid in reversed(self.made):
            with contextlib.suppress(Exception):
                if cid:
                    self.rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=0), timeout=RPC_TIMEOUT)
                    self.rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
                else:
                    self.rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=RPC_TIMEOUT)
                    self.rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=RPC_TIMEOUT)
        self.made.clear()


def wait_port(ip: str, port: int, deadline: float) -> float | None:
    """Seconds until ``ip:port`` accepts a connection, or None when it did not before ``deadline``."""
    t0 = time.perf_counter()
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((ip, port), timeout=1.0):
            return time.perf_counter() - t0
        time.sleep(0.5)
    return None


def console_tail(base: Path, name: str, lines: int = 12) -> str:
    """The last lines of pod ``name``'s console log (CRI format), to say where a guest that never answered is."""
    log_file = base / "logs" / name / "vm.log"
    try:
        text = log_file.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"  (no console log: {exc})"
    return "\n".join(f"  {line[:200]}" for line in text)


def raw_tail(container_dir: Path, nbytes: int = 400) -> str:
    """The end of the raw console virtlogd wrote (what the guest printed, whether or not the CRI log has it)."""
    raw = console_writer.raw_path(container_dir)
    try:
        with open(raw, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - nbytes))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"  (no raw console: {exc})"
    return "\n".join(f"  {line[:200]}" for line in text.splitlines()[-3:]) + f"\n  ({size} bytes)"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def qemu_overhead_mib(container_id: str, guest_bytes: int) -> float:
    """QEMU's RSS minus the resident part of the mapping that holds guest RAM (the one of the guest's size)."""
    pid = int(Path(f"/run/libvirt/qemu/{domain_name(container_id)}.pid").read_text())
    total, guest_rss, size = 0, 0, 0
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and "-" in fields[0] and ":" not in fields[0]:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            size = hi - lo
        elif fields and fields[0] == "Rss:":
            kib = int(fields[1])
            total += kib
            if size >= guest_bytes:
                guest_rss += kib
    return (total - guest_rss) / 1024


def timed_calls(call: Any, n: int = 200) -> float:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        samples.append((time.perf_counter() - t0) * 1000)
    return percentile(samples, 0.99)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=50, help="0: only the parallel-start measure")
    parser.add_argument("--parallel", type=int, default=10)
    parser.add_argument("--memory-mib", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--image", type=Path, help="tiny guest image (default: guest-images/build.sh tiny)")
    args = parser.parse_args()
    image = tiny_image(args.image)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    rows: list[report.Row] = []
    with Cleanup() as stack:
        base, daemon, vm_image = tiny_world("virtlet-density-", image, stack)
        rt = daemon.runtime()
        pods = Pods(rt, base, vm_image, args.memory_mib)
        stack.callback(pods.remove_all)

        # concurrency: one alone, then a parallel batch
        cpu_one = MachineCpu().start()
        one = pods.start("single")[2]
        cpu_one.stop()
        pods.remove_all()
        cpu_batch = MachineCpu().start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(pods.start, [f"par-{i}" for i in range(args.parallel)]))
        batch = time.perf_counter() - t0
        cpu_batch.stop()
        pods.remove_all()
        # what bounds the batch: the CPU one start uses (QEMU's and libvirtd's start-up, virtletd) times the
        # starts, spread over the machine's CPUs; under TCG each guest started meanwhile also takes a CPU
        floor = args.parallel * cpu_one.busy_s / (os.cpu_count() or 1)
        log(f"one start {one:.2f} s ({cpu_one.busy_s:.2f} CPU-s), {args.parallel} in parallel {batch:.2f} s "
            f"(CPUs {100 * cpu_batch.share:.0f} % busy)")
        rows.append(report.Row("density", f"{args.parallel} parallel pod starts / one start", batch / one, "ratio",
                               2.0, note=f"one {one:.2f} s, {args.parallel} at once {batch:.2f} s; one start uses "
                               f"{cpu_one.busy_s:.2f} CPU-s, so {args.parallel} need >= {floor:.2f} s on "
                               f"{os.cpu_count()} CPUs; CPUs {100 * cpu_batch.share:.0f} % busy during the batch"))

        if args.pods <= 0:
            print(report.table(rows))
            report.emit(rows)
            return 0

        # density
        t0 = time.perf_counter()
        with ThreadPoolExecutor(min(args.pods, 16)) as pool:
            started = list(pool.map(pods.start, [f"pod-{i}" for i in range(args.pods)]))
        all_running = time.perf_counter() - t0
        log(f"{args.pods} pods Running after {all_running:.1f} s")
        deadline = time.monotonic() + args.timeout
        ips = [pods.ip(sid) for sid, _cid, _t in started]
        with ThreadPoolExecutor(min(args.pods, 16)) as pool:
            answered = list(pool.map(lambda ip: wait_port(ip, 22, deadline), ips))
        all_ssh = time.perf_counter() - t0
        silent = [i for i, took in enumerate(answered) if took is None]
        if silent:  # say which guests and where their boot stopped, then fail the bench
            for i in silent[:5]:  # the CRI log's end and the raw console's: did the guest or the log stop?
                cid = started[i][1]
                state = api.ContainerState.Name(pods.rt.ContainerStatus(
                    api.ContainerStatusRequest(container_id=cid), timeout=RPC_TIMEOUT).status.state)
                log(f"pod-{i} ({ips[i]}, {state}) never answered on port 22; its CRI log ends:\n"
                    f"{console_tail(base, f'pod-{i}')}\nits raw console ends:\n"
                    f"{raw_tail(daemon.state_dir / 'containers' / cid)}")
            raise RuntimeError(f"{len(silent)} of {args.pods} pods did not answer on port 22 in {args.timeout:.0f} s")
        log(f"{args.pods} pods answer on port 22 after {all_ssh:.1f} s")
        overheads = [qemu_overhead_mib(cid, args.memory_mib * 2**20) for _sid, cid, _t in started]
        daemon_rss = rss_kib(daemon.proc.pid) / 1024 if daemon.proc else 0.0
        disks = [(allocated_bytes(str(daemon.state_dir / "containers" / cid))
                  + allocated_bytes(str(base / "logs" / f"pod-{i}"))) / 2**20
                 for i, (_sid, cid, _t) in enumerate(started)]
        # the booted guests idle (no calls meanwhile): what they and virtletd (log tails, event loop) keep busy
        daemon_cpu0 = process_cpu_s(daemon.proc.pid) if daemon.proc else 0.0
        idle = MachineCpu().start()
        time.sleep(IDLE_S)
        idle.stop()
        daemon_cpu = (process_cpu_s(daemon.proc.pid) - daemon_cpu0) / IDLE_S if daemon.proc else 0.0
        sid0 = started[0][0]
        p99_status = timed_calls(lambda: rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid0)))
        p99_list = timed_calls(lambda: rt.ListPodSandbox(api.ListPodSandboxRequest()))
        p99_lc = timed_calls(lambda: rt.ListContainers(api.ListContainersRequest()))
        n = args.pods
        rows += [
            report.Row("density", f"{n} VM pods at once: all Running", all_running, "s"),
            report.Row("density", f"{n} VM pods at once: all answer on port 22", all_ssh, "s",
                       note=f"guests boot under TCG on {n} vCPUs sharing this machine's CPUs"),
            report.Row("density", f"virtletd RSS with {n} VM pods", daemon_rss, "MiB", 100.0),
            report.Row("density", "per-VM host overhead (QEMU RSS - guest RAM), median",
                       statistics.median(overheads), "MiB", 64.0, note=f"max {max(overheads):.0f} MiB"),
            report.Row("density", f"{n} idle VM pods: host CPU busy", idle.busy_s / IDLE_S, "cores",
                       note=f"{100 * idle.share:.0f} % of {os.cpu_count()} CPUs over {IDLE_S:.0f} s after all "
                            f"booted; virtletd {daemon_cpu:.3f} of it; guests under TCG"),
            report.Row("density", "disk per VM pod on the node after boot, median", statistics.median(disks), "MiB",
                       note=f"max {max(disks):.1f} MiB: its dir in virtletd's state (overlay, config drive, raw "
                            "console) and its CRI log"),
            report.Row("density", f"PodSandboxStatus p99 with {n} VM pods", p99_status, "ms", 5.0),
            report.Row("density", f"ListPodSandbox p99 with {n} VM pods", p99_list, "ms", 5.0),
            report.Row("density", f"ListContainers p99 with {n} VM pods", p99_lc, "ms", 5.0),
        ]
        t0 = time.perf_counter()
        pods.remove_all()
        log(f"removed {n} pods in {time.perf_counter() - t0:.1f} s")
    print(report.table(rows))
    report.emit(rows)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    log("interrupted; everything the bench made was removed")
    sys.exit(130)
