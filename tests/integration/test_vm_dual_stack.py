"""A VM pod on a dual-stack CNI bridge network (host-local for both families), booted from the `full` Debian guest
with real cloud-init: the guest holds the pod's IPv6 address (no DAD failure: the pod veth gave it up), has the
IPv6 default route via the network's v6 gateway (from network-config), and answers on its IPv6 pod address."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import bridge_network, guest_image
from tests.integration.test_full_image import FULL_BOOT_TIMEOUT
from tests.integration.test_vm_lifecycle import Pod, _pull
from tests.integration.test_vm_network import pod_ip, ssh, wait_ssh
from tests.integration.test_vm_network import ssh_key as ssh_key
from virtlet.cri.gen import api_pb2 as api

pytestmark = [pytest.mark.slow, pytest.mark.libvirt, pytest.mark.network]


@pytest.fixture
def bridge_cni(world_dir: Path) -> Iterator[Path]:
    """Overrides conftest's: the same test-unique bridge network, dual-stack, with a v6 default route."""
    n = random.randint(1, 250)
    with bridge_network(world_dir, "vds", f"10.97.{n}.0/24", f"fd97:{random.randint(1, 0xffff):x}:{n:x}::/64") as conf:
        yield conf


def test_dual_stack_vm_pod(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any,
                           ssh_key: tuple[Path, str]) -> None:
    shutil.copy(guest_image("full"), image_server.root / "full.qcow2")
    name = image_server.name("files/full.qcow2")
    _pull(vm_virtletd, name)
    user_data = {"users": [{"name": "root", "ssh-authorized-keys": [ssh_key[1]]}],
                 "runcmd": ["echo DUAL-STACK-UP"]}
    pod = Pod(vm_virtletd, world_dir, "ds-vm", image=name, memory=1 << 30, annotations={
        "VirtletVCPUCount": "2", "VirtletCloudInitUserData": json.dumps(user_data)})
    pod.run_sandbox()
    status = pod.rt.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=pod.sandbox_id)).status
    (ip6,) = [a.ip for a in status.network.additional_ips]
    info = json.loads(pod.rt.PodSandboxStatus(api.PodSandboxStatusRequest(
        pod_sandbox_id=pod.sandbox_id, verbose=True)).info["info"])
    gw6 = info["network"]["nics"][0].get("ipv6_gateway") or "(no v6 gateway kept)"
    pod.create()
    pod.start()
    pod.wait_log("DUAL-STACK-UP", timeout=FULL_BOOT_TIMEOUT)
    ip4 = pod_ip(pod)
    wait_ssh(ssh_key[0], ip4, timeout=180)
    addrs = ssh(ssh_key[0], ip4, "ip -6 addr show scope global")
    assert f"{ip6}/" in addrs and "dadfailed" not in addrs and "tentative" not in addrs, addrs
    route = ssh(ssh_key[0], ip4, "ip -6 route show default")
    assert f"via {gw6}" in route, f"the guest's v6 default route is {route!r}, not via {gw6}"
    # the host (the CNI bridge holds the v6 gateway) reaches the VM on its IPv6 pod address
    subprocess.run(["busybox", "ping", "-6", "-c", "2", "-W", "10", ip6], check=True, capture_output=True)
    pod.stop_and_remove()
