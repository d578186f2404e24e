"""CNI capability arguments through a running virtletd and Debian's plugins: hostPort (``portmap``), bandwidth
(``bandwidth``), fixed IPs (``host-local`` with the ``ips`` capability) and a fixed MAC (``tuning``).

Every pod here runs on a test-unique dual-stack bridge network; iptables/ip6tables rules and tc qdiscs are
looked up by the sandbox id (portmap's rule comments) or by the test bridge, and removed in teardown even when
a test fails."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import NetnsGuard, running_virtletd
from virtlet.cri.gen import api_pb2 as api
from virtlet.network import netns as vnetns

CNI_BIN = Path("/usr/lib/cni")

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, iptables, tc)"),
    pytest.mark.skipif(not all((CNI_BIN / p).exists() for p in ("bridge", "host-local", "portmap", "bandwidth",
                                                                 "tuning")),
                       reason="needs containernetworking-plugins"),
]


def _sh(*cmd: str, check: bool = True) -> str:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res.stdout


class CapsNet:
    """A test-unique CNI network: bridge + host-local (v4 and v6, ``ips`` capability) + tuning (``mac``) +
    portmap + bandwidth.  Remembers the sandbox ids it served to clean their iptables rules."""

    def __init__(self, world_dir: Path) -> None:
        n = random.randint(1, 250)
        self.name = f"vcap-{world_dir.name[-8:]}"
        self.bridge = f"vcb{world_dir.name[-8:]}"[:15]
        self.subnet4 = f"10.98.{n}.0/24"
        self.subnet6 = f"fd98:{random.randint(1, 0xffff):x}:{n:x}::/64"
        self.prefix4 = f"10.98.{n}."
        self.conf = world_dir / "cni-caps"
        self.conf.mkdir()
        (self.conf / "10-caps.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": self.name, "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": self.subnet4}], [{"subnet": self.subnet6}]],
                          "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]},
                 "capabilities": {"ips": True}},
                {"type": "tuning", "capabilities": {"mac": True}},
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "bandwidth", "capabilities": {"bandwidth": True}},
                {"type": "loopback"}]}))
        self.sandbox_ids: list[str] = []

    def cleanup(self) -> None:
        for sid in self.sandbox_ids:
            for tool in ("iptables", "ip6tables"):
                remove_rules(tool, sid)
        _sh("ip", "link", "del", self.bridge, check=False)
        shutil.rmtree(f"/var/lib/cni/networks/{self.name}", ignore_errors=True)


def nat_rules(tool: str, sandbox_id: str) -> list[str]:
    """The nat-table rules that name the sandbox (portmap writes its id in every rule's comment)."""
    return [line for line in _sh(tool, "-w", "-t", "nat", "-S").splitlines() if sandbox_id in line]


def remove_rules(tool: str, sandbox_id: str) -> None:
    """Delete the sandbox's nat rules and the per-pod chains they jump to (test teardown, also on failure)."""
    chains: set[str] = set()
    for line in nat_rules(tool, sandbox_id):
        args = shlex.split(line)
        if "-j" in args:
            target = args[args.index("-j") + 1]
            if target.startswith("CNI-DN-") or target.startswith("CNI-SN-"):
                chains.add(target)
        if args and args[0] == "-A":
            _sh(tool, "-w", "-t", "nat", "-D", *args[1:], check=False)
    for chain in chains:
        _sh(tool, "-w", "-t", "nat", "-F", chain, check=False)
        _sh(tool, "-w", "-t", "nat", "-X", chain, check=False)


@pytest.fixture
def caps_net(world_dir: Path) -> Iterator[CapsNet]:
    net = CapsNet(world_dir)
    try:
        yield net
    finally:
        net.cleanup()


@pytest.fixture
def caps_virtletd(world_dir: Path, caps_net: CapsNet, netns_guard: NetnsGuard) -> Iterator[VirtletdProcess]:
    with running_virtletd(world_dir, netns_guard, caps_net.conf, ["--libvirt-uri", "test:///default",
                                                                  "--kvm", "off"]) as daemon:
        yield daemon


def _config(name: str, annotations: dict[str, str] | None = None, ports: list[int] | None = None,
            uid: str | None = None) -> api.PodSandboxConfig:
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=uid or f"uid-{name}", attempt=0),
        hostname=name, annotations=annotations or {},
        port_mappings=[api.PortMapping(protocol=api.TCP, container_port=22, host_port=p) for p in ports or []])


