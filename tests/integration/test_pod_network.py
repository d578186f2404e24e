"""Pod networking through real parts: real netns, the Debian CNI plugins, the real DHCP server process.

A stand-in "VM" is a second netns joined by a veth pair: its outer end takes the tap's name (so the real
``attach_after_start`` moves it into the pod netns and onto the bridge) and its inner end carries the VM MAC.
busybox ``udhcpc`` in there must get exactly the pod's address, router, DNS and hostname.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from virtlet import errors, procs
from virtlet.network import netns, plumbing
from virtlet.network.cni import CniConfigStore, CniRunner
from virtlet.network.model import PodNetworkInfo, SandboxNetSpec
from virtlet.network.pod_network import PodNetwork, tap_prefix

CNI_BIN = Path("/usr/lib/cni")
HOST_LOCAL_DIR = Path("/var/lib/cni/networks")

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, links)"),
    pytest.mark.skipif(not (CNI_BIN / "bridge").exists(), reason="needs containernetworking-plugins"),
    pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox (udhcpc)"),
]


def _run(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res


def _free_subnet_octet() -> int:
    used = _run("ip", "-4", "-o", "addr").stdout
    candidates = [n for n in range(100, 250) if f"10.88.{n}." not in used]
    return random.choice(candidates)


@dataclass
class Net:
    """One test-unique CNI network: conf dir, bin dirs, host bridge, subnet."""

    tmp: Path
    name: str
    bridge: str
    octet: int
    conf_dir: Path
    run_dir: Path
    bin_dirs: list[Path]
    made_ns: list[str] = field(default_factory=list)
    pods: list[tuple[PodNetwork, SandboxNetSpec]] = field(default_factory=list)

    @property
    def gateway(self) -> str:
        return f"10.88.{self.octet}.1"

    def write_conflist(self, extra_plugins: list[dict] | None = None, version: str = "1.0.0") -> None:
        plugins = [{"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                    "ipam": {"type": "host-local", "ranges": [[{"subnet": f"10.88.{self.octet}.0/24"}]],
                             "routes": [{"dst": "0.0.0.0/0"}]},
                    "dns": {"nameservers": [f"10.88.{self.octet}.53"], "search": ["cni.test.local"]}}]
        plugins += extra_plugins or []
        (self.conf_dir / "10-test.conflist").write_text(
            json.dumps({"cniVersion": version, "name": self.name, "plugins": plugins}))

    def pod_network(self) -> PodNetwork:
        store = CniConfigStore(self.conf_dir, self.bin_dirs)
        return PodNetwork(CniRunner(store, self.run_dir / "cni-cache"), self.run_dir / "pods")

    def spec(self, hostname: str = "vm-pod", dns: dict | None = None) -> SandboxNetSpec:
        sid = uuid.uuid4().hex
        path = netns.create(sid)
        self.made_ns.append(sid)
        return SandboxNetSpec(sandbox_id=sid, netns_path=str(path), pod_name=hostname, pod_namespace="test",
                              pod_uid=str(uuid.uuid4()), hostname=hostname, dns=dns or {})

    def reservations(self) -> list[str]:
        d = HOST_LOCAL_DIR / self.name
        if not d.is_dir():
            return []
        return [p.name for p in d.iterdir() if p.name != "lock" and not p.name.startswith("last_reserved_ip")]


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    octet = _free_subnet_octet()
    tag = uuid.uuid4().hex[:6]
    conf = tmp_path / "conf"
    conf.mkdir()
    n = Net(tmp=tmp_path, name=f"virtlet-test-{tag}", bridge=f"vtcni{tag}", octet=octet, conf_dir=conf,
            run_dir=tmp_path / "run", bin_dirs=[CNI_BIN])
    try:
        yield n
    finally:
        for pn, spec in n.pods:
            try:
                pn.teardown(spec)
            except Exception as exc:  # pragma: no cover - cleanup must go on
                print(f"teardown of {spec.sandbox_id} failed: {exc}")
        for name in n.made_ns:
            netns.delete(name)
        for tap in plumbing.list_links("vt"):
            if any(tap.startswith(tap_prefix(s)) for s in n.made_ns):
                plumbing.delete_link(tap)
        plumbing.delete_link(n.bridge)
        shutil.rmtree(HOST_LOCAL_DIR / n.name, ignore_errors=True)


@dataclass
class FakeVm:
    ns: str
    mac: str


def connect_fake_vm(n: Net, pn: PodNetwork, info: PodNetworkInfo) -> FakeVm:
    """The VM stand-in: a netns with eth0 carrying the VM MAC, its peer named like the tap."""
    nic = info.nics[0]
    vm_ns = f"vtvm{info.sandbox_id[:10]}"
    netns.create(vm_ns)
    n.made_ns.append(vm_ns)
    inner = f"vi{info.sandbox_id[:10]}"
    _run("ip", "link", "add", nic.tap, "type", "veth", "peer", "name", inner)
    _run("ip", "link", "set", inner, "netns", vm_ns)
    _run("ip", "-n", vm_ns, "link", "set", inner, "name", "eth0")
    _run("ip", "-n", vm_ns, "link", "set", "eth0", "address", nic.mac, "up")
    pn.attach_after_start(info)  # the real path: "tap" moved into the pod netns and enslaved
    return FakeVm(ns=vm_ns, mac=nic.mac)


def udhcpc(n: Net, vm: FakeVm) -> dict[str, str]:
    """Run busybox udhcpc in the stand-in VM; return the variables its script saw on 'bound'."""
    out = n.tmp / f"lease-{vm.ns}.env"
    out.unlink(missing_ok=True)
    script = n.tmp / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > "{out}.$interface"\nexit 0\n')
    script.chmod(0o755)
    _run("ip", "netns", "exec", vm.ns, "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5",
         "-T", "2", "-s", str(script), "-O", "staticroutes", "-O", "search", "-O", "mtu", timeout=60)
    env = {}
    for line in Path(f"{out}.eth0").read_text().splitlines():
        k, _, v = line.partition("=")
        env[k] = v
    return env


def configure_vm(vm: FakeVm, lease: dict[str, str]) -> None:
    prefix = ipaddress.IPv4Network(f"0.0.0.0/{lease['subnet']}").prefixlen
    _run("ip", "-n", vm.ns, "addr", "add", f"{lease['ip']}/{prefix}", "dev", "eth0")
    _run("ip", "-n", vm.ns, "route", "add", "default", "via", lease["router"])


def ping_from(ns: str | None, address: str) -> None:
    cmd = ["busybox", "ping", "-c", "2", "-W", "3", address]
    if ns:
        cmd = ["ip", "netns", "exec", ns, *cmd]
    _run(*cmd, timeout=30)


def bridge_ports(n: Net) -> set[str]:
    bridge = plumbing.link_index(n.bridge)
    if bridge is None:
        return set()
    return {link for link in plumbing.list_links() if plumbing.link_info(link)["master"] == bridge}


def dhcp_alive(pid: int) -> bool:
    return procs.running(pid)


def assert_pod_gone(n: Net, spec: SandboxNetSpec, info: PodNetworkInfo, dhcp_pid: int,
                    ports_before: set[str]) -> None:
    assert not netns.exists(spec.sandbox_id)
    assert plumbing.list_links(tap_prefix(spec.sandbox_id)) == []
    assert not dhcp_alive(dhcp_pid)
    assert info.nics[0].ip not in n.reservations()
    assert not (n.run_dir / "pods" / spec.sandbox_id).exists()
    assert not (n.run_dir / "cni-cache" / f"{spec.sandbox_id}.json").exists()
    ports_after = bridge_ports(n)  # the pod's host-side veth left the CNI bridge
    assert ports_after <= ports_before and len(ports_before - ports_after) == 1


def stop_pod(n: Net, pn: PodNetwork, spec: SandboxNetSpec, info: PodNetworkInfo) -> None:
    """What the lead's StopPodSandbox does: VM gone, taps released, teardown, netns deleted."""
    pn.release_taps(info)
    pn.teardown(spec)
    pn.teardown(spec)  # idempotent
    netns.delete(spec.sandbox_id)
    n.pods[:] = [(p, s) for p, s in n.pods if s.sandbox_id != spec.sandbox_id]


