"""VM boot time through virtletd against the same domain started by ``virsh create`` and against the leanest QEMU
command line for the same guest, written by hand: ratios virtletd/virsh and virtletd/QEMU (goal <= 1.10 each).

Usage: .venv/bin/python bench/vm_boot.py [--rounds 3] [--image PATH] [--timeout 300]

What is measured, per round (the paths take turns going first, so drift in machine load hits all of them):

- virtletd: from sending CreateContainer until the guest's marker line (``VIRTLET-TINY-READY``) is in the CRI
  log file.  This includes everything virtletd does for a VM: overlay, config drive, domain XML, define,
  StartContainer (taps, start, tap move), and the console log writer turning the raw console into CRI lines.
- virsh: the domain XML virtletd made (read back from ``ContainerStatus(verbose)``), renamed with a fresh
  UUID (domain and SMBIOS, which libvirt requires to be equal), on a fresh overlay of the same stored image,
  a copy of the same config drive and its own console socket/log.  The pod sandbox stays up, so the VM gets
  the same network path: the host tap is made, ``virsh create`` starts the domain, the tap is moved into the
  pod netns and enslaved to the bridge (the same ``PodNetwork`` calls virtletd makes), and the pod's DHCP
  server answers the VM's MAC.  Timed from the tap creation (a few ms) + ``virsh create`` until the marker
  is in the raw console log that virtlogd writes.  The overlay is made before the clock starts: it is the
  part of virtletd's work that the ratio is meant to include.

- QEMU by hand: the leanest command line this bench can write for the same guest: ``qemu-system-x86_64`` run
  directly (no libvirt), ``-nodefaults``, no video, USB, balloon, RNG or virtio-serial, the same machine type,
  accelerator, memory and vCPUs; a fresh overlay of the same image on virtio-blk, a copy of the same config
  drive as the IDE CD-ROM, the same NIC (the pod's tap and MAC, moved into the pod netns once QEMU holds it:
  ``-daemonize`` returns after QEMU's initialisation) and the serial console to a file.  SeaBIOS as in both
  others.  Timed from the tap creation until the marker is in that file.

All paths poll their file every 0.02 s.  Everything the bench makes (virtletd, its sandbox and containers,
domains, taps, overlays, the CNI bridge, temp dirs) is removed at the end, also on failure or Ctrl-C.
No goal is asserted: TCG boot times swing with the load of the machine, compare medians and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import libvirt
from bench import report
from tests.helpers.daemon import VirtletdProcess
from tests.helpers.http_server import ImageHttpServer

from virtlet import procs
from virtlet.console import writer as console_writer
from virtlet.cri.gen import api_pb2 as api
from virtlet.network.extra_networks import ExtraNetworks
from virtlet.network.model import PodNetworkInfo
from virtlet.network.pod_network import PodNetwork
from virtlet.vm import domain_xml as dx
from virtlet.vm import overlay

REPO = Path(__file__).resolve().parents[1]
MARKER = b"VIRTLET-TINY-READY"
POLL_S = 0.02  # the three paths' files alike; fine enough to see the console log writer's lag
STOP_POLL_S = 0.01  # the shutdown reference's poll: it errs by at most this in the reference's favour
SETTLE_S = 2.0  # after the ready line, before a stop: the guest's ACPI handling is surely up
STOP_GRACE_S = 60
ALIVE_CHECK_S = 2.0
LIBVIRT_URI = "qemu:///system"
RPC_TIMEOUT = 120


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["virsh", "-c", LIBVIRT_URI, *args], capture_output=True, text=True, check=check,
                          timeout=RPC_TIMEOUT)


class MarkerWatch:
    """Reads a growing file incrementally until the marker shows up (a marker split across two reads counts)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.tail = b""

    def seen(self) -> bool:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return False
        self.offset += len(chunk)
        data = self.tail + chunk
        self.tail = data[-len(MARKER):]
        return MARKER in data

    def failure(self, timeout: float, what: str) -> RuntimeError:
        try:
            end = self.path.read_bytes()[-3000:].decode(errors="replace")
        except FileNotFoundError:
            end = "(file not created)"
        return RuntimeError(f"{what}: no {MARKER.decode()} in {self.path} within {timeout:.0f} s; its end:\n{end}")


