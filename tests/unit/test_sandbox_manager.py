"""SandboxManager's state machine (run, stop, remove, roll back, start-up recovery, and every crash window of
``virtlet.failpoints``) through the real manager and store, with the VM manager beside it, over the shared fake
libvirt and fake pod network (netns, CNI, DHCP, taps).  Runs in milliseconds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.node import Node, node
from virtlet import errors
from virtlet.state import store as st


@pytest.fixture
def n(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    with node(tmp_path, monkeypatch) as world:
        yield world


def _sandbox_state(n: Node, sid: str) -> str | None:
    rec = n.d.store.get_sandbox(sid)
    return rec.state if rec is not None else None


def test_run_makes_netns_then_network(n: Node) -> None:
    sid = n.run_sandbox()
    rec = n.d.store.require_sandbox(sid)
    assert rec.state == st.SANDBOX_READY and rec.network is not None and rec.network.nics[0].tap
    assert n.net.log.of(sid) == ["netns.create", "setup"]
    assert n.net.leftovers() == {"netns": {sid}, "cni": {sid}, "dhcp": {sid}}


def test_run_validates_and_refuses_a_reserved_name(n: Node) -> None:
    spec = n.sandbox_spec()
    with pytest.raises(errors.InvalidArgument, match="runtime handler"):
        n.d.sandboxes.run(spec.__class__(**{**spec.__dict__, "runtime_handler": "runc"}))
    with pytest.raises(errors.InvalidArgument, match="metadata.uid"):
        n.d.sandboxes.run(spec.__class__(**{**spec.__dict__, "uid": ""}))
    n.d.sandboxes.run(spec)
    with pytest.raises(errors.AlreadyExists):
        n.d.sandboxes.run(spec)


def test_run_with_a_failing_cni_rolls_back(n: Node) -> None:
    n.net.fail["setup"] = errors.Internal("CNI ADD failed")
    with pytest.raises(errors.Internal):
        n.run_sandbox()
    assert n.leftovers() == {}


def test_rollback_keeps_the_record_when_teardown_fails_and_recovery_retries(n: Node) -> None:
    n.net.fail["setup"] = errors.Internal("CNI ADD failed")
    n.net.fail["teardown"] = errors.Internal("CNI DEL failed")
    with pytest.raises(errors.Internal, match="ADD"):
        n.run_sandbox()
    [rec] = n.d.store.list_sandboxes()
    assert rec.state == st.SANDBOX_CREATING and n.net.netns.names == set()
    del n.net.fail["setup"], n.net.fail["teardown"]
    n.restart()
    assert n.leftovers() == {}


def test_stop_stops_vms_then_tears_down_network_then_netns(n: Node) -> None:
    sid, cid = n.running_container()
    n.d.sandboxes.stop(sid)
    assert _sandbox_state(n, sid) == st.SANDBOX_NOTREADY
    assert n.d.store.require_container(cid).state == st.CONTAINER_EXITED
    steps = n.net.log.of(sid)
    assert steps[steps.index("after_start") + 1:] == ["teardown", "netns.delete"]
    assert "destroy" in n.domain(cid).calls or "shutdown" in n.domain(cid).calls
    n.d.sandboxes.stop(sid)  # repeated: no second CNI DEL
    assert n.net.log.of(sid).count("teardown") == 1
    n.d.sandboxes.stop("unknown")
    n.d.remove_sandbox(sid)
    assert n.leftovers() == {}


def test_stop_with_a_failing_cni_del_fails_and_is_retried(n: Node) -> None:
    sid = n.run_sandbox()
    n.net.fail["teardown"] = errors.Internal("CNI DEL failed")
    with pytest.raises(errors.Internal):
        n.d.sandboxes.stop(sid)
    assert n.net.netns.exists(sid) and not n.d.store.require_sandbox(sid).network_torn_down
    del n.net.fail["teardown"]
    n.d.sandboxes.stop(sid)
    assert _sandbox_state(n, sid) == st.SANDBOX_NOTREADY and n.net.leftovers() == {}
    n.d.remove_sandbox(sid)


def test_remove_removes_containers_then_the_record(n: Node) -> None:
    sid, cid = n.running_container()
    n.d.remove_sandbox(sid)
    assert n.leftovers() == {}
    n.d.remove_sandbox(sid)  # idempotent


def test_recovery_reattaches_a_ready_sandbox_and_marks_one_without_netns(n: Node) -> None:
    ready = n.run_sandbox("a")
    lost = n.run_sandbox("b")

    def host_lost_state() -> None:
        n.net.dhcp.clear()  # DHCP servers live in the virtletd process
        n.net.netns.names.discard(lost)  # e.g. a reboot

    n.restart(host_lost_state)
    assert _sandbox_state(n, ready) == st.SANDBOX_READY and n.net.dhcp == {ready}
    assert _sandbox_state(n, lost) == st.SANDBOX_NOTREADY
    n.d.remove_sandbox(ready)
    n.d.remove_sandbox(lost)
    assert n.leftovers() == {}


@pytest.mark.parametrize("failpoint", ["sandbox.run.after_record", "sandbox.after_netns", "sandbox.after_network"])
def test_run_killed_is_rolled_back(n: Node, failpoint: str) -> None:
    n.kill_at(failpoint, lambda: n.run_sandbox())
    assert n.leftovers() == {}
    sid = n.run_sandbox()  # the kubelet's retry (same name and attempt: nothing reserved it)
    n.d.remove_sandbox(sid)


@pytest.mark.parametrize(("failpoint", "state", "left"), [
    # VMs stopped, network up: the sandbox stays READY (DHCP again), the retry stops it.  (StopContainer leaves
    # the stopped VM's taps for the network teardown, as without a crash.)
    ("sandbox.stop.after_containers", st.SANDBOX_READY, {"netns", "cni", "dhcp", "taps"}),
    # CNI DEL done: recovery finishes the stop
    ("sandbox.stop.after_network", st.SANDBOX_NOTREADY, set()),
    # netns gone, record READY and torn down: recovery finishes the stop
    ("sandbox.stop.after_netns", st.SANDBOX_NOTREADY, set())])
def test_stop_killed(n: Node, failpoint: str, state: str, left: set[str]) -> None:
    sid, cid = n.running_container()
    n.kill_at(failpoint, lambda: n.d.sandboxes.stop(sid))
    assert _sandbox_state(n, sid) == state
    assert set(n.net.leftovers()) == left
    assert n.d.store.require_container(cid).state == st.CONTAINER_EXITED
    n.d.sandboxes.stop(sid)  # the kubelet's retry
    assert _sandbox_state(n, sid) == st.SANDBOX_NOTREADY and n.net.leftovers() == {}
    n.d.remove_sandbox(sid)
    assert n.leftovers() == {}


@pytest.mark.parametrize("failpoint", ["sandbox.remove.after_stop", "sandbox.remove.after_containers"])
def test_remove_killed(n: Node, failpoint: str) -> None:
    sid, cid = n.running_container()
    n.kill_at(failpoint, lambda: n.d.remove_sandbox(sid))
    assert _sandbox_state(n, sid) == st.SANDBOX_NOTREADY and n.net.leftovers() == {}
    assert (n.d.store.get_container(cid) is None) == (failpoint == "sandbox.remove.after_containers")
    n.d.remove_sandbox(sid)  # the kubelet's retry
    assert n.leftovers() == {}
