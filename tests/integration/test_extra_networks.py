"""Extra networks from the ``k8s.v1.cni.cncf.io/networks`` annotation through a running virtletd (libvirt's test
driver), Debian's ``bridge`` + ``host-local`` plugins and real network namespaces: each extra network is its own
CNI ADD with its own interface, its own VM NIC (bridge, tap, MAC) and its own DHCP answers without a router; bad
or unknown networks are INVALID_ARGUMENT and leave nothing; a SIGKILL mid-setup leaves nothing after the restart.

Every network here is test-unique (bridge names and subnets from the world dir and a random octet)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import threading
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
ANNOTATION = "k8s.v1.cni.cncf.io/networks"

pytestmark = [
    pytest.mark.network,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, links)"),
    pytest.mark.skipif(not (CNI_BIN / "bridge").exists(), reason="needs containernetworking-plugins"),
    pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox (udhcpc)"),
]


def _sh(*cmd: str, check: bool = True, timeout: float = 60) -> str:
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stdout}{res.stderr}")
    return res.stdout


class ExtraNets:
    """Test-unique extra networks in their own conf dir: ``<prefix>-a`` and ``<prefix>-b`` (bridge + host-local,
    a /24 each) node-wide, and ``<prefix>-broken`` whose ADD always fails (a bridge name longer than the kernel
    allows; its DEL succeeds, as a CNI DEL of something never made must)."""

    def __init__(self, world_dir: Path) -> None:
        suffix = uuid.uuid4().hex[:8]  # the world dir name has upper case and "_", not for network names
        self.conf = world_dir / "cni-extra"
        self.conf.mkdir()
        self.names: dict[str, str] = {}
        self.bridges: dict[str, str] = {}
        self.subnets: dict[str, str] = {}
        for key, letter in (("a", "x"), ("b", "y")):
            n = random.randint(1, 250)
            name, bridge = f"vxn{key}-{suffix}", f"vx{letter}{suffix}"[:15]
            subnet = f"10.{96 if key == 'a' else 95}.{n}.0/24"
            self.names[key], self.bridges[key], self.subnets[key] = name, bridge, subnet
            (self.conf / f"20-{key}.conflist").write_text(json.dumps({
                "cniVersion": "1.0.0", "name": name, "plugins": [
                    {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]],
                              "routes": [{"dst": "0.0.0.0/0"}, {"dst": f"172.{20 if key == 'a' else 21}.0.0/16"}]}}]}))
        self.names["broken"] = f"vxnbroken-{suffix}"
        (self.conf / "30-broken.conf").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": self.names["broken"], "type": "bridge",
            "bridge": f"far-too-long-{suffix}",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.94.0.0/24"}]]}}))

    def reservations(self, key: str) -> list[str]:
        d = Path("/var/lib/cni/networks") / self.names[key]
        return sorted(p.name for p in d.iterdir() if p.name[0].isdigit()) if d.exists() else []

    def ports(self, key: str) -> list[str]:
        """Links enslaved to the network's bridge on the host (the pods' host-side veths)."""
        if not Path(f"/sys/class/net/{self.bridges[key]}").exists():
            return []
        return sorted(os.listdir(f"/sys/class/net/{self.bridges[key]}/brif"))

    def cleanup(self) -> None:
        for bridge in self.bridges.values():
            _sh("ip", "link", "del", bridge, check=False)
        for name in self.names.values():
            shutil.rmtree(f"/var/lib/cni/networks/{name}", ignore_errors=True)


@pytest.fixture
def extra_nets(world_dir: Path) -> Iterator[ExtraNets]:
    nets = ExtraNets(world_dir)
    try:
        yield nets
    finally:
        nets.cleanup()


@pytest.fixture
def extra_virtletd(world_dir: Path, bridge_cni: Path, extra_nets: ExtraNets,
                   netns_guard: NetnsGuard) -> Iterator[VirtletdProcess]:
    with running_virtletd(world_dir, netns_guard, bridge_cni,
                          ["--libvirt-uri", "test:///default", "--kvm", "off",
                           "--cni-extra-conf-dir", str(extra_nets.conf)]) as daemon:
        yield daemon


def _config(name: str, networks: str) -> api.PodSandboxConfig:
    return api.PodSandboxConfig(
        metadata=api.PodSandboxMetadata(name=name, namespace="default", uid=f"uid-{name}-{uuid.uuid4().hex[:6]}"),
        hostname=name, annotations={ANNOTATION: networks})


def _info(daemon: VirtletdProcess, sid: str) -> dict[str, Any]:
    status = daemon.runtime().PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sid, verbose=True))
    info: dict[str, Any] = json.loads(status.info["info"])
    info["pod_ips"] = [status.status.network.ip, *(a.ip for a in status.status.network.additional_ips)]
    return info


def _remove(daemon: VirtletdProcess, sid: str) -> None:
    daemon.runtime().StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
    daemon.runtime().RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)


def _dhcp_lease(sid: str, nic: dict[str, Any], tmp: Path) -> dict[str, str]:
    """busybox udhcpc in a stand-in VM netns whose veth takes the NIC's tap name (the DHCP server answers frames
    arriving on that tap only) and the NIC's MAC; the variables its script saw on 'bound'."""
    ns = f"vxvm{uuid.uuid4().hex[:12]}"
    inner = f"vi{ns[4:14]}"
    out = tmp / f"lease-{ns}.env"
    script = tmp / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > "{out}"\nexit 0\n')
    script.chmod(0o755)
    try:
        vnetns.create(ns)
        _sh("ip", "link", "add", nic["tap"], "type", "veth", "peer", "name", inner)
        _sh("ip", "link", "set", inner, "netns", ns)
        _sh("ip", "link", "set", nic["tap"], "netns", sid)
        _sh("ip", "-n", sid, "link", "set", nic["tap"], "master", nic["bridge"], "up")
        _sh("ip", "-n", ns, "link", "set", inner, "address", nic["mac"], "up")
        _sh("ip", "netns", "exec", ns, "busybox", "udhcpc", "-i", inner, "-f", "-q", "-n", "-t", "5", "-T", "2",
            "-s", str(script), "-O", "staticroutes", timeout=60)
        return dict(line.partition("=")[::2] for line in out.read_text().splitlines())
    finally:
        _sh("ip", "-n", sid, "link", "del", nic["tap"], check=False)
        _sh("ip", "link", "del", nic["tap"], check=False)
        vnetns.delete(ns)


