"""plumbing.session(): one netlink socket per namespace for a run of plumbing calls (RunPodSandbox, StartContainer
and StopPodSandbox use one), with the same results as a socket per call, in a real network namespace."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from virtlet.network import netns, plumbing


@pytest.fixture
def pod_ns() -> Iterator[str]:
    name = f"vtsess-{uuid.uuid4().hex[:8]}"
    netns.create(name)
    try:
        yield str(netns.path(name))
    finally:
        netns.delete(name)


def test_session_reuses_and_closes_sockets(pod_ns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Any] = []
    real_open = plumbing._open

    def counting_open(ns: str | None) -> Any:
        sock = real_open(ns)
        opened.append(sock)
        return sock

    monkeypatch.setattr(plumbing, "_open", counting_open)
    tap = f"vts{uuid.uuid4().hex[:8]}"
    try:
        with plumbing.session():
            plumbing.ensure_bridge("vmbr0", pod_ns, mtu=1400)
            plumbing.ensure_tap(tap)
            plumbing.set_link(tap, mtu=1400)
            plumbing.move_to_netns(tap, pod_ns)
            plumbing.set_link(tap, pod_ns, master="vmbr0", up=True)
            with plumbing.session():  # nested: the outer session's sockets
                info = plumbing.link_info(tap, pod_ns)
            assert info["master"] == plumbing.link_index("vmbr0", pod_ns) and info["mtu"] == 1400
            assert not plumbing.link_exists(tap)  # moved out of the host namespace
        assert len(opened) == 2  # one for the host, one for the pod namespace
        # closed at the end of the session; calls after it open their own sockets again
        assert plumbing.link_info(tap, pod_ns)["mtu"] == 1400
        assert len(opened) == 3
    finally:
        plumbing.delete_link(tap)
        plumbing.delete_link(tap, pod_ns)


def test_session_sees_a_namespace_deleted_under_it(pod_ns: str) -> None:
    other = f"vtsess-{uuid.uuid4().hex[:8]}"
    netns.create(other)
    path = str(netns.path(other))
    try:
        with plumbing.session():
            assert plumbing.list_links("lo", path) == ["lo"]
            netns.delete(other)
            with pytest.raises(plumbing.NetnsNotFound):
                plumbing.link_exists("lo", path)
    finally:
        netns.delete(other)
