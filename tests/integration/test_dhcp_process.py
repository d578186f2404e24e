"""The per-pod DHCP server as a real process in a real network namespace: it stops as soon as it is told."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtlet import procs
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


def _config(tmp_path: Path) -> None:
    config = DhcpConfig(nics=[NicLease(mac="52:54:00:12:34:57", tap="vtdhcptap1", ip="10.97.4.5", prefix=24,
                                       gateway="10.97.4.1", routes=[], mtu=1500, server_mac="02:00:00:00:00:01")],
                        dns_servers=[], dns_searches=[], hostname="vm", lease_time=3600)
    (tmp_path / "dhcp.json").write_text(json.dumps(config.to_dict()))


def _running(pid: int) -> bool:
    return procs.running(pid)


def test_unwaited_start_is_waited_for_by_the_next_start(tmp_path: Path, pod_netns: str) -> None:
    """RunPodSandbox spawns the server without waiting; StartContainer's start() waits for that same process
    (no second server) and returns once its pid file is written."""
    _config(tmp_path)
    server = DhcpProcess(tmp_path, str(netns.path(pod_netns)))
    try:
        spawned = server.start(wait=False)
        assert server.start() == spawned
        assert server.pid() == spawned and (tmp_path / "dhcp.pid").read_text().strip() == str(spawned)
    finally:
        server.stop(timeout=1)
    assert not _running(spawned)


def test_stop_right_after_unwaited_start_leaves_no_server(tmp_path: Path, pod_netns: str) -> None:
    """A sandbox rolled back (or stopped) before its server wrote its pid file: the server still goes."""
    _config(tmp_path)
    server = DhcpProcess(tmp_path, str(netns.path(pod_netns)))
    spawned = server.start(wait=False)
    server.stop(timeout=5)
    assert not _running(spawned)
    assert server.pid() is None and not (tmp_path / "dhcp.pid").exists()


def test_start_replaces_an_unwaited_server_that_died(tmp_path: Path, pod_netns: str) -> None:
    _config(tmp_path)
    server = DhcpProcess(tmp_path, str(netns.path(pod_netns)))
    spawned = server.start(wait=False)
    os.kill(spawned, signal.SIGKILL)
    DhcpProcess._children[str(server.config)].wait(10)  # dead (and reaped) before the next start
    try:
        again = server.start()
        assert again != spawned and server.pid() == again
    finally:
        server.stop(timeout=1)


def test_stop_by_a_new_virtletd_finds_the_server(tmp_path: Path, pod_netns: str) -> None:
    """After a virtletd restart the server is not our child: found by its pid file (or its command line) and
    its exit awaited on a pidfd."""
    _config(tmp_path)
    server = DhcpProcess(tmp_path, str(netns.path(pod_netns)))
    pid = server.start()
    child = DhcpProcess._children.pop(str(server.config))  # as if spawned by an earlier virtletd
    try:
        (tmp_path / "dhcp.pid").unlink()  # killed before the server wrote it: found by command line
        DhcpProcess(tmp_path, str(netns.path(pod_netns))).stop(timeout=5)
        assert child.wait(5) is not None
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not _running(pid)


def test_stopping_signals_first_and_awaits_the_exit_at_the_end(tmp_path: Path, pod_netns: str) -> None:
    """StopPodSandbox overlaps the server's exit with its CNI DEL: SIGTERM when the block begins, the exit
    awaited (and the pid file gone) when it ends, also when the block fails."""
    _config(tmp_path)
    server = DhcpProcess(tmp_path, str(netns.path(pod_netns)))
    pid = server.start()
    try:
        with pytest.raises(RuntimeError), server.stopping(timeout=5):
            deadline = time.monotonic() + 5
            while _running(pid) and time.monotonic() < deadline:  # it exits while the block still runs
                time.sleep(0.01)
            assert not _running(pid), "the server got no SIGTERM when the block began"
            raise RuntimeError("CNI DEL failed")
        assert server.pid() is None and not (tmp_path / "dhcp.pid").exists()
        assert str(server.config) not in DhcpProcess._children  # reaped
    finally:
        server.stop(timeout=1)


def test_a_server_ignoring_sigterm_is_killed_after_the_timeout(tmp_path: Path, pod_netns: str) -> None:
    _config(tmp_path)
    server = DhcpProcess(tmp_path, str(netns.path(pod_netns)))
    pid = server.start()
    try:
        # what a server stuck before its handler runs looks like: SIGTERM ignored
        os.kill(pid, signal.SIGSTOP)
        start = time.monotonic()
        server.stop(timeout=0.5)
        assert time.monotonic() - start < 3
        assert not _running(pid)
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)