def wait_all(watches: list[MarkerWatch], t0: float, timeout: float, what: str,
             gone: Callable[[], str | None] = lambda: None) -> list[float]:
    """Seconds from ``t0`` until each file shows the marker, polled together so their times compare.
    ``gone`` (asked every ``ALIVE_CHECK_S``) returns why the VM is no longer running, to fail fast."""
    found: dict[int, float] = {}
    deadline = t0 + timeout
    next_check = t0 + ALIVE_CHECK_S
    while True:
        for i, w in enumerate(watches):
            if i not in found and w.seen():
                found[i] = time.monotonic() - t0
        if len(found) == len(watches):
            return [found[i] for i in range(len(watches))]
        now = time.monotonic()
        if now > deadline:
            raise next(w.failure(timeout, what) for i, w in enumerate(watches) if i not in found)
        if now > next_check and not found:  # once a marker is seen the VM has booted: the rest will follow
            next_check = now + ALIVE_CHECK_S
            why = gone()
            if why is not None:
                raise RuntimeError(f"{what}: the VM stopped before the marker: {why}")
        time.sleep(POLL_S)


# -- set-up pieces, each registering its own undo on the ExitStack --------------------------------------------

def tiny_image(explicit: Path | None) -> Path:
    """``--image``, or what ``guest-images/build.sh tiny`` prints on its last line (it builds when stale)."""
    if explicit is not None:
        if not explicit.is_file():
            raise SystemExit(f"--image {explicit}: no such file")
        return explicit
    out = subprocess.run(["bash", str(REPO / "guest-images" / "build.sh"), "tiny"], stdout=subprocess.PIPE,
                         text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise SystemExit("guest-images/build.sh tiny failed; pass a prebuilt image with --image PATH")
    return Path(lines[-1])


def bridge_cni(base: Path, stack: contextlib.ExitStack) -> Path:
    """A bridge + host-local CNI network on a bench-only bridge and a /24 no route of this host uses yet."""
    used = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    free = [n for n in range(1, 255) if f"10.97.{n}." not in used]
    n = random.choice(free)
    suffix = base.name[-8:]
    name, bridge = f"vbench-{suffix}", f"vbb{suffix}"[:15]
    conf = base / "cni"
    conf.mkdir()
    (conf / "10-bridge.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": name, "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": f"10.97.{n}.0/24"}]],
                      "routes": [{"dst": "0.0.0.0/0"}]}},
            {"type": "loopback"}]}))

    def undo() -> None:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(f"/var/lib/cni/networks/{name}", ignore_errors=True)

    stack.callback(undo)
    return conf


def start_virtletd(base: Path, conf: Path, stack: contextlib.ExitStack) -> VirtletdProcess:
    subprocess.run(["bash", str(REPO / "tools" / "libvirt-daemons.sh"), "start"], check=True)
    daemon = VirtletdProcess(base, [
        "--kvm", "off", "--cni-conf-dir", str(conf), "--image-dir", str(base / "images"),
        "--image-translations-dir", str(base / "translations"), "--image-default-scheme", "http",
        "--image-source-allow", "127.0.0.0/8", "--log-level", "info"])  # untranslated names on loopback

    def undo() -> None:
        try:
            if daemon.proc is None or daemon.proc.poll() is not None:
                daemon.start()  # its start-up recovery finishes what a dead virtletd left
            rt = daemon.runtime()
            for c in rt.ListContainers(api.ListContainersRequest(), timeout=10).containers:
                rt.StopContainer(api.StopContainerRequest(container_id=c.id, timeout=0), timeout=RPC_TIMEOUT)
                rt.RemoveContainer(api.RemoveContainerRequest(container_id=c.id), timeout=RPC_TIMEOUT)
            for sb in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=10).items:
                rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sb.id), timeout=RPC_TIMEOUT)
                rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=RPC_TIMEOUT)
        except Exception as exc:
            log(f"cleanup through virtletd failed: {exc}\n{daemon.log()}")
        finally:
            daemon.stop()

    stack.callback(undo)
    daemon.start()
    return daemon


