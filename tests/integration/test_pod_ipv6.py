"""IPv6 from the per-pod server through real parts: real netns, Debian's bridge + host-local (both families),
the real DHCP server process, and a real DHCPv6/RA client (dhcpcd) in a stand-in VM netns (see
test_pod_network.py): the guest gets exactly the pod's v6 address by DHCPv6, its default route from the RA (via
the gateway's link-local address, answered by the server's proxied neighbour advertisement), passes DAD, and
reaches the v6 gateway, a second pod and the host over v6.  Also an IPv6-only network."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.integration.test_pod_network import (
    FakeVm,
    Net,
    _run,
    assert_pod_gone,
    connect_fake_vm,
    net,  # noqa: F401 - the fixture
    ping_from,
    stop_pod,
    udhcpc,
)
from virtlet.network import plumbing
from virtlet.network.model import PodNetworkInfo

pytestmark = [pytest.mark.skipif(shutil.which("dhcpcd") is None, reason="needs dhcpcd (Debian dhcpcd-base)")]


def write_conflist(n: Net, v4: bool = True) -> str:
    """A dual-stack (or IPv6-only) bridge network with default routes for both families; returns the v6 subnet."""
    subnet6 = f"fd6a:60:{n.octet:x}:{random.randint(1, 0xffff):x}::/64"
    ranges = [[{"subnet": subnet6}]]
    routes = [{"dst": "::/0"}]
    if v4:
        ranges.insert(0, [{"subnet": f"10.88.{n.octet}.0/24"}])
        routes.insert(0, {"dst": "0.0.0.0/0"})
    (n.conf_dir / "10-test.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": n.name, "plugins": [
            {"type": "bridge", "bridge": n.bridge, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": ranges, "routes": routes}}]}))
    return subnet6


def dhcpcd6(n: Net, vm: FakeVm) -> None:
    """dhcpcd, IPv6 only, in the stand-in VM: solicits an RA, takes the DHCPv6 address, exits once bound.
    Its hook script is /bin/true, so nothing of the host (resolv.conf) is touched."""
    conf = n.tmp / "dhcpcd.conf"
    conf.write_text("ipv6only\nnoipv6rs\nipv6rs\nia_na\nnohook resolv.conf\n")
    state = Path("/var/lib/dhcpcd")
    before = set(state.iterdir()) if state.is_dir() else set()
    try:
        _run("ip", "netns", "exec", vm.ns, "dhcpcd", "-6", "-1", "-B", "-t", "40", "-f", str(conf), "-c",
             "/bin/true", "eth0", timeout=60)
    finally:
        # dhcpcd's privilege-separation helpers outlive its oneshot exit: end every process of the stand-in VM
        for pid in _run("ip", "netns", "pids", vm.ns, check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        for f in Path("/run/dhcpcd").glob("eth0-6.*"):
            f.unlink(missing_ok=True)
        for f in set(state.iterdir()) - before if state.is_dir() else ():
            f.unlink(missing_ok=True)  # the DUID and lease dhcpcd wrote for the stand-in


def v6_state(vm: FakeVm, want: str, timeout: float = 30) -> str:
    """``ip -6 addr`` of the VM's eth0 once ``want`` is there and no longer tentative."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = _run("ip", "-n", vm.ns, "-6", "addr", "show", "dev", "eth0").stdout
        if f"{want}/" in out and "tentative" not in out:
            return out
        time.sleep(0.5)
    return out


def bridge_ports(n: Net) -> set[str]:
    """The CNI bridge's ports; tolerant of other tests' links vanishing between listing and reading them."""
    bridge = plumbing.link_index(n.bridge)
    ports = set()
    for link in plumbing.list_links():
        try:
            if bridge is not None and plumbing.link_info(link)["master"] == bridge:
                ports.add(link)
        except plumbing.LinkNotFound:
            continue
    return ports