def test_vm_gets_pod_ip_router_dns_hostname(net: Net) -> None:
    net.write_conflist()
    pn = net.pod_network()
    ok, reason = pn.cni.store.status()
    assert ok, reason
    spec = net.spec(hostname="vm-one", dns={"servers": ["10.96.0.10"],
                                            "searches": ["test.svc.cluster.local", "svc.cluster.local"],
                                            "options": ["ndots:5"]})
    net.pods.append((pn, spec))
    info = pn.setup(spec)

    nic = info.nics[0]
    assert ipaddress.IPv4Address(nic.ip) in ipaddress.IPv4Network(f"10.88.{net.octet}.0/24")
    assert nic.gateway == net.gateway and info.pod_ips == [nic.ip]
    # the veth lost its address and MAC to the VM and sits on the pod bridge
    veth = plumbing.link_info(nic.veth, spec.netns_path)
    assert veth["ipv4"] == [] and veth["mac"] != nic.mac
    assert veth["master"] == plumbing.link_index(nic.bridge, spec.netns_path)
    assert PodNetworkInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info

    vm = connect_fake_vm(net, pn, info)
    assert plumbing.link_info(nic.tap, spec.netns_path)["master"] == plumbing.link_index(nic.bridge,
                                                                                         spec.netns_path)
    lease = udhcpc(net, vm)
    assert lease["ip"] == nic.ip
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"] == net.gateway
    assert lease["dns"].split() == ["10.96.0.10"]  # the sandbox DNSConfig wins over the CNI result's
    assert lease["search"].split() == ["test.svc.cluster.local", "svc.cluster.local"]
    assert lease["hostname"] == "vm-one"
    assert int(lease["mtu"]) == nic.mtu
    configure_vm(vm, lease)
    ping_from(vm.ns, net.gateway)
    ping_from(None, nic.ip)  # the host reaches the VM over the CNI bridge

    dhcp_pid, ports = info.dhcp_pid, bridge_ports(net)
    stop_pod(net, pn, spec, info)
    assert_pod_gone(net, spec, info, dhcp_pid, ports)


