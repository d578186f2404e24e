"""A fresh host: containerd's pod namespaces survive a VM pod's namespace, and containerd can still remove them.

After a boot ``/run/netns`` is a plain directory.  ``ip netns add`` then bind-mounts ``/run/netns`` onto itself,
which hides the namespaces containerd had already mounted there, and containerd's StopPodSandbox fails for good
(``unlinkat /run/netns/cni-…: device or resource busy``).  A machine where any earlier run made ``/run/netns`` a
mount point never shows it, so each test here makes the fresh case itself: a private mount namespace
(``unshare -m --propagation private``) in which ``/run/netns`` is unmounted until it is a plain directory, with a
REAL containerd and a REAL virtletd both started inside it (``nsenter --mount``).  Nothing there reaches the
host's mount table; on the way out every process of that mount namespace is killed and the files its
namespaces left in the (shared, on-disk) ``/run/netns`` directory are removed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.containerd import ContainerdProcess
from tests.helpers.daemon import VirtletdProcess
from virtlet.cri.gen import api_pb2 as api
from virtlet.network import netns

pytestmark = pytest.mark.network

NETNS_DIR = "/run/netns"

_PREPARE = """
set -e
while mountpoint -q /run/netns; do umount -l /run/netns; done
mkdir -p /run/netns
echo ready
exec "$1" -c "import time; time.sleep(1e6)" virtlet-test-mntns
"""  # the holder's command line names it for tools/leftovers.py


class FreshMountNamespace:
    """A process holding a private mount namespace whose ``/run/netns`` is a plain directory."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", _PREPARE,
                                      "sh", sys.executable],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise RuntimeError(f"cannot make a private mount namespace: {err.decode(errors='replace')}")
        self.pid = self.proc.pid
        self.ns_id = os.stat(f"/proc/{self.pid}/ns/mnt").st_ino
        self.seen: set[str] = set()

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", "--", *cmd], capture_output=True,
                              text=True, timeout=60, check=check)

    def mount_points(self) -> list[str]:
        """Mount points inside the namespace (from its mountinfo, as the kernel reports them)."""
        lines = Path(f"/proc/{self.pid}/mountinfo").read_text().splitlines()
        return [line.split()[4] for line in lines]

    def netns_mounts(self) -> list[str]:
        """Files of ``/run/netns`` that carry a mount in this namespace (remembered for clean-up)."""
        found = [m for m in self.mount_points() if m.startswith(NETNS_DIR + "/")]
        self.seen.update(found)
        return found

    def members(self) -> list[int]:
        """Every process (other than the holder) whose mount namespace is this one."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.pid:
                continue
            try:
                if os.stat(entry / "ns" / "mnt").st_ino == self.ns_id:
                    pids.append(int(entry.name))
            except OSError:
                continue
        return pids

    def close(self) -> list[int]:
        """Kill every process left inside, then the holder; remove the namespace files it left.  Returns the
        pids that were still inside (a test's own daemons should have stopped before)."""
        self.netns_mounts()
        strays = self.members()
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()
        self.proc.communicate(timeout=30)
        deadline = time.monotonic() + 30
        while self.members() and time.monotonic() < deadline:
            time.sleep(0.1)
        # the mounts died with the namespace; the files stay in the on-disk directory that the host shares
        for path in self.seen:
            try:
                if os.path.isfile(path) and os.path.getsize(path) == 0:
                    os.unlink(path)
            except OSError:
                pass
        return strays


class NsVirtletdProcess(VirtletdProcess):
    """virtletd started inside a mount namespace (nsenter execs it: same pid, signals reach it)."""

    def __init__(self, base: Path, mount_ns_pid: int, args: list[str]) -> None:
        super().__init__(base, args)
        self.mount_ns_pid = mount_ns_pid

    @property
    def cmd(self) -> list[str]:
        return ["nsenter", f"--mount=/proc/{self.mount_ns_pid}/ns/mnt", "--", *super().cmd]


@pytest.fixture
def fresh_ns() -> Iterator[FreshMountNamespace]:
    ns = FreshMountNamespace()
    try:
        yield ns
    finally:
        strays = ns.close()
    assert not strays, f"processes left in the test's mount namespace: {strays}"


@pytest.fixture
def ns_containerd(fresh_ns: FreshMountNamespace) -> Iterator[ContainerdProcess]:
    cd = ContainerdProcess(mount_ns_pid=fresh_ns.pid)
    try:
        cd.start(timeout=60)
        yield cd
    finally:
        fresh_ns.netns_mounts()
        cd.stop()
    assert not cd.shim_pids(), "containerd shims left running"
    assert not cd.base.exists()


@pytest.fixture
def ns_virtletd(world_dir: Path, bridge_cni: Path, netns_guard: Any,
                fresh_ns: FreshMountNamespace) -> Iterator[NsVirtletdProcess]:
    daemon = NsVirtletdProcess(world_dir, fresh_ns.pid, [
        "--libvirt-uri", "test:///default", "--kvm", "off", "--cni-conf-dir", str(bridge_cni),
        "--image-dir", str(world_dir / "images"), "--image-translations-dir", str(world_dir / "translations")])
    netns_guard.logs.append(daemon.log_path)
    daemon.start()
    try:
        yield daemon
    finally:
        fresh_ns.netns_mounts()
        try:
            rt = daemon.runtime()
            for sb in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=10).items:
                rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
                rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=60)
        except grpc.RpcError as exc:  # pragma: no cover - clean-up must not hide the test's own failure
            print(f"clean-up of virtletd sandboxes failed: {exc}\n{daemon.log()}", file=sys.stderr)
        daemon.stop()