def ping6_from(ns: str | None, address: str) -> None:
    cmd = ["busybox", "ping", "-6", "-c", "2", "-W", "5", address]
    _run(*(["ip", "netns", "exec", ns, *cmd] if ns else cmd), timeout=60)


def check_guest(n: Net, info: PodNetworkInfo, vm: FakeVm) -> str:
    nic = info.nics[0]
    ip6 = nic.ipv6[0].split("/")[0]
    dhcpcd6(n, vm)
    addrs = v6_state(vm, ip6)
    assert f"{ip6}/" in addrs, addrs
    assert "dadfailed" not in addrs and "tentative" not in addrs, addrs
    # only the pod address: no SLAAC address next to it
    assert len(re.findall(r"inet6 (?!fe80)", addrs)) == 1, addrs
    route = _run("ip", "-n", vm.ns, "-6", "route", "show", "default").stdout
    assert "via fe80::" in route, f"no IPv6 default route from the RA: {route!r}"
    ping6_from(vm.ns, nic.ipv6_gateway)  # through the proxied router address to the real gateway
    ping6_from(None, ip6)  # the host reaches the VM over the CNI bridge
    return ip6



def test_dual_stack_guest_gets_v6_by_ra_and_dhcpv6(net: Net) -> None:  # noqa: F811
    subnet6 = write_conflist(net)
    pn = net.pod_network()
    pods = []
    for name in ("v6-a", "v6-b"):
        spec = net.spec(hostname=name)
        net.pods.append((pn, spec))
        info = pn.setup(spec)
        nic = info.nics[0]
        assert ipaddress.ip_interface(nic.ipv6[0]).network == ipaddress.IPv6Network(subnet6)
        veth6 = _run("ip", "-n", spec.netns_path.rsplit("/", 1)[1], "-6", "addr", "show", "dev", nic.veth,
                     "scope", "global").stdout
        assert veth6.strip() == "", f"the pod veth kept a global IPv6 address: {veth6}"
        vm = connect_fake_vm(net, pn, info)
        lease = udhcpc(net, vm)  # DHCPv4 as before
        assert lease["ip"] == nic.ip
        _run("ip", "-n", vm.ns, "addr", "add", f"{lease['ip']}/24", "dev", "eth0")
        ip6 = check_guest(net, info, vm)
        pods.append((spec, info, vm, ip6))
    (_, _, vm_a, ip6_a), (_, _, vm_b, ip6_b) = pods
    ping6_from(vm_a.ns, ip6_b)
    ping6_from(vm_b.ns, ip6_a)
    ping_from(vm_a.ns, pods[1][1].nics[0].ip)
    log = (net.run_dir / "pods" / pods[0][0].sandbox_id / "dhcp.log").read_text()
    assert "IPv6 gateway" in log and "DHCPv6 REPLY" in log, log
    for spec, info, _, _ in pods:
        dhcp_pid, ports = info.dhcp_pid, bridge_ports(net)
        stop_pod(net, pn, spec, info)
        assert_pod_gone(net, spec, info, dhcp_pid, ports)


def test_ipv6_only_pod(net: Net) -> None:  # noqa: F811
    write_conflist(net, v4=False)
    pn = net.pod_network()
    spec = net.spec(hostname="v6-only")
    net.pods.append((pn, spec))
    info = pn.setup(spec)
    assert info.nics[0].ip == "" and info.pod_ips == [info.nics[0].ipv6[0].split("/")[0]]
    vm = connect_fake_vm(net, pn, info)
    check_guest(net, info, vm)
    # no DHCPv4 answer for a NIC without an IPv4 address
    res = _run("ip", "netns", "exec", vm.ns, "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "2",
               "-T", "1", "-s", "/bin/true", check=False, timeout=30)
    assert res.returncode != 0
    assert plumbing.link_exists(info.nics[0].tap, spec.netns_path)
    dhcp_pid, ports = info.dhcp_pid, bridge_ports(net)
    stop_pod(net, pn, spec, info)
    assert_pod_gone(net, spec, info, dhcp_pid, ports)