def test_two_pods_reach_each_other_and_dhcp_survives_restart(net: Net) -> None:
    net.write_conflist(version="0.4.0")
    pn = net.pod_network()
    pods = []
    for name in ("vm-a", "vm-b"):
        spec = net.spec(hostname=name)
        net.pods.append((pn, spec))
        info = pn.setup(spec)
        pods.append((spec, info, connect_fake_vm(net, pn, info)))

    leases = []
    for _spec, info, vm in pods:
        lease = udhcpc(net, vm)
        assert lease["ip"] == info.nics[0].ip
        assert lease["dns"].split() == [f"10.88.{net.octet}.53"]  # no DNSConfig: the CNI result's DNS
        assert lease["search"].split() == ["cni.test.local"]
        configure_vm(vm, lease)
        leases.append(lease)
    assert leases[0]["hostname"] == "vm-a" and leases[1]["hostname"] == "vm-b"
    ping_from(pods[0][2].ns, leases[1]["ip"])

    # a new virtletd (new PodNetwork) re-attaches: the running server is kept; a dead one is restarted
    spec, info, vm = pods[0]
    restarted = net.pod_network()
    old_pid = info.dhcp_pid
    restarted.reattach(info, spec.hostname)
    assert info.dhcp_pid == old_pid
    os.kill(old_pid, 9)
    restarted.reattach(info, spec.hostname)
    assert info.dhcp_pid != old_pid and restarted.dhcp_pid(spec.sandbox_id, spec.netns_path) == info.dhcp_pid
    assert udhcpc(net, vm)["ip"] == info.nics[0].ip

    for spec, info, _vm in pods:
        pid, ports = info.dhcp_pid, bridge_ports(net)
        stop_pod(net, restarted, spec, info)
        assert_pod_gone(net, spec, info, pid, ports)
    assert net.reservations() == []


