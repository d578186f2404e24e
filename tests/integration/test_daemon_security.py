"""virtletd as a real process: a SIGTERM during a call, file and directory modes, socket modes, VNC access.

Issue 13: a SIGTERM closed the state database under a call in flight; virtlet.db was 0644 in 0755 directories;
sockets were created under a process-wide umask; VNC listened on loopback with no password."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import NetnsGuard, running_virtletd
from virtlet.cri.gen import api_pb2 as api
from virtlet.network import netns

pytestmark = pytest.mark.network

SLOW_DEL = 6  # seconds the slow CNI plugin spends in DEL: longer than SIGTERM's delivery, shorter than the grace


def _config(name: str = "pod1", uid: str = "uid-1") -> api.PodSandboxConfig:
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=uid, attempt=0), hostname=name,
        annotations={"kubernetes.io/target-runtime": "virtlet.cloud"})


@pytest.fixture
def slow_cni(world_dir: Path, bridge_cni: Path) -> tuple[Path, Path, Path]:
    """The bridge network of ``bridge_cni`` behind a wrapper plugin whose DEL takes SLOW_DEL seconds (a real
    slow step of StopPodSandbox), announcing itself in a marker file.  Returns (conf dir, bin dir, marker)."""
    bin_dir = world_dir / "cni-bin"
    bin_dir.mkdir()
    marker = world_dir / "slow-del-started"
    plugin = bin_dir / "slowbridge"
    plugin.write_text(
        "#!/bin/sh\n"
        f'if [ "$CNI_COMMAND" = DEL ]; then touch {marker}; sleep {SLOW_DEL}; fi\n'
        "exec /usr/lib/cni/bridge\n")
    plugin.chmod(0o755)
    conf = bridge_cni / "10-bridge.conflist"
    raw = json.loads(conf.read_text())
    raw["plugins"][0]["type"] = "slowbridge"
    conf.write_text(json.dumps(raw))
    return bridge_cni, bin_dir, marker


def _wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _stop_in_thread(daemon: VirtletdProcess, sid: str, timeout: float) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def call() -> None:
        try:
            daemon.runtime().StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=timeout)
            result["ok"] = True
        except grpc.RpcError as exc:
            result["error"] = exc.code()

    caller = threading.Thread(target=call)
    caller.start()
    return caller, result


def _new_calls_refused(daemon: VirtletdProcess) -> None:
    from virtlet.cri import versions

    late = grpc.insecure_channel(f"unix://{daemon.socket}")
    try:
        with pytest.raises(grpc.RpcError) as refused:
            versions.runtime_stub(late, "v1").ListPodSandbox(api.ListPodSandboxRequest(), timeout=5)
        assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        late.close()


@pytest.mark.parametrize("client_timeout", [120, 2], ids=["client-waits", "client-gave-up"])
def test_sigterm_lets_a_call_in_flight_finish(world_dir: Path, netns_guard: NetnsGuard,
                                              slow_cni: tuple[Path, Path, Path], client_timeout: float) -> None:
    """SIGTERM while StopPodSandbox is in its (slow) CNI DEL: the call completes (the client that still waits gets
    OK; for a client that gave up - the kubelet's own deadline - gRPC considers the call over, but its handler
    still works and must not lose the state database under it), new calls are refused meanwhile, the daemon
    exits 0 after the call, and nothing is left half done: netns gone, a restarted daemon finds the sandbox
    NOTREADY."""
    conf, bin_dir, marker = slow_cni
    flags = ["--libvirt-uri", "test:///default", "--kvm", "off", "--cni-bin-dir", f"{bin_dir}:/usr/lib/cni"]
    with running_virtletd(world_dir, netns_guard, conf, flags) as daemon:
        sid = daemon.runtime().RunPodSandbox(api.RunPodSandboxRequest(config=_config())).pod_sandbox_id
        assert netns.exists(sid)
        caller, result = _stop_in_thread(daemon, sid, client_timeout)
        _wait_for(marker.exists, 60, "StopPodSandbox to reach CNI DEL")
        if client_timeout < SLOW_DEL:
            caller.join(60)
            assert result == {"error": grpc.StatusCode.DEADLINE_EXCEEDED}
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # the daemon has begun stopping (no new calls) while DEL still sleeps
        _new_calls_refused(daemon)
        caller.join(120)
        if client_timeout > SLOW_DEL:
            assert result == {"ok": True}, f"StopPodSandbox in flight at SIGTERM: {result}\n{daemon.log()}"
        assert daemon.proc.wait(60) == 0, daemon.log()
        log = daemon.log()
        assert "closed database" not in log, log
        assert not netns.exists(sid), f"StopPodSandbox left its network namespace\n{log}"
        daemon.start()  # the state must say what was done (and the fixture's cleanup talks to it)
        status = daemon.runtime().PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
        assert status.state == api.SANDBOX_NOTREADY


def test_sigterm_after_the_grace_exits_and_the_next_start_recovers(
        world_dir: Path, netns_guard: NetnsGuard, slow_cni: tuple[Path, Path, Path]) -> None:
    """A call longer than ``shutdown_grace``: virtletd exits 1 soon after the grace without closing state under
    the call; after a restart the kubelet's retry of StopPodSandbox succeeds and leaves nothing behind."""
    conf, bin_dir, marker = slow_cni
    flags = ["--libvirt-uri", "test:///default", "--kvm", "off", "--cni-bin-dir", f"{bin_dir}:/usr/lib/cni",
             "--shutdown-grace", "1"]
    with running_virtletd(world_dir, netns_guard, conf, flags) as daemon:
        sid = daemon.runtime().RunPodSandbox(api.RunPodSandboxRequest(config=_config())).pod_sandbox_id
        caller, result = _stop_in_thread(daemon, sid, 120)
        _wait_for(marker.exists, 60, "StopPodSandbox to reach CNI DEL")
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(SLOW_DEL + 30) == 1, daemon.log()
        caller.join(60)
        assert "error" in result
        assert "still running after 1s" in daemon.log()
        time.sleep(SLOW_DEL)  # the orphaned CNI plugin finishes its DEL
        daemon.start()
        rt = daemon.runtime()
        rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
        assert not netns.exists(sid)
        assert rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid)).status.state == \
            api.SANDBOX_NOTREADY


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_state_files_are_private_even_when_an_older_version_left_them_open(
        world_dir: Path, netns_guard: NetnsGuard, bridge_cni: Path) -> None:
    """An older virtletd left the state, run and image directories 0755 and virtlet.db 0644 (annotations and env
    inside).  A start - under the loosest umask - tightens them: directories 0700 (the test driver runs no QEMU
    user), database and its -wal/-shm 0600, CRI socket 0660; a sandbox's files stay behind those gates."""
    import sqlite3

    state, run, images = world_dir / "state", world_dir / "run", world_dir / "images"
    for d in (state, run, images):
        d.mkdir(mode=0o755)
        d.chmod(0o755)
    db = state / "virtlet.db"
    sqlite3.connect(db).close()
    db.chmod(0o644)
    old = os.umask(0)
    try:
        with running_virtletd(world_dir, netns_guard, bridge_cni,
                              ["--libvirt-uri", "test:///default", "--kvm", "off"]) as daemon:
            sid = daemon.runtime().RunPodSandbox(api.RunPodSandboxRequest(config=_config())).pod_sandbox_id
            modes = {p.name: _mode(p) for p in (state, run, images)}
            assert modes == {"state": 0o700, "run": 0o700, "images": 0o700}
            files = {p.name: _mode(p) for p in state.iterdir() if p.name.startswith("virtlet.db")}
            assert set(files) >= {"virtlet.db", "virtlet.db-wal", "virtlet.db-shm"}
            assert set(files.values()) == {0o600}, files
            assert _mode(daemon.socket) == 0o660
            assert not [p for p in world_dir.iterdir() if p.name.startswith(".sock-")]  # no private dir left
            daemon.runtime().StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid))
            daemon.runtime().RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid))
    finally:
        os.umask(old)


