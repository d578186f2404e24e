"""Volume throughput inside a VM pod (virtiofs vs 9p vs a block disk vs a scratch disk) and the first-use time of
a persistent root against the image size.

Usage: .venv/bin/python bench/volumes.py [--size-mb 256] [--image PATH] [--timeout 300]

What is measured (one tiny VM, QEMU TCG, booted through virtletd like a kubelet would):

- **virtiofs**: a host directory shared with virtiofs (``share_driver: virtiofs``); the guest writes a file of
  ``--size-mb`` MiB with ``dd bs=1M conv=fsync``, drops its page cache and reads it back.
- **9p**: the same through 9p needs the ``9p``/``9pnet_virtio`` guest modules; the tiny image runs Debian's cloud
  kernel, which has none, so the row is reported as unavailable with that reason (not measured).
- **block disk**: a loop device (on a sparse file in the bench's temp dir) passed as a CRI device
  (``volumeMode: Block``); the guest writes and reads the raw device (``/dev/benchpvc``), same dd commands.
- **scratch disk**: an emptyDir in ``VirtletScratchDisks`` (an ext4 raw file, ``docs/volumes.md``); a file on it.
- **persistent root**: CreateContainer with a loop device at devicePath ``/``: the first use writes the image to
  the device (``qemu-img convert``), a second container on the same device copies nothing.  Both times are
  reported with the image's virtual size; a CreateContainer with the usual overlay is the reference.

Times are taken in the guest (``/proc/uptime``, 10 ms resolution) around each dd, so the guest agent's round
trips do not count.  Everything the bench makes (virtletd, pod, domain, loop devices, CNI bridge, temp dir) is
removed at the end, also on failure.  No goal: the numbers are for comparing the volume kinds on one machine.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

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
from tests.helpers.daemon import VirtletdProcess

from virtlet.cri.gen import api_pb2 as api

BENCH = "volumes"
NO_9P = "Debian's cloud kernel (the tiny image's) has no 9p/9pnet_virtio modules"


def loop_device(backing: Path, size: int, stack: Cleanup) -> str:
    with open(backing, "wb") as f:
        f.truncate(size)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                         check=True).stdout.strip()
    stack.callback(subprocess.run, ["losetup", "-d", dev], capture_output=True)
    return dev


class BenchPod:
    """One pod sandbox; containers are created in it with the given mounts/devices/annotations."""

    def __init__(self, daemon: VirtletdProcess, base: Path, image: str, name: str) -> None:
        self.rt = daemon.runtime()
        self.log_dir = base / "logs" / name
        self.log_dir.mkdir(parents=True)
        self.image = image
        self.annotations = {"kubernetes.io/target-runtime": "virtlet.cloud"}
        self.config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}-{base.name}"),
            hostname=name, log_directory=str(self.log_dir), annotations=self.annotations)
        self.id = self.rt.RunPodSandbox(api.RunPodSandboxRequest(config=self.config, runtime_handler="virtlet"),
                                        timeout=RPC_TIMEOUT).pod_sandbox_id
        self.attempt = 0

    def create(self, mounts: list[api.Mount] = (), devices: list[api.Device] = (),  # type: ignore[assignment]
               annotations: dict[str, str] | None = None) -> tuple[str, float]:
        attempt, self.attempt = self.attempt, self.attempt + 1
        cfg = api.ContainerConfig(metadata=api.ContainerMetadata(name="vm", attempt=attempt),
                                  image=api.ImageSpec(image=self.image), log_path=f"vm/{attempt}.log",
                                  annotations={**self.annotations, **(annotations or {})}, mounts=list(mounts),
                                  devices=list(devices))
        t0 = time.monotonic()
        cid = self.rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=self.id, config=cfg,
                                                                 sandbox_config=self.config),
                                      timeout=RPC_TIMEOUT).container_id
        return cid, time.monotonic() - t0

    def remove(self, cid: str) -> None:
        self.rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=0), timeout=RPC_TIMEOUT)
        self.rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)

    def sh(self, cid: str, script: str, timeout: int = 600) -> str:
        res = self.rt.ExecSync(api.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=timeout),
                               timeout=timeout + 30)
        if res.exit_code != 0:
            raise RuntimeError(f"guest command failed ({res.exit_code}): {script}\n{res.stderr.decode()[-2000:]}")
        return bytes(res.stdout).decode()


def guest_rw(pod: BenchPod, cid: str, target: str, size_mb: int) -> tuple[float, float]:
    """MiB/s written and read by dd in the guest on ``target`` (a file or a block device)."""
    script = (f"t() {{ cut -d' ' -f1 /proc/uptime; }}; a=$(t); dd if=/dev/zero of={target} bs=1M count={size_mb} "
              f"conv=fsync 2>/dev/null; b=$(t); sync; echo 3 > /proc/sys/vm/drop_caches; c=$(t); "
              f"dd if={target} of=/dev/null bs=1M count={size_mb} 2>/dev/null; d=$(t); echo $a $b $c $d")
    a, b, c, d = (float(x) for x in pod.sh(cid, script).split())
    return size_mb / max(b - a, 0.01), size_mb / max(d - c, 0.01)


def run(args: argparse.Namespace, image: Path, rows: list[report.Row]) -> None:
    size = args.size_mb << 20
    with Cleanup() as stack:
        base, daemon, name = tiny_world("virtlet-benchvol-", image, stack)
        image_size = int(json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                                   capture_output=True, text=True, check=True).stdout)
                         ["virtual-size"])
        pod = BenchPod(daemon, base, name, "vol-bench")
        shared = base / "share"
        shared.mkdir()
        shared.chmod(0o777)
        empty = base / "pods" / "u" / "volumes" / "kubernetes.io~empty-dir" / "scratch"
        empty.mkdir(parents=True)
        pvc = loop_device(base / "pvc.img", size + (64 << 20), stack)
        cid, _ = pod.create(
            mounts=[api.Mount(container_path="/bench/virtiofs", host_path=str(shared)),
                    api.Mount(container_path="/bench/scratch", host_path=str(empty))],
            devices=[api.Device(host_path=pvc, container_path="/dev/benchpvc", permissions="rw")],
            annotations={"VirtletScratchDisks": f"scratch={args.size_mb + 64}Mi"})
        try:
            pod.rt.StartContainer(api.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
            wait_all([MarkerWatch(pod.log_dir / "vm" / "0.log")], time.monotonic(), args.timeout, "bench VM")
            deadline = time.monotonic() + args.timeout
            while True:
                try:
                    pod.sh(cid, "true", timeout=5)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
            for label, target in (("virtiofs", "/bench/virtiofs/f"), ("block disk (loop device, raw)", "/dev/benchpvc"),
                                  ("scratch disk (ext4 file)", "/bench/scratch/f")):
                w, r = guest_rw(pod, cid, target, args.size_mb)
                log(f"{label}: write {w:.1f} MiB/s, read {r:.1f} MiB/s")
                rows.append(report.Row(BENCH, f"guest write {label}", w, "MiB/s", better="higher",
                                       note=f"{args.size_mb} MiB dd conv=fsync"))
                rows.append(report.Row(BENCH, f"guest read {label}", r, "MiB/s", better="higher",
                                       note=f"{args.size_mb} MiB dd, guest cache dropped"))
        finally:
            pod.remove(cid)
        log(f"9p: unavailable: {NO_9P}")
        # persistent root: first use (copy), second use (no copy), the overlay as reference
        root_dev = loop_device(base / "root.img", image_size + (64 << 20), stack)
        root = [api.Device(host_path=root_dev, container_path="/", permissions="rw")]
        first_cid, first = pod.create(devices=root)
        pod.remove(first_cid)
        again_cid, again = pod.create(devices=root)
        pod.remove(again_cid)
        ref_cid, ref = pod.create()
        pod.remove(ref_cid)
        mib = image_size / (1 << 20)
        rows.append(report.Row(BENCH, f"persistent root first use ({mib:.0f} MiB image)", first, "s",
                               note=f"CreateContainer; {mib / max(first, 0.001):.0f} MiB/s"))
        rows.append(report.Row(BENCH, "persistent root later use (no copy)", again, "s", note="CreateContainer"))
        rows.append(report.Row(BENCH, "overlay root (reference)", ref, "s", note="CreateContainer"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256, help="MiB written and read per volume")
    parser.add_argument("--image", type=Path, help="tiny guest image (default: guest-images/build.sh tiny)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the boot may take")
    args = parser.parse_args()
    if not 1 <= args.size_mb <= 4096:
        parser.error("--size-mb must be 1..4096")
    image = tiny_image(args.image)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    rows: list[report.Row] = []
    try:
        run(args, image, rows)
    finally:
        print(f"Volumes of a VM pod (tiny image, QEMU TCG), {args.size_mb} MiB per volume")
        rows.append(report.Row(BENCH, "guest write/read 9p (unavailable)", float("nan"), "MiB/s",
                               note=f"not measured: {NO_9P}"))
        print(report.table(rows))
        print(f"9p: unavailable: {NO_9P}")
        report.emit(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