def tiny_world(prefix: str, image: Path, stack: contextlib.ExitStack) -> tuple[Path, VirtletdProcess, str]:
    """What every VM bench starts from: a temp dir QEMU can reach, the tiny image served over HTTP, a virtletd on a
    bench-only bridge network that has pulled it.  Returns the dir, the daemon and the image name; everything is
    undone by ``stack``."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    base.chmod(0o755)  # libvirt's QEMU must reach the overlays and the config drive
    stack.callback(shutil.rmtree, base, True)
    www = base / "www"
    www.mkdir()
    shutil.copy(image, www / "tiny.qcow2")
    server = stack.enter_context(ImageHttpServer(www))
    daemon = start_virtletd(base, bridge_cni(base, stack), stack)
    name = server.name("files/tiny.qcow2")
    try:
        daemon.image().PullImage(api.PullImageRequest(image=api.ImageSpec(image=name)), timeout=300)
    except Exception:
        log(f"--- end of virtletd's log ---\n{daemon.log()}")
        raise
    return base, daemon, name


# -- the two paths ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Split:
    """One virtletd boot: the total (to the marker in the CRI log) and where the time went."""

    total: float
    create: float  # the CreateContainer RPC (overlay, config drive, define)
    start: float  # the StartContainer RPC (taps, domain start, tap move)
    raw: float  # from CreateContainer until the marker is in the raw console log virtlogd writes
    stop: float = 0.0  # StopContainer with a grace period, SETTLE_S after the marker: ACPI press to VM gone


class VirtletdPath:
    """One VM pod whose container is created, booted, stopped and removed once per round."""

    def __init__(self, daemon: VirtletdProcess, base: Path, image: str) -> None:
        self.rt = daemon.runtime()
        self.state_dir = daemon.state_dir
        self.log_dir = base / "logs"
        self.log_dir.mkdir()
        self.image = image
        annotations = {"kubernetes.io/target-runtime": "virtlet.cloud"}
        self.annotations = annotations
        self.sandbox_config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name="vm-boot-bench", namespace="default",
                                            uid=f"uid-vm-boot-{base.name}"),
            hostname="vm-boot-bench", log_directory=str(self.log_dir), annotations=annotations)
        self.sandbox_id = self.rt.RunPodSandbox(api.RunPodSandboxRequest(
            config=self.sandbox_config, runtime_handler="virtlet"), timeout=RPC_TIMEOUT).pod_sandbox_id
        self.attempt = 0

    def network(self) -> PodNetworkInfo:
        resp = self.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=self.sandbox_id, verbose=True),
                                        timeout=RPC_TIMEOUT)
        return PodNetworkInfo.from_dict(json.loads(resp.info["info"])["network"])

    def boot(self, timeout: float, keep: Path | None = None) -> tuple[Split, dict[str, Any]]:
        """Times from CreateContainer to the marker in the CRI log (and the steps on the way).  With ``keep``,
        also return the domain XML and copy the config drive there (the virsh path reuses both); the container
        is removed after."""
        attempt, self.attempt = self.attempt, self.attempt + 1
        cfg = api.ContainerConfig(metadata=api.ContainerMetadata(name="vm", attempt=attempt),
                                  image=api.ImageSpec(image=self.image), log_path=f"vm/{attempt}.log",
                                  annotations=self.annotations)
        cri_log = MarkerWatch(self.log_dir / "vm" / f"{attempt}.log")
        t0 = time.monotonic()
        cid = self.rt.CreateContainer(api.CreateContainerRequest(
            pod_sandbox_id=self.sandbox_id, config=cfg, sandbox_config=self.sandbox_config),
            timeout=RPC_TIMEOUT).container_id
        try:
            created = time.monotonic() - t0
            self.rt.StartContainer(api.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
            started = time.monotonic() - t0
            raw = MarkerWatch(console_writer.raw_path(self.state_dir / "containers" / cid))
            at_raw, at_cri = wait_all([raw, cri_log], t0, timeout, "virtletd path", lambda: self._gone(cid))
            captured: dict[str, Any] = {}
            if keep is not None:
                st = self.rt.ContainerStatus(api.ContainerStatusRequest(container_id=cid, verbose=True),
                                             timeout=RPC_TIMEOUT)
                info = json.loads(st.info["info"])
                captured = {"domain_xml": info["domain_xml"], "image_path": info["extra"]["image_path"],
                            "config_drive": keep / "config.iso"}
                shutil.copy(info["extra"]["config_drive"], keep / "config.iso")
            time.sleep(SETTLE_S)
            t_stop = time.monotonic()
            self.rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=STOP_GRACE_S),
                                  timeout=RPC_TIMEOUT)
            stop = time.monotonic() - t_stop
            return Split(total=at_cri, create=created, start=started - created, raw=at_raw, stop=stop), captured
        finally:
            self.rt.StopContainer(api.StopContainerRequest(container_id=cid, timeout=0), timeout=RPC_TIMEOUT)
            self.rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)

    def _gone(self, cid: str) -> str | None:
        st = self.rt.ContainerStatus(api.ContainerStatusRequest(container_id=cid), timeout=RPC_TIMEOUT).status
        if st.state == api.CONTAINER_EXITED:
            return (f"container EXITED {st.exit_code} {st.reason}: {st.message} (another virtletd's start-up "
                    "recovery on the same libvirtd removes domains it does not know)")
        return None


class HandPath:
    """What the two reference paths share: virtletd's domain as captured, a fresh overlay of the same stored image
    and a copy of the same config drive per round, and the pod's taps (the sandbox stays up)."""

    label = ""

    def __init__(self, base: Path, captured: dict[str, Any], net: PodNetworkInfo, net_run_dir: Path) -> None:
        self.base = base
        self.template = dx.from_string(captured["domain_xml"])  # drops virtlet's <metadata>: not virtlet's VM
        self.store_path = Path(captured["image_path"])
        self.store_format = str(overlay.image_info(self.store_path)["format"])
        self.config_drive = Path(captured["config_drive"])
        self.net = net
        # only the tap calls are used; they touch no CNI; run_dir is virtletd's (``<run_dir>/net``), where the
        # sandbox's DHCP server runs (attach_after_start checks it is up)
        self.pod_network = PodNetwork(None, net_run_dir,  # type: ignore[arg-type]
                                      extra=ExtraNetworks(None, [], base / "extra"))
        self.prefix = f"vmboot-{base.name[-8:]}"
        self.round = 0

    def _round_dir(self) -> Path:
        self.round += 1
        rdir = self.base / f"{self.label}-{self.round}"
        rdir.mkdir()
        rdir.chmod(0o755)
        return rdir

    def _fresh_disks(self, rdir: Path) -> tuple[Path, Path]:
        """A new overlay of the stored image and a copy of the config drive, in ``rdir``: (root, config drive)."""
        root = rdir / "root.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", self.store_format, "-b",
                        str(self.store_path), str(root)], check=True, timeout=60)
        iso = rdir / "config.iso"
        shutil.copy(self.config_drive, iso)
        return root, iso