def _pod(world_dir: Path, name: str) -> api.PodSandboxConfig:
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}-{uuid.uuid4().hex[:6]}"),
        hostname=name, log_directory=str(world_dir / "logs" / name), labels={"test": "fresh-netns"},
        linux=api.LinuxPodSandboxConfig())


def _containerd_pod(ns: FreshMountNamespace, cd: ContainerdProcess, world_dir: Path) -> tuple[str, str]:
    """An ordinary pod on containerd; returns its id and its namespace file (a mount in ``ns``)."""
    rt = cd.runtime()
    sid = rt.RunPodSandbox(api.RunPodSandboxRequest(config=_pod(world_dir, "plain")), timeout=120).pod_sandbox_id
    path = os.path.realpath(cd.netns_path(sid))  # /var/run -> /run, as mountinfo names it
    assert path.startswith(NETNS_DIR + "/cni-"), path
    assert path in ns.netns_mounts()
    return sid, path


def _netns_dir_is_plain(ns: FreshMountNamespace) -> bool:
    return NETNS_DIR not in ns.mount_points()


def test_containerd_removes_its_pod_after_a_vm_pod_on_a_fresh_host(
        world_dir: Path, fresh_ns: FreshMountNamespace, ns_containerd: ContainerdProcess,
        ns_virtletd: NsVirtletdProcess) -> None:
    assert _netns_dir_is_plain(fresh_ns)
    plain, plain_ns = _containerd_pod(fresh_ns, ns_containerd, world_dir)

    # a VM pod through virtletd's CRI: its namespace is a file with a mount, the directory stays plain
    vrt = ns_virtletd.runtime()
    vm = vrt.RunPodSandbox(api.RunPodSandboxRequest(config=_pod(world_dir, "vm"), runtime_handler="virtlet"),
                           timeout=60).pod_sandbox_id
    vm_ns = os.path.realpath(netns.path(vm))
    assert vm_ns in fresh_ns.netns_mounts()
    assert _netns_dir_is_plain(fresh_ns), "virtletd mounted something on /run/netns itself"
    assert os.stat(NETNS_DIR).st_mode & 0o777 == 0o755
    lo = fresh_ns.run("ip", "-n", vm, "-o", "link", "show", "lo").stdout
    assert "UP" in lo.split("<", 1)[1].split(">", 1)[0], lo

    # containerd tears its pod down without error, and its namespace file is gone
    crt = ns_containerd.runtime()
    crt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=plain), timeout=120)
    crt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=plain), timeout=120)
    assert plain_ns not in fresh_ns.netns_mounts() and not os.path.exists(plain_ns)

    # and the VM pod goes the same way
    vrt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=vm), timeout=60)
    vrt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=vm), timeout=60)
    assert vm_ns not in fresh_ns.netns_mounts() and not os.path.exists(vm_ns)
    assert _netns_dir_is_plain(fresh_ns)


