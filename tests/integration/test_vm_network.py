"""VM pods on a real CNI bridge network: the VM gets exactly the pod IP by DHCP, the host reaches it (ping, SSH
with the key from the VirtletSSHKeys annotation), cloud-init's write_files/runcmd take effect, the hostname is the
pod's, DNS comes from the sandbox's DNSConfig, and two VM pods reach each other."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull
from virtlet.cri.gen import api_pb2 as api

pytestmark = [pytest.mark.libvirt, pytest.mark.network]


@pytest.fixture
def ssh_key(world_dir: Path) -> tuple[Path, str]:
    key = world_dir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "virtlet-test", "-f", str(key)], check=True)
    return key, (world_dir / "id_ed25519.pub").read_text().strip()


def ssh(key: Path, ip: str, command: str, timeout: float = 60) -> str:
    res = subprocess.run(
        ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "ConnectTimeout=10", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"root@{ip}", command],
        capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"ssh {ip} {command!r} failed: {res.stderr}"
    return res.stdout


def wait_ssh(key: Path, ip: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            ssh(key, ip, "true", timeout=20)
            return
        except (AssertionError, subprocess.TimeoutExpired):
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def pod_ip(pod: Pod) -> str:
    return pod.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id)).status.network.ip


def test_two_vm_pods_on_the_pod_network(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                                        tiny_image: Path, ssh_key: tuple[Path, str], bridge_cni: Path) -> None:
    import shutil

    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    name = image_server.name("files/tiny.qcow2")
    _pull(vm_virtletd, name)
    key, pub = ssh_key
    user_data = {"write_files": [{"path": "/etc/virtlet-test/greeting", "content": "written by cloud-init\n",
                                  "permissions": "0600"}],
                 "runcmd": ["echo RUNCMD-SAW $(cat /etc/virtlet-test/greeting)"]}
    pods = []
    for n in ("vm-net-a", "vm-net-b"):
        pod = Pod(vm_virtletd, world_dir, n, image=name, annotations={
            "VirtletSSHKeys": pub, "VirtletCloudInitUserData": json.dumps(user_data)})
        pod.sandbox_config.dns_config.servers.append("10.96.0.10")
        pod.sandbox_config.dns_config.searches.extend(["default.svc.cluster.local", "svc.cluster.local"])
        pods.append(pod)
    try:
        for pod in pods:
            pod.run_sandbox()
            pod.create()
            pod.start()
        ips = []
        for pod in pods:
            marker = pod.wait_log(MARKER)
            ip = pod_ip(pod)
            assert ip and f"ip={ip}/" in marker, (ip, marker)  # exactly the pod IP, by DHCP
            assert f"hostname={pod.name}" in marker
            assert "RUNCMD-SAW written by cloud-init" in "\n".join(pod.log_lines())
            ips.append(ip)
        a, b = ips
        subprocess.run(["busybox", "ping", "-c", "2", "-W", "5", a], check=True, capture_output=True)
        wait_ssh(key, a)
        assert ssh(key, a, "hostname").strip() == "vm-net-a"
        assert ssh(key, a, "cat /etc/virtlet-test/greeting") == "written by cloud-init\n"
        resolv = ssh(key, a, "cat /etc/resolv.conf")
        assert "nameserver 10.96.0.10" in resolv and "default.svc.cluster.local" in resolv, resolv
        info = json.loads(pods[0].rt.PodSandboxStatus(api.PodSandboxStatusRequest(
            pod_sandbox_id=pods[0].sandbox_id, verbose=True)).info["info"])
        gateway = info["network"]["nics"][0]["gateway"]
        assert f"default via {gateway}" in ssh(key, a, "ip route")
        # pod to pod
        assert "0% packet loss" in ssh(key, a, f"ping -c 2 -W 5 {b}")
    finally:
        for pod in pods:
            pod.stop_and_remove()
    net = json.loads((bridge_cni / "10-bridge.conflist").read_text())["name"]
    reservations = Path("/var/lib/cni/networks") / net
    left = [p.name for p in reservations.iterdir() if p.name[0].isdigit()] if reservations.exists() else []
    assert left == [], f"host-local IP reservations left: {left}"
    dhcp = subprocess.run(["pgrep", "-f", "virtlet.network.dhcp_server"], capture_output=True, text=True).stdout
    for pid in dhcp.split():
        cmdline = Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        assert str(vm_virtletd.base) not in cmdline, f"DHCP server left: {cmdline}"