def test_extra_networks_each_get_an_interface_nic_and_dhcp(extra_virtletd: VirtletdProcess, extra_nets: ExtraNets,
                                                           bridge_cni: Path, world_dir: Path) -> None:
    a, b = extra_nets.names["a"], extra_nets.names["b"]
    sid = extra_virtletd.runtime().RunPodSandbox(api.RunPodSandboxRequest(
        config=_config("two-nets", f"{a}, default/{b}@storage0")), timeout=120).pod_sandbox_id
    try:
        info = _info(extra_virtletd, sid)
        nics = info["network"]["nics"]
        assert [(n["veth"], n["bridge"], n["network"]) for n in nics] == [
            ("eth0", "vmbr0", ""), ("net1", "vmbr1", a), ("storage0", "vmbr2", b)]
        assert len({n["mac"] for n in nics}) == 3 and len({n["tap"] for n in nics}) == 3
        assert nics[1]["ip"].startswith(extra_nets.subnets["a"].rsplit(".", 2)[0] + ".")
        assert nics[2]["ip"].startswith(extra_nets.subnets["b"].rsplit(".", 2)[0] + ".")
        assert info["pod_ips"] == [nics[0]["ip"]]  # extra networks' addresses are not pod IPs
        assert extra_nets.reservations("a") == [nics[1]["ip"]] and extra_nets.reservations("b") == [nics[2]["ip"]]
        for nic in nics[1:]:  # in the pod netns: the interface on its own bridge, without the address (the VM's)
            assert f"master {nic['bridge']}" in _sh("ip", "-n", sid, "link", "show", nic["veth"])
            assert "inet " not in _sh("ip", "-n", sid, "-4", "addr", "show", nic["veth"])
        # the DHCP server answers each NIC with its own address; only the pod network's NIC gets a router
        lease0 = _dhcp_lease(sid, nics[0], world_dir)
        lease1 = _dhcp_lease(sid, nics[1], world_dir)
        assert lease0["ip"] == nics[0]["ip"] and lease0.get("router")
        assert lease1["ip"] == nics[1]["ip"] and not lease1.get("router"), lease1
        gw1 = str(extra_nets.subnets["a"]).rsplit(".", 1)[0] + ".1"
        assert lease1.get("staticroutes") == f"172.20.0.0/16 {gw1}", lease1  # its own route, no default one
    finally:
        _remove(extra_virtletd, sid)
    assert extra_nets.reservations("a") == [] and extra_nets.reservations("b") == []
    assert extra_nets.ports("a") == [] and extra_nets.ports("b") == []