def test_host_taps_for_start_and_release(net: Net) -> None:
    net.write_conflist()
    pn = net.pod_network()
    spec = net.spec()
    net.pods.append((pn, spec))
    info = pn.setup(spec)
    taps = pn.host_taps_for_start(info)
    assert taps == [info.nics[0].tap]
    link = plumbing.link_info(taps[0])
    assert link["kind"] == "tun" and link["mtu"] == info.nics[0].mtu
    assert pn.host_taps_for_start(info) == taps  # idempotent
    pn.release_taps(info)
    assert not plumbing.link_exists(taps[0])
    pn.release_taps(info)
    pid, ports = info.dhcp_pid, bridge_ports(net)
    stop_pod(net, pn, spec, info)
    assert_pod_gone(net, spec, info, pid, ports)


def test_teardown_without_info_after_interrupted_setup(net: Net) -> None:
    """A virtletd killed after setup never stored the info: teardown(spec) still cleans everything."""
    net.write_conflist()
    pn = net.pod_network()
    spec = net.spec()
    net.pods.append((pn, spec))
    info = pn.setup(spec)
    pn.host_taps_for_start(info)
    pid, ports = info.dhcp_pid, bridge_ports(net)
    net.pod_network().teardown(spec)
    netns.delete(spec.sandbox_id)
    net.pods.clear()
    assert_pod_gone(net, spec, info, pid, ports)


def _assert_nothing_left(net: Net, spec: SandboxNetSpec) -> None:
    assert net.reservations() == []
    assert not (net.run_dir / "cni-cache" / f"{spec.sandbox_id}.json").exists()
    assert list((net.run_dir / "pods").glob("*/dhcp.pid")) == [] if (net.run_dir / "pods").exists() else True
    assert plumbing.list_links(tap_prefix(spec.sandbox_id)) == []
    assert [link for link in plumbing.list_links(ns=spec.netns_path) if link != "lo"] == []


def test_no_cni_config(net: Net) -> None:
    pn = net.pod_network()
    ok, reason = pn.cni.store.status()
    assert not ok and str(net.conf_dir) in reason
    spec = net.spec()
    with pytest.raises(errors.FailedPrecondition, match="no valid CNI network config"):
        pn.setup(spec)
    _assert_nothing_left(net, spec)


def test_config_naming_missing_plugin(net: Net) -> None:
    net.write_conflist(extra_plugins=[{"type": "virtlet-no-such-plugin"}])
    pn = net.pod_network()
    ok, reason = pn.cni.store.status()
    assert not ok and "virtlet-no-such-plugin" in reason
    spec = net.spec()
    with pytest.raises(errors.FailedPrecondition, match="virtlet-no-such-plugin"):
        pn.setup(spec)
    _assert_nothing_left(net, spec)


def test_failing_plugin_is_undone(net: Net) -> None:
    """bridge + host-local succeed, a chained plugin fails: its message comes back, the ADD is undone."""
    bin_dir = net.tmp / "bin"
    bin_dir.mkdir()
    plugin = bin_dir / "virtlet-test-fail"
    plugin.write_text('#!/bin/sh\ncat >/dev/null\nif [ "$CNI_COMMAND" = ADD ]; then\n'
                      '  echo \'{"cniVersion": "1.0.0", "code": 11, "msg": "boom from the test plugin"}\'\n'
                      '  exit 1\nfi\nexit 0\n')
    plugin.chmod(0o755)
    net.bin_dirs = [bin_dir, CNI_BIN]
    net.write_conflist(extra_plugins=[{"type": "virtlet-test-fail"}])
    pn = net.pod_network()
    spec = net.spec()
    with pytest.raises(errors.Internal, match="boom from the test plugin"):
        pn.setup(spec)
    _assert_nothing_left(net, spec)