def test_a_shared_sticky_directory_is_refused(world_dir: Path) -> None:
    """``--state-dir /tmp`` must not lock everybody out of /tmp: virtletd stops with a message instead."""
    import subprocess

    shared = world_dir / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    d = VirtletdProcess(world_dir, ["--libvirt-uri", "test:///default", "--kvm", "off"])
    cmd = [*d.cmd, "--run-dir", str(shared)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "shared sticky directory" in proc.stderr, proc.stderr
    assert _mode(shared) == 0o1777


def _listening_tcp_inodes_of(pid: int) -> list[str]:
    """Sockets of ``pid`` listening on TCP (IPv4 and IPv6), as /proc/net/tcp* lines."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                out.append(line)
    return out


@pytest.mark.libvirt
def test_vnc_only_through_virtletctl_and_private_dirs_with_real_qemu(
        vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any, tiny_image: Path) -> None:
    """A real tiny VM: QEMU serves VNC on libvirt's unix socket in the domain's private directory (no TCP port
    at all); `virtletctl vnc` relays it to a loopback port that answers RFB for root and closes on another
    user.  The directories QEMU reaches are 0710 with QEMU's group when QEMU is not root (0700 when it is),
    and the VM runs from them."""
    import shutil
    import socket
    import subprocess
    import sys
    import xml.etree.ElementTree as ET

    from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull

    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    name = image_server.name("files/tiny.qcow2")
    _pull(vm_virtletd, name)
    pod = Pod(vm_virtletd, world_dir, "vm-vnc", image=name)
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        pod.wait_log(MARKER)
        caps = subprocess.run(["virsh", "-c", "qemu:///system", "capabilities"], capture_output=True, text=True,
                              check=True).stdout
        from virtlet.daemon import qemu_ids_from_capabilities

        qemu = qemu_ids_from_capabilities(caps, "qemu")
        for d in (vm_virtletd.state_dir, vm_virtletd.run_dir, world_dir / "images"):
            st_ = d.stat()
            if qemu is None or qemu[0] == 0:
                assert stat.S_IMODE(st_.st_mode) == 0o700, d
            else:
                assert (stat.S_IMODE(st_.st_mode), st_.st_gid) == (0o710, qemu[1]), d
        dom = f"virtlet-{pod.container_id}"
        live = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", dom], capture_output=True, text=True,
                              check=True).stdout
        listen = ET.fromstring(live).find("devices/graphics[@type='vnc']/listen")
        assert listen is not None and listen.get("type") == "socket", live
        vnc_sock = Path(listen.get("socket", ""))
        parent = vnc_sock.parent.stat()
        assert parent.st_mode & 0o007 == 0, f"{vnc_sock.parent} is open to other users"
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(vnc_sock))
            assert s.recv(12).startswith(b"RFB 003.00")
        pid = int(Path(f"/run/libvirt/qemu/{dom}.pid").read_text())
        assert _listening_tcp_inodes_of(pid) == [], "QEMU listens on a TCP port"

        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        local = probe.getsockname()[1]
        probe.close()
        ctl = subprocess.Popen([sys.executable, "-m", "virtlet.ctl.main", "--endpoint",
                                f"unix://{vm_virtletd.socket}", "vnc", "vm-vnc", str(local)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            greeting = b""
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", local), timeout=5) as s:
                        greeting = s.recv(12)
                    break
                except OSError:
                    time.sleep(0.5)
            assert greeting.startswith(b"RFB 003.00"), greeting
            other = subprocess.run(
                ["/usr/bin/python3", "-c", "import socket,sys; s=socket.create_connection(('127.0.0.1', "
                 "int(sys.argv[1])), timeout=10); s.settimeout(10); print(repr(s.recv(12)))", str(local)],
                user="nobody", capture_output=True, text=True, timeout=60)
            assert other.returncode == 0 and other.stdout.strip() == "b''", other
        finally:
            ctl.terminate()
            ctl.wait(30)
    finally:
        pod.stop_and_remove()