def test_bad_or_unknown_extra_networks_are_invalid_argument_and_leave_nothing(
        extra_virtletd: VirtletdProcess, extra_nets: ExtraNets, bridge_cni: Path) -> None:
    rt = extra_virtletd.runtime()
    primary = json.loads((bridge_cni / "10-bridge.conflist").read_text())["name"]
    for networks, needle in ((f"{extra_nets.names['a']}, no-such-net", "'no-such-net' not found"),
                             ("Bad_Name", "not a Kubernetes object name"),
                             (f"{extra_nets.names['a']}@eth0", "reserved"),
                             (",".join(["x"] * 9), "at most 8"),
                             (f"other-ns/{extra_nets.names['a']}", "its own namespace"),
                             (json.dumps([{"name": extra_nets.names["a"], "default-route": ["10.0.0.1"]}]),
                              "default-route")):
        with pytest.raises(grpc.RpcError) as exc:
            rt.RunPodSandbox(api.RunPodSandboxRequest(config=_config("bad", networks)), timeout=120)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (networks, exc.value.details())
        assert ANNOTATION in exc.value.details() and needle in exc.value.details(), exc.value.details()
    # a failing ADD of the second extra network: the first extra network and the pod network are DELed again
    with pytest.raises(grpc.RpcError) as exc:
        rt.RunPodSandbox(api.RunPodSandboxRequest(config=_config(
            "half", f"{extra_nets.names['a']},{extra_nets.names['broken']}")), timeout=120)
    assert "far-too-long" in exc.value.details() or extra_nets.names["broken"] in exc.value.details()
    assert list(rt.ListPodSandbox(api.ListPodSandboxRequest()).items) == []
    assert extra_nets.reservations("a") == [] and extra_nets.ports("a") == []
    assert not [p for p in (Path("/var/lib/cni/networks") / primary).glob("*") if p.name[0].isdigit()]


@pytest.mark.parametrize("failpoint", ["sandbox.network.after_cni_add", "sandbox.after_network"])
def test_sigkill_mid_setup_leaves_no_interface_reservation_or_dhcp_server(
        extra_virtletd: VirtletdProcess, extra_nets: ExtraNets, bridge_cni: Path, failpoint: str) -> None:
    daemon = extra_virtletd
    daemon.stop()
    daemon.env = {"VIRTLET_FAILPOINT": failpoint}
    daemon.start()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            daemon.runtime().RunPodSandbox(api.RunPodSandboxRequest(config=_config(
                "killed", f"{extra_nets.names['a']},{extra_nets.names['b']}")), timeout=300)
        except BaseException as exc:  # the kill ends the call
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + 240
    while f"failpoint {failpoint}" not in daemon.log():
        assert time.monotonic() < deadline, f"failpoint {failpoint} not reached:\n{daemon.log()[-3000:]}"
        time.sleep(0.2)
    # mid-setup: both extra networks hold an address and a host-side veth
    assert extra_nets.reservations("a") and extra_nets.reservations("b")
    assert extra_nets.ports("a") and extra_nets.ports("b")
    sid = next(n for n in vnetns.list_names() if len(n) == 32 and n in daemon.log())
    daemon.kill()
    t.join(timeout=30)
    daemon.env = {}
    daemon.start()  # start-up recovery rolls the half-made sandbox back
    assert list(daemon.runtime().ListPodSandbox(api.ListPodSandboxRequest()).items) == []
    assert extra_nets.reservations("a") == [] and extra_nets.reservations("b") == []
    assert extra_nets.ports("a") == [] and extra_nets.ports("b") == []
    primary = json.loads((bridge_cni / "10-bridge.conflist").read_text())["name"]
    assert not [p for p in (Path("/var/lib/cni/networks") / primary).glob("*") if p.name[0].isdigit()]
    assert sid not in vnetns.list_names()
    dhcp = subprocess.run(["pgrep", "-f", "virtlet.network.dhcp_server"], capture_output=True, text=True).stdout
    for pid in dhcp.split():
        cmdline = Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        assert str(daemon.base) not in cmdline, f"DHCP server left: {cmdline}"
    cache = daemon.state_dir / "cni" / "extra"
    assert not list(cache.glob(f"{sid}.*")) if cache.exists() else True