def _run(daemon: VirtletdProcess, net: CapsNet, cfg: api.PodSandboxConfig) -> str:
    sid: str = daemon.runtime().RunPodSandbox(api.RunPodSandboxRequest(config=cfg), timeout=120).pod_sandbox_id
    net.sandbox_ids.append(sid)
    return sid


def _remove(daemon: VirtletdProcess, sid: str) -> None:
    rt = daemon.runtime()
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)


def _unique_ports(count: int) -> list[int]:
    used = _sh("iptables", "-w", "-t", "nat", "-S") + _sh("ip6tables", "-w", "-t", "nat", "-S")
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 60000)
        if f"--dport {port} " not in used and port not in ports:
            ports.append(port)
    return ports


def _dnat_chains(tool: str, sid: str, port: int) -> set[str]:
    """The per-pod DNAT chains portmap made for ``port`` (asserting there is at least one)."""
    rules = [r for r in nat_rules(tool, sid) if str(port) in r]
    chains = {a.split()[0] for r in rules for a in r.split(" -j ")[1:] if a.startswith("CNI-DN-")}
    assert chains, f"{tool}: no DNAT rule for host port {port} of sandbox {sid}: {nat_rules(tool, sid)}"
    return chains


def _assert_no_rules(sid: str, chains: dict[str, set[str]]) -> None:
    for tool in ("iptables", "ip6tables"):
        assert nat_rules(tool, sid) == [], f"{tool} rules of removed sandbox {sid} left"
        existing = _sh(tool, "-w", "-t", "nat", "-S")
        left = [c for c in chains[tool] if f"-N {c}\n" in existing + "\n"]
        assert not left, f"{tool}: per-pod chains {left} of removed sandbox {sid} left"


def _host_veths(bridge: str) -> list[str]:
    return [line.split(":")[1].strip().split("@")[0] for line in
            _sh("ip", "-o", "link", "show", "master", bridge).splitlines() if line.strip()]


def _nic0(daemon: VirtletdProcess, sid: str) -> dict[str, Any]:
    status = daemon.runtime().PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    nic: dict[str, Any] = json.loads(status.info["info"])["network"]["nics"][0]
    return nic


@contextlib.contextmanager
def stand_in_vm(sid: str, nic: dict[str, Any]) -> Iterator[str]:
    """A netns standing in for the VM: a veth pair, its outer end on the pod's bridge ``vmbr0`` (where the VM's
    tap would be), its inner end with the VM's MAC and the pod IP.  Shaping happens on the pod's *host-side*
    veth, outside the pod netns, so what reaches this netns is what would reach the VM's NIC."""
    name = f"vtvm{uuid.uuid4().hex[:12]}"
    outer, inner = f"vo{name[4:14]}", f"vi{name[4:14]}"
    try:
        vnetns.create(name)  # not `ip netns add`: it remounts /run/netns, and pods' namespaces then cannot go
        _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        _sh("ip", "link", "set", inner, "netns", name)
        _sh("ip", "link", "set", outer, "netns", sid)
        _sh("ip", "-n", sid, "link", "set", outer, "master", nic["bridge"], "up")
        _sh("ip", "-n", name, "link", "set", inner, "address", nic["mac"], "up")
        _sh("ip", "-n", name, "addr", "add", f"{nic['ip']}/{nic['prefix']}", "dev", inner)
        _sh("ip", "-n", name, "route", "add", "default", "via", nic["gateway"])
        yield name
    finally:
        _sh("ip", "-n", sid, "link", "del", outer, check=False)
        _sh("ip", "link", "del", outer, check=False)
        vnetns.delete(name)


RECEIVER = """
import json, socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(1); print("ready", flush=True)
conn, _ = srv.accept(); conn.settimeout(5); total = 0; marks = []; end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        data = conn.recv(1 << 16)
    except socket.timeout:
        continue
    if not data:
        break
    total += len(data); marks.append((time.monotonic(), total))
print(json.dumps(marks[:: max(1, len(marks) // 4000)] + marks[-1:]), flush=True)
"""