def test_control_ip_netns_add_breaks_containerd_on_a_fresh_host(
        world_dir: Path, fresh_ns: FreshMountNamespace, ns_containerd: ContainerdProcess) -> None:
    """The old way (``ip netns add``) in the same setting: containerd can no longer remove its namespace.
    This proves the setting reproduces a fresh host; then the remount is undone and containerd succeeds."""
    assert _netns_dir_is_plain(fresh_ns)
    plain, plain_ns = _containerd_pod(fresh_ns, ns_containerd, world_dir)
    name = f"vtfresh-{uuid.uuid4().hex[:8]}"
    fresh_ns.run("ip", "netns", "add", name)
    fresh_ns.seen.add(f"{NETNS_DIR}/{name}")
    try:
        assert not _netns_dir_is_plain(fresh_ns), "ip netns add no longer remounts /run/netns"
        crt = ns_containerd.runtime()
        with pytest.raises(grpc.RpcError) as exc:
            crt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=plain), timeout=120)
        assert "device or resource busy" in exc.value.details(), exc.value.details()
    finally:
        fresh_ns.run("ip", "netns", "delete", name, check=False)
        fresh_ns.run("sh", "-c", "while mountpoint -q /run/netns; do umount -l /run/netns; done")
    # with /run/netns plain again, containerd's retry succeeds
    crt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=plain), timeout=120)
    crt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=plain), timeout=120)
    assert not os.path.exists(plain_ns)


def _netns_dir_mount_entries() -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4] == NETNS_DIR]


def test_netns_helpers_are_idempotent_and_never_mount_the_directory() -> None:
    """create/delete on the host itself: what is mounted on /run/netns is the same before and after, a file
    left by a crash between open and mount is reused, and delete of a missing or unmounted one succeeds."""
    from virtlet import errors

    dir_mounts = _netns_dir_mount_entries()
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        p = netns.create(a)
        assert netns.exists(a) and netns.create(a) == p
        lo = subprocess.run(["ip", "-n", a, "-o", "link", "show", "lo"], capture_output=True, text=True,
                            check=True).stdout
        assert "UP" in lo.split("<", 1)[1].split(">", 1)[0], lo
        # a crash after the file was made and before the mount: not a namespace, and create() finishes it
        netns.NETNS_DIR.joinpath(b).touch()
        assert not netns.exists(b)
        netns.create(b)
        assert netns.exists(b)
        assert _netns_dir_mount_entries() == dir_mounts
        netns.delete(a)
        netns.delete(a)
        assert not netns.exists(a) and not os.path.exists(p)
        # an unmounted leftover file is removed too
        netns.NETNS_DIR.joinpath(a).touch()
        netns.delete(a)
        assert not os.path.exists(p)
        for bad in ("", "..", "a/b", "x\0y"):
            with pytest.raises(errors.InvalidArgument):
                netns.create(bad)
    finally:
        netns.delete(a)
        netns.delete(b)
    assert not os.path.exists(netns.path(b))
    assert _netns_dir_mount_entries() == dir_mounts


def test_vm_pod_removed_after_ip_netns_add_hid_its_namespace(
        world_dir: Path, fresh_ns: FreshMountNamespace, ns_virtletd: NsVirtletdProcess) -> None:
    """An admin's ``ip netns add`` while VM pods run hides their namespace mounts under a new /run/netns mount, where
    the kernel refuses to unlink them (EBUSY): StopPodSandbox/RemovePodSandbox still succeed (the namespace is
    released when that mount goes), instead of failing INTERNAL forever and leaving the pod undeletable."""
    vrt = ns_virtletd.runtime()
    vm = vrt.RunPodSandbox(api.RunPodSandboxRequest(config=_pod(world_dir, "vm-hidden"), runtime_handler="virtlet"),
                           timeout=60).pod_sandbox_id
    fresh_ns.seen.add(os.path.realpath(netns.path(vm)))
    name = f"vtfresh-{uuid.uuid4().hex[:8]}"
    fresh_ns.run("ip", "netns", "add", name)
    fresh_ns.seen.add(f"{NETNS_DIR}/{name}")
    try:
        assert not _netns_dir_is_plain(fresh_ns)
        vrt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=vm), timeout=60)
        vrt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=vm), timeout=60)
        assert not vrt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=10).items
        assert "hidden under a later mount" in ns_virtletd.log()
        # released when that mount goes: then the namespace file is reachable again and removable
        fresh_ns.run("sh", "-c", f"umount -l {NETNS_DIR} && umount -l {NETNS_DIR}/{vm} && rm {NETNS_DIR}/{vm}")
        assert not os.path.exists(netns.path(vm))
    finally:
        fresh_ns.run("ip", "netns", "delete", name, check=False)
