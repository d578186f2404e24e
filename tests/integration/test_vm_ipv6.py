"""Two VM pods (the `tiny` guest: busybox udhcpc for IPv4, dhcpcd for RA + DHCPv6, no network-config) on a
dual-stack CNI bridge network (host-local for both families): each guest gets exactly its IPv6 pod address from
the per-pod server, passes DAD, has an IPv6 default route from the RA, and the two ping each other over v4 and
v6; the pod-side veth keeps no global IPv6 address."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import NetnsGuard, bridge_network, qemu_virtletd
from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull
from tests.integration.test_vm_network import pod_ip, ssh, wait_ssh
from tests.integration.test_vm_network import ssh_key as ssh_key
from virtlet.cri.gen import api_pb2 as api

pytestmark = [pytest.mark.libvirt, pytest.mark.network]


@pytest.fixture
def bridge_cni(world_dir: Path) -> Iterator[Path]:
    """Overrides conftest's: a test-unique dual-stack bridge network with default routes for both families."""
    n = random.randint(1, 250)
    v6 = f"fd6a:61:{random.randint(1, 0xffff):x}:{n:x}::/64"
    with bridge_network(world_dir, "v6t", f"10.66.{n}.0/24", v6) as conf:
        yield conf


def wait_v6(key: Path, ip4: str, ip6: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = ssh(key, ip4, "ip -6 addr show scope global")
        if f"{ip6}/" in out and "tentative" not in out:
            return out
        time.sleep(2)
    diag = ssh(key, ip4, "tail -30 /var/log/dhcpcd-*.log")
    raise AssertionError(f"the guest did not get {ip6}: {out}\n{diag}")


def test_two_tiny_vm_pods_ping_over_v4_and_v6(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                                              tiny_image: Path, ssh_key: tuple[Path, str]) -> None:
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    name = image_server.name("files/tiny.qcow2")
    _pull(vm_virtletd, name)
    key, pub = ssh_key
    pods = [Pod(vm_virtletd, world_dir, n, image=name, annotations={"VirtletSSHKeys": pub})
            for n in ("v6-vm-a", "v6-vm-b")]
    try:
        for pod in pods:
            pod.run_sandbox()
            pod.create()
            pod.start()
        addrs = []
        for pod in pods:
            pod.wait_log(MARKER)
            status = pod.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id)).status
            (ip6,) = [a.ip for a in status.network.additional_ips]
            ip4 = pod_ip(pod)
            wait_ssh(key, ip4)
            got = wait_v6(key, ip4, ip6)
            assert "dadfailed" not in got, got
            assert got.count("inet6 ") == 1, f"more than the pod address (SLAAC?): {got}"
            route = ssh(key, ip4, "ip -6 route show default")
            assert route.startswith("default via fe80:"), f"no IPv6 default route from the RA: {route!r}"
            info = json.loads(pod.rt.PodSandboxStatus(api.PodSandboxStatusRequest(
                pod_sandbox_id=pod.sandbox_id, verbose=True)).info["info"])
            nic = info["network"]["nics"][0]
            netns = Path(info["network"]["netns_path"]).name
            veth6 = subprocess.run(["ip", "-n", netns, "-6", "addr", "show", "dev", nic["veth"], "scope", "global"],
                                   capture_output=True, text=True, check=True).stdout
            assert veth6.strip() == "", f"the pod veth kept a global IPv6 address: {veth6}"
            assert "ok" in ssh(key, ip4, f"ping -6 -c 2 -W 5 {nic['ipv6_gateway']} >/dev/null && echo ok")
            addrs.append((ip4, ip6))
        (a4, a6), (b4, b6) = addrs
        assert "0% packet loss" in ssh(key, a4, f"ping -c 2 -W 5 {b4}")
        assert "0% packet loss" in ssh(key, a4, f"ping -6 -c 2 -W 5 {b6}")
        assert "0% packet loss" in ssh(key, b4, f"ping -6 -c 2 -W 5 {a6}")
        subprocess.run(["busybox", "ping", "-6", "-c", "2", "-W", "5", a6], check=True, capture_output=True)
        for pod in pods:
            console = "\n".join(pod.log_lines())
            assert "duplicate address" not in console.lower(), console
    finally:
        for pod in pods:
            pod.stop_and_remove()