def _measure_ingress(vm_ns: str, pod_ip: str, duration: float, window: float) -> float:
    """Bytes/s reaching the stand-in VM in the last ``window`` seconds of ``duration`` seconds of a TCP stream
    sent as fast as possible from the host: the token bucket's burst is long used up by then (containerd's
    burst, 2**32-1 bits, lets about 4 minutes' worth of the rate through at line speed, ~30 MB at 1 Mbit/s)."""
    port = random.randint(20000, 60000)
    recv = subprocess.Popen(["ip", "netns", "exec", vm_ns, sys.executable, "-c", RECEIVER, str(port),
                             str(duration)], stdout=subprocess.PIPE, text=True)
    try:
        assert recv.stdout is not None and recv.stdout.readline().strip() == "ready"
        chunk = b"x" * (1 << 16)
        with socket.create_connection((pod_ip, port), timeout=30) as sock:
            sock.settimeout(duration + 30)
            with contextlib.suppress(OSError):  # the receiver closes after ``duration``
                while recv.poll() is None:
                    sock.sendall(chunk)
        out, _ = recv.communicate(timeout=60)
    finally:
        recv.kill()
        recv.wait()
    marks: list[list[float]] = json.loads(out.strip().splitlines()[-1])
    end_t, end_b = marks[-1]
    t0, b0 = next(m for m in marks if m[0] >= end_t - window)
    return (end_b - b0) / (end_t - t0)


def test_bandwidth_annotations_shape_the_pod_veth(caps_virtletd: VirtletdProcess, caps_net: CapsNet) -> None:
    sid = _run(caps_virtletd, caps_net, _config("bw", annotations={
        "kubernetes.io/ingress-bandwidth": "1M", "kubernetes.io/egress-bandwidth": "4M"}))
    (veth,) = _host_veths(caps_net.bridge)
    qdiscs = _sh("tc", "qdisc", "show", "dev", veth)
    assert "tbf" in qdiscs and "rate 1Mbit" in qdiscs, qdiscs  # ingress: a TBF on the host-side veth
    assert "ingress" in qdiscs, qdiscs  # egress: the veth's ingress redirected to an ifb with its own TBF
    filters = _sh("tc", "filter", "show", "dev", veth, "ingress")
    ifb = filters.split("to device ")[1].split(")")[0]
    assert "rate 4Mbit" in _sh("tc", "qdisc", "show", "dev", ifb)
    nic = _nic0(caps_virtletd, sid)
    with stand_in_vm(sid, nic) as vm_ns:
        rate = _measure_ingress(vm_ns, nic["ip"], duration=25, window=8)
    print(f"measured shaped ingress: {rate * 8 / 1e6:.3f} Mbit/s")
    assert 0.8 * 1e6 / 8 <= rate <= 1.2 * 1e6 / 8, f"shaped ingress rate {rate * 8 / 1e6:.2f} Mbit/s, not 1"
    _remove(caps_virtletd, sid)
    assert _sh("ip", "link", "show", ifb, check=False) == "", f"ifb {ifb} left after RemovePodSandbox"


def test_bad_bandwidth_is_invalid_argument(caps_virtletd: VirtletdProcess) -> None:
    for key, value in (("kubernetes.io/ingress-bandwidth", "fast"), ("kubernetes.io/egress-bandwidth", "2P")):
        with pytest.raises(grpc.RpcError) as err:
            caps_virtletd.runtime().RunPodSandbox(api.RunPodSandboxRequest(
                config=_config("bad-bw", annotations={key: value})), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and key in (err.value.details() or "")
    assert caps_virtletd.runtime().ListPodSandbox(api.ListPodSandboxRequest()).items == []


def test_fixed_mac_and_ips_survive_pod_re_creation(caps_virtletd: VirtletdProcess, caps_net: CapsNet) -> None:
    ip4 = f"{caps_net.prefix4}{random.randint(50, 200)}"
    ip6 = caps_net.subnet6.replace("::/64", "::77")
    mac = f"02:5e:{random.randint(0, 255):02x}:00:00:{random.randint(1, 254):02x}"
    annotations = {"VirtletMACAddress": mac.upper(), "VirtletIPAddresses": f"{ip4}/24, {ip6}/64"}
    seen = []
    for attempt in range(2):
        sid = _run(caps_virtletd, caps_net, _config("pet", annotations=annotations, uid=f"uid-pet-{attempt}"))
        status = caps_virtletd.runtime().PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid)).status
        nic = _nic0(caps_virtletd, sid)
        veth_mac = json.loads(_sh("ip", "-j", "-n", sid, "link", "show", nic["veth"]))[0]["address"]
        assert nic["mac"] == mac and veth_mac != mac  # the VM NIC has the MAC, the pod veth a fresh one
        seen.append((status.network.ip, [a.ip for a in status.network.additional_ips], nic["mac"]))
        _remove(caps_virtletd, sid)
    assert seen[0] == seen[1] == (ip4, [ip6], mac)


