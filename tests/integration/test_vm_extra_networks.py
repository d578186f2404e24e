"""A real VM pod (QEMU under TCG, the tiny guest) on two bridges: the pod network and one extra network from the
``k8s.v1.cni.cncf.io/networks`` annotation.  The guest gets one address on each NIC by DHCP from the per-pod server,
reaches a peer on each bridge, and has its default route via the pod network only; after removal no reservation
and no bridge port is left."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import NetnsGuard, qemu_virtletd
from tests.integration.test_extra_networks import ANNOTATION, ExtraNets, _sh, extra_nets  # noqa: F401 (fixture)
from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull
from tests.integration.test_vm_network import ssh, ssh_key, wait_ssh  # noqa: F401 (fixture)
from virtlet.cri.gen import api_pb2 as api
from virtlet.network import netns as vnetns

pytestmark = [pytest.mark.libvirt, pytest.mark.network]


@pytest.fixture
def extra_vm_virtletd(world_dir: Path, bridge_cni: Path, extra_nets: ExtraNets, netns_guard: NetnsGuard,  # noqa: F811
                      libvirt_daemons: None) -> Iterator[VirtletdProcess]:
    with qemu_virtletd(world_dir, netns_guard, bridge_cni, ["--cni-extra-conf-dir", str(extra_nets.conf)]) as daemon:
        yield daemon


@pytest.fixture
def peers() -> Iterator[list[str]]:
    """Network namespaces standing in for other hosts on a bridge (``add_peer``); removed afterwards."""
    made: list[str] = []
    yield made
    for ns in made:
        vnetns.delete(ns)


def add_peer(made: list[str], bridge: str, cidr: str) -> None:
    ns = f"vxpeer{uuid.uuid4().hex[:10]}"
    outer, inner = f"vo{ns[6:16]}", f"vi{ns[6:16]}"
    vnetns.create(ns)
    made.append(ns)
    _sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
    _sh("ip", "link", "set", inner, "netns", ns)
    _sh("ip", "link", "set", outer, "master", bridge, "up")
    _sh("ip", "-n", ns, "link", "set", inner, "up")
    _sh("ip", "-n", ns, "addr", "add", cidr, "dev", inner)  # deleting the netns deletes the pair


def _nics(pod: Pod) -> list[dict[str, Any]]:
    status = pod.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id, verbose=True))
    nics: list[dict[str, Any]] = json.loads(status.info["info"])["network"]["nics"]
    return nics


def test_vm_pod_on_two_bridges(extra_vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                               tiny_image: Path, ssh_key: tuple[Path, str], bridge_cni: Path,  # noqa: F811
                               extra_nets: ExtraNets, peers: list[str]) -> None:  # noqa: F811
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    name = image_server.name("files/tiny.qcow2")
    _pull(extra_vm_virtletd, name)
    key, pub = ssh_key
    pod = Pod(extra_vm_virtletd, world_dir, "vm-two-nets", image=name,
              annotations={"VirtletSSHKeys": pub, ANNOTATION: extra_nets.names["a"]})
    primary = json.loads((bridge_cni / "10-bridge.conflist").read_text())
    primary_bridge = primary["plugins"][0]["bridge"]
    primary_prefix = primary["plugins"][0]["ipam"]["ranges"][0][0]["subnet"].rsplit(".", 1)[0]
    extra_prefix = extra_nets.subnets["a"].rsplit(".", 1)[0]
    try:
        pod.run_sandbox()
        nic0, nic1 = _nics(pod)
        assert nic1["network"] == extra_nets.names["a"] and nic1["ip"].startswith(extra_prefix + ".")
        add_peer(peers, primary_bridge, f"{primary_prefix}.250/24")
        add_peer(peers, extra_nets.bridges["a"], f"{extra_prefix}.250/24")
        pod.create()
        pod.start()
        marker = pod.wait_log(MARKER)
        assert f"ip={nic0['ip']}/" in marker, marker
        lines = "\n".join(pod.log_lines())
        assert f" {nic1['ip']}/" in lines and "dhcp eth1" in lines, lines[-3000:]  # eth1 by DHCP, its own address
        wait_ssh(key, nic0["ip"])
        addrs = ssh(key, nic0["ip"], "ip -4 -o addr show scope global")
        assert f"{nic0['ip']}/24" in addrs and f"{nic1['ip']}/24" in addrs, addrs
        # one default route, via the pod network's gateway, on the NIC with the pod network's MAC
        routes = ssh(key, nic0["ip"], "ip route").strip().splitlines()  # busybox ip has no "show default"
        default = [r for r in routes if r.startswith("default")]
        assert any(r.startswith("172.20.0.0/16 via ") and " dev eth1" in r for r in routes), routes  # its own route
        assert len(default) == 1 and default[0].startswith(f"default via {nic0['gateway']} dev "), default
        dev = default[0].split(" dev ")[1].split()[0]
        assert ssh(key, nic0["ip"], f"cat /sys/class/net/{dev}/address").strip() == nic0["mac"]
        # a peer on each bridge, reached from the guest, each through its own NIC
        for peer in (f"{primary_prefix}.250", f"{extra_prefix}.250"):
            assert " 0% packet loss" in ssh(key, nic0["ip"], f"ping -c 2 -W 5 {peer}"), peer
        # and the extra network's peer reaches the VM's address on that network
        _sh("ip", "netns", "exec", peers[1], "busybox", "ping", "-c", "2", "-W", "5", nic1["ip"])
    finally:
        pod.stop_and_remove()
    assert extra_nets.reservations("a") == []
    assert [p for p in extra_nets.ports("a") if not p.startswith("vo")] == []  # "vo...": the peer's, not the pod's