# -- a pod network whose CNI result already has several interfaces (Multus itself as the pod network's plugin) ----
MULTI_PLUGIN = r'''#!/usr/bin/env python3
"""A meta plugin standing in for Multus as the pod network: each of "delegates" is run (Debian's plugins) with its
own CNI_IFNAME and host-local network name; the results are merged into one with several sandbox interfaces."""
import json, os, subprocess, sys
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
if cmd == "VERSION":
    print(json.dumps({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0"]}))
    sys.exit(0)
out = {"cniVersion": conf["cniVersion"], "interfaces": [], "ips": [], "routes": []}
delegates = list(enumerate(conf["delegates"]))
for i, d in (delegates if cmd == "ADD" else reversed(delegates)):
    d = dict(d)
    ifname = d.pop("ifname")
    sub = dict(d, cniVersion=conf["cniVersion"], name=f"{conf['name']}-{ifname}")
    p = subprocess.run(["/usr/lib/cni/" + d["type"]], input=json.dumps(sub), capture_output=True, text=True,
                       env=dict(os.environ, CNI_IFNAME=ifname))
    if p.returncode:
        sys.stdout.write(p.stdout)
        sys.exit(p.returncode)
    if cmd == "ADD":
        r = json.loads(p.stdout)
        base = len(out["interfaces"])
        out["interfaces"] += r.get("interfaces", [])
        out["ips"] += [dict(ip, interface=ip.get("interface", 0) + base) for ip in r.get("ips", [])]
        out["routes"] += r.get("routes", []) if i == 0 else []
if cmd == "ADD":
    print(json.dumps(out))
'''


def test_pod_network_result_with_two_interfaces(world_dir: Path, netns_guard: NetnsGuard) -> None:
    suffix = uuid.uuid4().hex[:8]
    name, bin_dir, conf = f"vxmulti-{suffix}", world_dir / "multi-bin", world_dir / "cni-multi"
    bin_dir.mkdir()
    conf.mkdir()
    (bin_dir / "vx-multi").write_text(MULTI_PLUGIN)
    (bin_dir / "vx-multi").chmod(0o755)
    n = random.randint(1, 250)
    bridges, subnets = [f"vxm0{suffix}", f"vxm1{suffix}"], [f"10.93.{n}.0/24", f"10.92.{n}.0/24"]
    (conf / "10-multi.conf").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": name, "type": "vx-multi", "delegates": [
            {"type": "bridge", "ifname": f"eth{i}", "bridge": bridges[i], "isGateway": True,
             "ipam": {"type": "host-local", "ranges": [[{"subnet": subnets[i]}]], "routes": [{"dst": "0.0.0.0/0"}]}}
            for i in (0, 1)]}))
    try:
        with running_virtletd(world_dir, netns_guard, conf, [
                "--libvirt-uri", "test:///default", "--kvm", "off", "--cni-bin-dir", f"{bin_dir}:{CNI_BIN}"]) as daemon:
            sid = daemon.runtime().RunPodSandbox(api.RunPodSandboxRequest(config=_config("multi", "")),
                                                 timeout=120).pod_sandbox_id
            try:
                nics = _info(daemon, sid)["network"]["nics"]
                assert [(x["veth"], x["bridge"], x["network"]) for x in nics] == [
                    ("eth0", "vmbr0", ""), ("eth1", "vmbr1", "")]
                assert [x["ip"].rsplit(".", 1)[0] for x in nics] == [s.rsplit(".", 1)[0] for s in subnets]
                lease0, lease1 = (_dhcp_lease(sid, nic, world_dir) for nic in nics)
                assert lease0["ip"] == nics[0]["ip"] and lease0.get("router") == nics[0]["gateway"]
                assert lease1["ip"] == nics[1]["ip"] and not lease1.get("router"), lease1  # one default route
            finally:
                _remove(daemon, sid)
            for i in (0, 1):
                leases = Path("/var/lib/cni/networks") / f"{name}-eth{i}"
                assert not [p for p in leases.glob("*") if p.name[0].isdigit()]
                assert os.listdir(f"/sys/class/net/{bridges[i]}/brif") == []
    finally:
        for i in (0, 1):
            _sh("ip", "link", "del", bridges[i], check=False)
            shutil.rmtree(f"/var/lib/cni/networks/{name}-eth{i}", ignore_errors=True)
