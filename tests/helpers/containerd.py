"""A REAL containerd (Debian 1.6) as a plain background process, isolated under one temp dir, for CRI tests.

Why: the CRI proxy's primary backend is containerd; tests must run ordinary pods on the real thing.  Each
instance gets its own root, state, socket, CNI config dir (a test-only bridge and subnet) and streaming port,
so parallel test runs never share anything.  ``stop()`` removes every pod sandbox through CRI (which tears
down netns and mounts), stops containerd, kills shims that still point at its socket, unmounts leftovers and
deletes the bridge and the temp dir.  With ``mount_ns_pid`` it runs inside that process's mount namespace
(``nsenter --mount``), as the fresh-host test does; leftover mounts are then looked up and removed there.

Machine facts this relies on (``/work/shared/notes/environment.md``): the CRI plugin needs
``restrict_oom_score_adj = true`` (no CAP_SYS_RESOURCE), no image can be pulled (``sandbox_image`` must be
imported first, see ``tests/helpers/oci_image.py``), the bridge plugin refuses promiscMode with hairpinMode.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

from tests.helpers import oci_image
from virtlet.cri import versions
from virtlet.cri.gen import api_pb2 as api

CNI_BIN = "/usr/lib/cni"
PAUSE_IMAGE = "localhost/virtlet-test/pause:1"
BUSYBOX_IMAGE = "localhost/virtlet-test/busybox:1"


class ContainerdProcess:
    """One containerd under ``base`` (created when omitted).  Use as a context manager or start()/stop()."""

    def __init__(self, base: Path | None = None, snapshotter: str = "overlayfs",
                 mount_ns_pid: int | None = None) -> None:
        self.base = base or Path(tempfile.mkdtemp(prefix="vtcd-", dir="/var/tmp"))
        self.tag = uuid.uuid4().hex[:8]
        self.socket = self.base / "containerd.sock"
        self.config_path = self.base / "config.toml"
        self.cni_dir = self.base / "cni"
        self.log_path = self.base / "containerd.log"
        self.bridge = f"vtcd{self.tag}"[:15]
        self.network = f"vtcd-{self.tag}"
        self.subnet = f"10.{200 + int(self.tag[:2], 16) % 50}.{int(self.tag[2:4], 16)}.0/24"
        self.snapshotter = snapshotter
        self.mount_ns_pid = mount_ns_pid
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _write_config(self) -> None:
        self.cni_dir.mkdir(parents=True, exist_ok=True)
        (self.cni_dir / "10-test.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": self.network, "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "dataDir": str(self.base / "ipam"),
                          "ranges": [[{"subnet": self.subnet}]]}},
                {"type": "loopback"}]}))
        b = self.base
        self.config_path.write_text(f"""version = 2
root = "{b}/root"
state = "{b}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{b}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{self.cni_dir}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{self.snapshotter}"
""")

    def start(self, timeout: float = 30.0) -> ContainerdProcess:
        """Start containerd, wait until its CRI answers, import the pause and busybox images."""
        self._write_config()
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self._nsenter(), "containerd", "--config", str(self.config_path)],
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists() and self._answers():
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not answer CRI within {timeout}s:\n{self.log()}")
            time.sleep(0.2)
        images = self.base / "images"
        for name in (PAUSE_IMAGE, BUSYBOX_IMAGE):
            image = oci_image.build(name, images / f"{name.rpartition('/')[2].replace(':', '-')}.tar")
            oci_image.import_image(image, str(self.socket), snapshotter=self.snapshotter)
        return self

    def _nsenter(self) -> list[str]:
        """The command prefix that runs a program in this containerd's mount namespace."""
        if self.mount_ns_pid is None:
            return []
        return ["nsenter", f"--mount=/proc/{self.mount_ns_pid}/ns/mnt", "--"]

    def _answers(self) -> bool:
        try:
            self.runtime().Version(api.VersionRequest(), timeout=2)
            return True
        except grpc.RpcError:
            return False

    def stop(self) -> None:
        """Remove all pod sandboxes, stop containerd and its shims, clean up bridge, mounts and files."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.remove_all_sandboxes()
        finally:
            if self.channel is not None:
                self.channel.close()
                self.channel = None
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            for pid in self.shim_pids():
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._unmount_leftovers()
            subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> ContainerdProcess:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- CRI -------------------------------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    def connect(self) -> grpc.Channel:
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.address)
        return self.channel

    def runtime(self, version: str = "v1") -> Any:
        return versions.runtime_stub(self.connect(), version)

    def image(self, version: str = "v1") -> Any:
        return versions.image_stub(self.connect(), version)

    def remove_all_sandboxes(self) -> None:
        rt = self.runtime()
        for sb in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=20).items:
            rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
            rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)

    def netns_path(self, sandbox_id: str) -> str:
        """The network namespace path containerd made for a sandbox (from the verbose status)."""
        info = json.loads(self.runtime().PodSandboxStatus(
            api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True), timeout=10).info["info"])
        for ns in info["runtimeSpec"]["linux"]["namespaces"]:
            if ns.get("type") == "network":
                return str(ns.get("path", ""))
        return ""

    # -- leftovers ----------------------------------------------------------------------------------------

    def shim_pids(self) -> list[int]:
        """containerd-shim processes started by THIS containerd (their command line names its socket)."""
        pids = []
        marker = str(self.socket).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and marker in cmdline.split(b"\0"):
                pids.append(int(entry.name))
        return pids

    def _unmount_leftovers(self) -> None:
        prefix = str(self.base) + "/"
        table = Path(f"/proc/{self.mount_ns_pid or 'self'}/mounts")
        try:
            mounts = [line.split()[1] for line in table.read_text().splitlines()]
        except OSError:
            return
        for mount in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
            subprocess.run([*self._nsenter(), "umount", "-l", mount], capture_output=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""
