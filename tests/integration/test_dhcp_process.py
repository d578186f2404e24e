"""The per-pod DHCP server as a real process in a real network namespace: it stops as soon as it is told."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtlet.network import netns
from virtlet.network.dhcp_process import DhcpProcess
from virtlet.network.dhcp_server import DhcpConfig, NicLease


@pytest.fixture
def pod_netns() -> Iterator[str]:
    name = f"vtdhcp-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.delete(name)


def test_sigterm_stops_the_server_at_once(tmp_path: Path, pod_netns: str) -> None:
    """StopPodSandbox waits for the server to exit while it holds the pod's lock.  The server used to notice
    SIGTERM only when its 5 s select() timed out (Python restarts an interrupted select), so most stops took
    seconds (found by the CRI fuzzer)."""
    config = DhcpConfig(nics=[NicLease(mac="52:54:00:12:34:56", tap="vtdhcptap0", ip="10.97.3.5", prefix=24,
                                       gateway="10.97.3.1", routes=[("0.0.0.0/0", "")], mtu=1500,
                                       server_mac="02:00:00:00:00:01")],
                        dns_servers=[], dns_searches=[], hostname="vm", lease_time=3600)
    (tmp_path / "dhcp.json").write_text(json.dumps(config.to_dict()))
    server = DhcpProcess(tmp_path, str(netns.path(pod_netns)))
    pid = server.start()
    try:
        time.sleep(0.5)  # inside its select() now
        start = time.monotonic()
        server.stop()
        took = time.monotonic() - start
    finally:
        server.stop(timeout=1)
    assert server.pid() is None, f"DHCP server {pid} still runs"
    assert took < 2.0, f"the DHCP server took {took:.1f}s to stop"