def test_ipv6_only_tiny_vm_pod(world_dir: Path, netns_guard: NetnsGuard, libvirt_daemons: None, image_server: Any,
                              tiny_image: Path) -> None:
    """A pod network with only IPv6 (issue 18): the guest gets its pod address and a default route from the
    per-pod server's RA + DHCPv6 alone (no DHCPv4 on the network, no cloud-init network-config in the tiny
    image), and the host reaches it over v6.  Checked inside the guest through the guest agent (no v4 to SSH)."""
    v6 = f"fd6a:62:{random.randint(1, 0xffff):x}:{random.randint(1, 0xfff):x}::/64"
    with bridge_network(world_dir, "v6o", None, v6) as conf, qemu_virtletd(world_dir, netns_guard, conf) as daemon:
        shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
        name = image_server.name("files/tiny.qcow2")
        _pull(daemon, name)
        pod = Pod(daemon, world_dir, "v6-only", image=name)
        try:
            pod.run_sandbox()
            status = pod.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id)).status
            ip6 = status.network.ip
            assert ":" in ip6 and not status.network.additional_ips, status.network
            pod.create()
            pod.start()
            pod.wait_log(MARKER)
            deadline = time.monotonic() + 120
            addr = route = ""
            while time.monotonic() < deadline:
                addr = _exec(pod, ["ip", "-6", "addr", "show", "scope", "global"])
                route = _exec(pod, ["ip", "-6", "route", "show", "default"])
                if f"{ip6}/" in addr and "tentative" not in addr and route.startswith("default via fe80:"):
                    break
                time.sleep(2)
            assert f"{ip6}/" in addr and "tentative" not in addr, addr
            assert "dadfailed" not in addr and addr.count("inet6 ") == 1, addr
            assert route.startswith("default via fe80:"), route
            assert "inet " not in _exec(pod, ["ip", "-4", "addr", "show", "scope", "global"])  # no v4 at all
            subprocess.run(["busybox", "ping", "-6", "-c", "2", "-W", "5", ip6], check=True, capture_output=True)
        finally:
            pod.stop_and_remove()


def _exec(pod: Pod, cmd: list[str]) -> str:
    out = pod.rt.ExecSync(api.ExecSyncRequest(container_id=pod.container_id, cmd=cmd, timeout=30), timeout=60)
    return out.stdout.decode()


@pytest.mark.slow
def test_full_image_applies_network_config_v2(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                                              ssh_key: tuple[Path, str]) -> None:
    """Real cloud-init (the `full` guest) with VirtletCloudInitNetworkConfigVersion "2": the static v6 default
    route via the network's global v6 gateway can only come from network-config (the RA's is via fe80::)."""
    from tests.integration.conftest import guest_image
    from tests.integration.test_full_image import FULL_BOOT_TIMEOUT

    shutil.copy(guest_image("full"), image_server.root / "full.qcow2")
    name = image_server.name("files/full.qcow2")
    _pull(vm_virtletd, name)
    key, pub = ssh_key
    user_data = {"users": [{"name": "root", "ssh-authorized-keys": [pub]}], "runcmd": ["echo NETCONFIG-V2-UP"]}
    pod = Pod(vm_virtletd, world_dir, "v2-vm", image=name, memory=1 << 30, annotations={
        "VirtletVCPUCount": "2", "VirtletCloudInitUserData": json.dumps(user_data),
        "VirtletCloudInitNetworkConfigVersion": "2"})
    try:
        pod.run_sandbox()
        status = pod.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id)).status
        (ip6,) = [a.ip for a in status.network.additional_ips]
        info = json.loads(pod.rt.PodSandboxStatus(api.PodSandboxStatusRequest(
            pod_sandbox_id=pod.sandbox_id, verbose=True)).info["info"])
        gw6 = info["network"]["nics"][0]["ipv6_gateway"]
        pod.create()
        pod.start()
        pod.wait_log("NETCONFIG-V2-UP", timeout=FULL_BOOT_TIMEOUT)
        ip4 = pod_ip(pod)
        wait_ssh(key, ip4, timeout=180)
        got = wait_v6(key, ip4, ip6)
        assert "dadfailed" not in got, got
        route = ssh(key, ip4, "ip -6 route show default")
        assert f"via {gw6}" in route, f"network-config v2's v6 default route (via {gw6}) is missing: {route!r}"
        subprocess.run(["busybox", "ping", "-6", "-c", "2", "-W", "10", ip6], check=True, capture_output=True)
    finally:
        pod.stop_and_remove()