class VirshPath(HandPath):
    """The same domain started with ``virsh create`` (transient) on a fresh overlay, per round."""

    label = "virsh"

    def _domain(self, rdir: Path) -> dx.Domain:
        dom = copy.deepcopy(self.template)
        dom.name = f"{self.prefix}-{self.round}"
        dom.uuid = str(uuid.uuid4())
        if dom.sysinfo is not None:
            dom.sysinfo.uuid = dom.uuid  # libvirt refuses an SMBIOS UUID that differs from the domain's
            dom.sysinfo.serial = dom.name
        # VNC as virtletd designs it (a socket in the domain's private dir): the live XML names the first domain's
        # socket, and the copy came up listening on TCP instead
        dom.devices.graphics = [dx.VncGraphics()]
        root, iso = self._fresh_disks(rdir)
        for disk in dom.devices.disks:
            disk.source = str(iso if disk.device == "cdrom" else root)
        for serial in dom.devices.serials:
            serial.path = str(rdir / "console.sock")
            serial.log_file = str(rdir / "console.raw")
        # the exec channel's socket and the exit-code file live in virtletd's dirs for its own (removed) container
        for channel in dom.devices.channels:
            if channel.path:
                channel.path = str(rdir / f"{channel.name}.sock")
        for file_channel in dom.devices.file_channels:
            file_channel.path = str(rdir / f"{file_channel.name}.out")
        return dom

    def boot(self, timeout: float) -> tuple[float, float]:
        """Seconds from tap creation + ``virsh create`` to the marker in the raw console log, and the guest's own
        shutdown: from ``virsh shutdown`` (the ACPI button), ``SETTLE_S`` after the marker, to the domain gone."""
        rdir = self._round_dir()
        dom = self._domain(rdir)
        xml = rdir / "domain.xml"
        xml.write_text(dx.to_string(dom))
        watch = MarkerWatch(rdir / "console.raw")
        try:
            t0 = time.monotonic()
            self.pod_network.host_taps_for_start(self.net)
            _virsh("create", str(xml))
            self.pod_network.attach_after_start(self.net)
            booted = wait_all([watch], t0, timeout, "virsh path", lambda: self._gone(dom.name))[0]
            time.sleep(SETTLE_S)
            return booted, self._shutdown(dom.name)
        finally:
            _virsh("destroy", dom.name, check=False)  # transient: destroy also removes it
            self.pod_network.release_taps(self.net)
            shutil.rmtree(rdir, ignore_errors=True)

    @staticmethod
    def _shutdown(name: str) -> float:
        """ACPI power button through libvirt, then seconds until the (transient) domain is gone, seen by polling
        every ``STOP_POLL_S`` (so this reference errs by at most that much in its own favour)."""
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # "domain not found" is the expected end
        conn = libvirt.open(LIBVIRT_URI)
        try:
            dom = conn.lookupByName(name)
            t0 = time.monotonic()
            dom.shutdown()
            deadline = t0 + STOP_GRACE_S
            while time.monotonic() < deadline:
                try:
                    if not dom.isActive():
                        break
                except libvirt.libvirtError:  # transient: gone once it stopped
                    break
                time.sleep(STOP_POLL_S)
            else:
                raise RuntimeError(f"virsh path: {name} did not shut down within {STOP_GRACE_S} s of the ACPI press")
            return time.monotonic() - t0
        finally:
            conn.close()

    @staticmethod
    def _gone(name: str) -> str | None:
        out = _virsh("domstate", name, check=False)
        if out.returncode != 0:  # a transient domain that stopped is gone; other errors: ask again later
            return f"domain {name} is gone" if "failed to get domain" in out.stderr else None
        state = out.stdout.strip()
        return None if state in ("running", "paused") else f"domain {name} is {state}"

    def leftovers(self) -> None:
        """Destroy any domain of ours still there and delete the taps (an interrupted round)."""
        names = _virsh("list", "--name", check=False).stdout.split()
        for name in names:
            if name.startswith(self.prefix):
                _virsh("destroy", name, check=False)
        self.pod_network.release_taps(self.net)