def test_fixed_address_refused_or_unavailable(caps_virtletd: VirtletdProcess, caps_net: CapsNet) -> None:
    rt = caps_virtletd.runtime()
    for key, value in (("VirtletMACAddress", "01:00:5e:00:00:01"), ("VirtletIPAddresses", "10.1.2.3,10.1.2.4"),
                       ("VirtletIPAddresses", "not-an-ip")):
        with pytest.raises(grpc.RpcError) as err:
            rt.RunPodSandbox(api.RunPodSandboxRequest(config=_config("bad-fixed", annotations={key: value})),
                             timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and key in (err.value.details() or "")
    # an address outside the network's range: the IPAM cannot honour it, nothing is left behind
    with pytest.raises(grpc.RpcError) as err:
        rt.RunPodSandbox(api.RunPodSandboxRequest(config=_config(
            "bad-fixed", annotations={"VirtletIPAddresses": "192.0.2.10"})), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    assert "VirtletIPAddresses" in (err.value.details() or "") and "192.0.2.10" in (err.value.details() or "")
    assert rt.ListPodSandbox(api.ListPodSandboxRequest()).items == []


ECHO = """
import socket, sys
srv = socket.socket(); srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(1); print("ready", flush=True)
srv.settimeout(60); conn, _ = srv.accept(); print(conn.recv(100).decode(), flush=True)
"""


def _echo_through(vm_ns: str, vm_port: int, host_ip: str, host_port: int) -> bytes:
    """Send a line to ``host_ip:host_port`` and return what a listener on ``vm_port`` in the VM netns got."""
    proc = subprocess.Popen(["ip", "netns", "exec", vm_ns, sys.executable, "-c", ECHO, str(vm_port)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with socket.create_connection((host_ip, host_port), timeout=30) as sock:
            sock.sendall(b"hello from the host")
        out, _ = proc.communicate(timeout=60)
        return out.strip().encode()
    finally:
        proc.kill()
        proc.wait()


def test_host_port_rules_removed_on_stop_and_after_crash(caps_virtletd: VirtletdProcess, caps_net: CapsNet) -> None:
    port_a, port_b = _unique_ports(2)
    sid = _run(caps_virtletd, caps_net, _config("hp-a", ports=[port_a]))
    # the pod is dual-stack: portmap maps both families
    chains = {tool: _dnat_chains(tool, sid, port_a) for tool in ("iptables", "ip6tables")}
    nic = _nic0(caps_virtletd, sid)
    with stand_in_vm(sid, nic) as vm_ns:  # a connection to the host port reaches the VM's port 22
        assert _echo_through(vm_ns, 22, nic["gateway"], port_a) == b"hello from the host"
    _remove(caps_virtletd, sid)
    _assert_no_rules(sid, chains)

    # the DEL after a crash: virtletd is SIGKILLed with the pod running and the pod is removed by the next one
    sid = _run(caps_virtletd, caps_net, _config("hp-b", ports=[port_b]))
    chains = {tool: _dnat_chains(tool, sid, port_b) for tool in ("iptables", "ip6tables")}
    caps_virtletd.kill()
    caps_virtletd.start()
    _remove(caps_virtletd, sid)
    _assert_no_rules(sid, chains)


def test_dual_stack_v6_address_moves_to_the_vm(caps_virtletd: VirtletdProcess, caps_net: CapsNet) -> None:
    """The pod's IPv6 address leaves the pod-side veth like the IPv4 one (else the guest's DAD fails on it), and
    the v6 default route with its gateway is kept for the guest's network-config."""
    sid = _run(caps_virtletd, caps_net, _config("ds"))
    nic = _nic0(caps_virtletd, sid)
    assert len(nic["ipv6"]) == 1 and nic["ipv6_gateway"], nic
    assert {"dst": "::/0", "gw": nic["ipv6_gateway"]} in nic["routes"], nic["routes"]
    assert _sh("ip", "-6", "-n", sid, "addr", "show", "dev", nic["veth"], "scope", "global").strip() == ""
    with stand_in_vm(sid, nic) as vm_ns:  # the guest configures the address statically, as cloud-init does
        inner = _sh("ip", "-n", vm_ns, "-o", "link", "show", "type", "veth").split(":")[1].strip().split("@")[0]
        _sh("ip", "-n", vm_ns, "addr", "add", nic["ipv6"][0], "dev", inner)
        deadline = time.monotonic() + 30
        while "tentative" in (state := _sh("ip", "-n", vm_ns, "-6", "addr", "show", "dev", inner, "scope",
                                           "global")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "dadfailed" not in state and "tentative" not in state, state
        _sh("ip", "-n", vm_ns, "-6", "route", "add", "default", "via", nic["ipv6_gateway"])
        _sh("ip", "netns", "exec", vm_ns, "busybox", "ping", "-6", "-c", "1", "-W", "10", nic["ipv6_gateway"])
    _remove(caps_virtletd, sid)