class QemuPath(HandPath):
    """The same guest on the leanest QEMU command line the bench can write by hand, QEMU run directly."""

    label = "qemu"

    def command(self, rdir: Path, root: Path, iso: Path) -> list[str]:
        """No default devices, no video, USB, balloon, RNG or virtio-serial: the boot disk, the config drive where
        virtletd's domain has it (IDE ``hdc``), the pod's NIC(s) on their taps, the serial console to a file.
        Machine type, accelerator, memory and vCPUs as virtletd's domain."""
        dom = self.template
        accel = "kvm" if dom.type == "kvm" else "tcg"
        cmd = [dom.devices.emulator or "qemu-system-x86_64", "-name", f"{self.prefix}-qemu-{self.round}",
               "-machine", f"{dom.os.machine or 'pc'},accel={accel}", "-nodefaults", "-no-user-config",
               "-display", "none", "-vga", "none", "-m", f"{dom.memory_bytes // (1024 * 1024)}M",
               "-smp", str(dom.vcpus),
               "-drive", f"file={root},format=qcow2,if=virtio",
               "-drive", f"file={iso},format=raw,if=ide,index=2,media=cdrom,readonly=on",
               "-serial", f"file:{rdir / 'console.raw'}",
               "-daemonize", "-pidfile", str(rdir / "qemu.pid")]
        for i, nic in enumerate(dom.devices.interfaces):
            cmd += ["-netdev", f"tap,id=n{i},ifname={nic.target_dev},script=no,downscript=no",
                    "-device", f"virtio-net-pci,netdev=n{i},mac={nic.mac}"]
        return cmd

    def boot(self, timeout: float) -> float:
        """Seconds from tap creation + QEMU's start to the marker in its console file."""
        rdir = self._round_dir()
        root, iso = self._fresh_disks(rdir)
        cmd = self.command(rdir, root, iso)
        watch = MarkerWatch(rdir / "console.raw")
        try:
            t0 = time.monotonic()
            self.pod_network.host_taps_for_start(self.net)
            # -daemonize: QEMU returns once initialised, its taps open; the guest already runs
            subprocess.run(cmd, check=True, capture_output=True, timeout=RPC_TIMEOUT)
            self.pod_network.attach_after_start(self.net)
            return wait_all([watch], t0, timeout, "QEMU path", lambda: self._gone(rdir))[0]
        finally:
            self._kill(rdir)
            self.pod_network.release_taps(self.net)
            shutil.rmtree(rdir, ignore_errors=True)

    @staticmethod
    def _pid(rdir: Path) -> int | None:
        try:
            return int((rdir / "qemu.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _gone(self, rdir: Path) -> str | None:
        pid = self._pid(rdir)  # a zombie waiting for whoever adopted the daemonized QEMU counts as gone
        return None if pid is not None and procs.running(pid) else "QEMU exited"

    def _kill(self, rdir: Path) -> None:
        """SIGTERM to QEMU (daemonized: not our child), SIGKILL if it is still there after 10 s."""
        pid = self._pid(rdir)
        if pid is None or not procs.running(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while procs.running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if procs.running(pid):
                os.kill(pid, signal.SIGKILL)

    def leftovers(self) -> None:
        """Kill a QEMU of an interrupted round and delete the taps."""
        for rdir in self.base.glob(f"{self.label}-*"):
            self._kill(rdir)
        self.pod_network.release_taps(self.net)


# -- main -----------------------------------------------------------------------------------------------------

def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Cleanup(contextlib.ExitStack):
    """An ExitStack whose undo steps run to the end even when Ctrl-C is pressed again meanwhile."""

    def __exit__(self, *exc: Any) -> bool:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return bool(super().__exit__(*exc))
        finally:
            signal.signal(signal.SIGINT, previous)


@dataclass(frozen=True)
class Row:
    round: int
    first: str  # the path that went first in this round
    virtletd: Split
    virsh: float  # boot
    shutdown: float  # the guest's own, on the virsh path
    qemu: float  # boot on the hand-written command line


def print_table(rows: list[Row]) -> None:
    print(f"VM boot to {MARKER.decode()} (tiny image, QEMU TCG), {len(rows)} rounds; seconds")
    print(f"{'round':<7}{'first':<10}{'virtletd':>10}{'virsh':>8}{'ratio':>8}{'qemu':>8}{'ratio':>8}   "
          f"{'create':>8}{'start':>8}{'raw log':>9}{'CRI lag':>9}{'stop':>8}{'shutdown':>10}")

    def line(label: str, first: str, v: Split, virsh: float, shutdown: float, qemu: float) -> None:
        print(f"{label:<7}{first:<10}{v.total:>10.2f}{virsh:>8.2f}{v.total / virsh:>8.3f}{qemu:>8.2f}"
              f"{v.total / qemu:>8.3f}   {v.create:>8.2f}{v.start:>8.2f}{v.raw:>9.2f}{v.total - v.raw:>9.2f}"
              f"{v.stop:>8.2f}{shutdown:>10.2f}")

    for row in rows:
        line(str(row.round), row.first, row.virtletd, row.virsh, row.shutdown, row.qemu)
    med = Split(*(statistics.median(getattr(row.virtletd, f) for row in rows)
                  for f in ("total", "create", "start", "raw", "stop")))
    med_virsh = statistics.median(row.virsh for row in rows)
    med_shutdown = statistics.median(row.shutdown for row in rows)
    med_qemu = statistics.median(row.qemu for row in rows)
    line("median", "", med, med_virsh, med_shutdown, med_qemu)
    print("virtletd: CreateContainer sent -> marker in the CRI log; virsh: tap + `virsh create` -> marker in "
          "the raw console log; qemu: tap + the hand-written QEMU command line -> marker in its console file")
    print("create/start: the two RPCs; raw log: CreateContainer -> marker in virtletd's raw console log; "
          "CRI lag: raw log -> CRI log")
    print(f"stop: StopContainer (grace {STOP_GRACE_S:.0f} s) {SETTLE_S:.0f} s after the marker; shutdown: the same "
          "guest's own, ACPI button by libvirt to the domain gone (the hand-made domain)")
    paired = statistics.median(row.virtletd.total / row.virsh for row in rows)
    print(f"ratio virtletd/virsh of the medians: {med.total / med_virsh:.3f} (goal <= 1.10); median of the "
          f"per-round ratios: {paired:.3f} (each round's boots ran back to back: less hit by load drift)")
    paired_qemu = statistics.median(row.virtletd.total / row.qemu for row in rows)
    print(f"ratio virtletd/hand-written QEMU of the medians: {med.total / med_qemu:.3f} (goal <= 1.10); median of "
          f"the per-round ratios: {paired_qemu:.3f}")
    extra = statistics.median(row.virtletd.stop - row.shutdown for row in rows)
    print(f"StopContainer beyond the guest's own shutdown, median of the rounds: {extra:.3f} s (goal <= 0.2)")
    report.emit([report.Row("vm_boot", "boot to ready virtletd/virsh (per-round ratio median)", paired, "ratio",
                            1.10, note=f"virtletd {med.total:.2f} s, hand-made domain via virsh {med_virsh:.2f} s"),
                 report.Row("vm_boot", "boot to ready virtletd/hand-written QEMU (per-round ratio median)",
                            paired_qemu, "ratio", 1.10,
                            note=f"virtletd {med.total:.2f} s, QEMU run directly with the leanest command line "
                                 f"{med_qemu:.2f} s"),
                 report.Row("vm_boot", "console line in the CRI log (kubectl logs) after the raw console, median",
                            statistics.median(row.virtletd.total - row.virtletd.raw for row in rows), "s",
                            note=f"the log writer's wake-up and write; both files polled every {POLL_S} s"),
                 report.Row("vm_boot", "StopContainer beyond the guest's own ACPI shutdown", extra, "s", 0.2,
                            note=f"StopContainer {med.stop:.2f} s, the guest's own shutdown (libvirt's ACPI "
                                 f"button, hand-made domain) {med_shutdown:.2f} s")])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", type=Path, help="tiny guest image (default: guest-images/build.sh tiny)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one boot may take")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    image = tiny_image(args.image)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    rows: list[Row] = []
    try:
        run(args, image, rows)
    finally:
        if rows:
            print_table(rows)
    return 0


def run(args: argparse.Namespace, image: Path, rows: list[Row]) -> None:
    """All rounds; appends one row per finished round, removes everything it made before returning."""
    with Cleanup() as stack:
        base, daemon, name = tiny_world("virtlet-vmboot-", image, stack)
        try:
            pod = VirtletdPath(daemon, base, name)
            template_dir = base / "template"
            template_dir.mkdir()
            template_dir.chmod(0o755)
            virsh: VirshPath | None = None
            qemu: QemuPath | None = None
            paths = ("virtletd", "virsh", "qemu")
            for r in range(args.rounds):
                order = paths[r % 3:] + paths[:r % 3]  # round 0 starts with virtletd, which captures the domain
                split: Split | None = None
                virsh_s = virsh_stop = qemu_s = 0.0
                for path in order:
                    if path == "virtletd":
                        split, captured = pod.boot(args.timeout, template_dir if virsh is None else None)
                        if virsh is None:
                            net = pod.network()
                            virsh = VirshPath(base, captured, net, daemon.run_dir / "net")
                            qemu = QemuPath(base, captured, net, daemon.run_dir / "net")
                            stack.callback(virsh.leftovers)  # these run before the sandbox goes
                            stack.callback(qemu.leftovers)
                        log(f"round {r + 1}: virtletd {split.total:.2f} s (create {split.create:.2f}, start "
                            f"{split.start:.2f}, raw log {split.raw:.2f})")
                    elif path == "virsh":
                        assert virsh is not None
                        virsh_s, virsh_stop = virsh.boot(args.timeout)
                        log(f"round {r + 1}: virsh {virsh_s:.2f} s, its shutdown {virsh_stop:.2f} s")
                    else:
                        assert qemu is not None
                        qemu_s = qemu.boot(args.timeout)
                        log(f"round {r + 1}: hand-written QEMU {qemu_s:.2f} s")
                assert split is not None
                rows.append(Row(r + 1, order[0], split, virsh_s, virsh_stop, qemu_s))
        except Exception:
            log(f"--- end of virtletd's log ---\n{daemon.log()}")  # its files go with the temp dir
            raise


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; everything the bench made was removed")
        sys.exit(130)
