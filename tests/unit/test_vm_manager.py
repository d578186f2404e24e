"""VmManager's state machine (create, start, stop, remove, exit events, start-up recovery, and every crash window
of ``virtlet.failpoints``) through the real manager, store and ``vm/guest.py`` wrapper, over the shared fake
libvirt and fake pod network.  Runs in milliseconds; the real-process crash matrix is
``tests/integration/test_crash_matrix.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.fakes.libvirt import FakeLibvirtError
from tests.fakes.node import Node, node
from virtlet import errors
from virtlet.console import writer as console_writer
from virtlet.state import store as st


@pytest.fixture
def n(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    with node(tmp_path, monkeypatch) as world:
        yield world


def _state(n: Node, cid: str) -> tuple[str, int, str, str]:
    rec = n.d.store.require_container(cid)
    return rec.state, rec.exit_code, rec.reason, rec.message


def _clean_up(n: Node, *sids: str) -> None:
    for sid in sids:
        n.d.remove_sandbox(sid)
    assert n.leftovers() == {}


# -- CreateContainer ------------------------------------------------------------------------------------------
def test_create_defines_the_domain_and_completes_the_record(n: Node) -> None:
    sid = n.run_sandbox()
    rec = n.d.vms.create(n.container_spec(sid))
    assert rec.state == st.CONTAINER_CREATED and "creating" not in rec.extra
    assert n.domain(rec.id) is not None and not n.domain(rec.id).isActive()
    assert (n.d.vms.container_dir(rec.id) / "root.qcow2").exists()
    _clean_up(n, sid)


def test_raw_console_has_a_directory_of_its_own(tmp_path: Path) -> None:
    """CreateContainer makes ``<dir>/console/`` for virtlogd's RAW (``tests/integration/test_vm_lifecycle.py`` sees
    a real VM's there): the log writer's inotify watch on it must not hear QEMU writing the root overlay."""
    (tmp_path / "console").mkdir()
    (tmp_path / "root.qcow2").write_bytes(b"")
    assert console_writer.raw_path(tmp_path) == tmp_path / "console" / "console.raw"


def test_raw_console_of_a_container_from_before_its_directory(tmp_path: Path) -> None:
    (tmp_path / "console.raw").write_bytes(b"old layout\n")  # what earlier versions made, no console/
    assert console_writer.raw_path(tmp_path) == tmp_path / "console.raw"


def test_create_refused_by_libvirt_leaves_nothing(n: Node) -> None:
    sid = n.run_sandbox()
    n.conn.fail["defineXML"] = FakeLibvirtError("XML error: bad domain")
    with pytest.raises(errors.Internal, match="libvirt refused the domain definition"):
        n.d.vms.create(n.container_spec(sid))
    assert n.d.store.list_containers() == [] and n.conn.domains == {}
    assert list((n.tmp / "state" / "containers").iterdir()) == []
    del n.conn.fail["defineXML"]
    _clean_up(n, sid)


def test_create_needs_a_ready_sandbox_and_a_pulled_image(n: Node) -> None:
    sid = n.run_sandbox()
    with pytest.raises(errors.NotFound, match="PullImage"):
        n.d.vms.create(n.container_spec(sid).__class__(sandbox_id=sid, name="vm", attempt=0, image="nope"))
    n.d.sandboxes.stop(sid)
    with pytest.raises(errors.FailedPrecondition, match="only a READY sandbox"):
        n.d.vms.create(n.container_spec(sid))
    _clean_up(n, sid)


def test_create_replaces_a_container_never_started(n: Node) -> None:
    sid = n.run_sandbox()
    first = n.d.vms.create(n.container_spec(sid)).id
    second = n.d.vms.create(n.container_spec(sid)).id
    assert [c.id for c in n.d.store.list_containers()] == [second]
    assert n.domain(first) is None
    _clean_up(n, sid)


def test_a_refused_create_keeps_the_container_never_started(n: Node) -> None:
    """The replacement happens only for a request that can be made: a bad annotation (found by the CRI fuzzer)
    must not cost the pod its container."""
    sid = n.run_sandbox()
    first = n.d.vms.create(n.container_spec(sid)).id
    bad = dataclasses.replace(n.container_spec(sid), annotations={"fake/invalid": "x"})
    with pytest.raises(errors.InvalidArgument, match="fake/invalid"):
        n.d.vms.create(bad)
    assert [c.id for c in n.d.store.list_containers()] == [first] and n.domain(first) is not None
    _clean_up(n, sid)


def test_a_new_attempt_undefines_the_exited_domain_first(n: Node) -> None:
    sid, first = n.running_container()
    n.domain(first).crash()
    n.wait_exit_handlers()
    second = n.d.vms.create(n.container_spec(sid, attempt=1)).id
    assert n.domain(first) is None and n.domain(second) is not None
    assert _state(n, first)[0] == st.CONTAINER_EXITED  # its record stays until the kubelet removes it
    _clean_up(n, sid)


# -- StartContainer -------------------------------------------------------------------------------------------
def test_start_runs_the_vm_on_the_pod_network_with_its_log(n: Node) -> None:
    sid, cid = n.running_container()
    assert _state(n, cid)[0] == st.CONTAINER_RUNNING and n.domain(cid).isActive()
    assert n.net.taps == {sid: "pod"}
    assert n.parts.running_writers() == [n.log_dir / "pod" / "vm/0.log"]
    assert n.net.log.of(sid)[-3:] == ["prepare", "taps_before_start", "after_start"]
    n.d.vms.start(cid)  # a retried StartContainer of a running container succeeds
    _clean_up(n, sid)


def test_start_refused_by_libvirt_is_exited_with_start_error(n: Node) -> None:
    sid = n.run_sandbox()
    cid = n.d.vms.create(n.container_spec(sid)).id
    n.domain(cid).fail["create"] = FakeLibvirtError("internal error: qemu unexpectedly closed the monitor")
    with pytest.raises(errors.Internal, match="qemu unexpectedly closed the monitor"):
        n.d.vms.start(cid)
    state, code, reason, message = _state(n, cid)
    assert (state, code, reason) == (st.CONTAINER_EXITED, 1, "StartError")
    assert message == "libvirt could not start the VM: internal error: qemu unexpectedly closed the monitor"
    assert n.net.taps == {} and n.parts.running_writers() == []
    _clean_up(n, sid)


def test_start_of_a_container_whose_domain_is_gone(n: Node) -> None:
    sid = n.run_sandbox()
    cid = n.d.vms.create(n.container_spec(sid)).id
    n.conn.domains.clear()
    with pytest.raises(errors.FailedPrecondition, match="domain is gone"):
        n.d.vms.start(cid)
    _clean_up(n, sid)


# -- StopContainer ------------------------------------------------------------------------------------------
def test_stop_by_acpi(n: Node) -> None:
    sid, cid = n.running_container()
    n.d.vms.stop(cid, 10)
    assert _state(n, cid) == (st.CONTAINER_EXITED, 0, "Completed", "stopped by StopContainer")
    assert n.domain(cid).calls.count("shutdown") == 1 and "destroy" not in n.domain(cid).calls
    n.wait_exit_handlers()
    assert _state(n, cid)[3] == "stopped by StopContainer"  # the stop event does not overwrite it
    _clean_up(n, sid)


def test_stop_destroys_a_guest_that_ignores_acpi(n: Node) -> None:
    sid, cid = n.running_container()
    n.domain(cid).acpi_ignored = True
    n.d.vms.stop(cid, 0)
    code, reason, message = _state(n, cid)[1:]
    assert (code, reason) == (137, "Error") and "grace period of 0s" in message and "destroyed" in message
    assert "destroy" in n.domain(cid).calls and not n.domain(cid).isActive()
    _clean_up(n, sid)


def test_stop_when_acpi_is_refused_destroys(n: Node) -> None:
    sid, cid = n.running_container()
    n.domain(cid).fail["shutdown"] = FakeLibvirtError("Operation not supported: no ACPI",
                                                      libvirt.VIR_ERR_OPERATION_UNSUPPORTED)
    n.d.vms.stop(cid, 0)
    assert _state(n, cid)[0] == st.CONTAINER_EXITED and not n.domain(cid).isActive()
    _clean_up(n, sid)


def test_stop_of_a_created_container_and_repeated_stop(n: Node) -> None:
    sid = n.run_sandbox()
    cid = n.d.vms.create(n.container_spec(sid)).id
    n.d.vms.stop(cid, 0)
    assert _state(n, cid) == (st.CONTAINER_EXITED, 0, "Completed", "never started")
    n.d.vms.stop(cid, 0)
    n.d.vms.stop("no-such-id", 0)
    _clean_up(n, sid)


# -- exits without a StopContainer -----------------------------------------------------------------------------
def test_guest_power_off_is_completed(n: Node) -> None:
    sid, cid = n.running_container()
    n.domain(cid).power_off()
    n.wait_exit_handlers()
    assert _state(n, cid) == (st.CONTAINER_EXITED, 0, "Completed", "the guest powered off")
    assert n.net.taps == {} and n.parts.running_writers() == []
    _clean_up(n, sid)


def test_qemu_killed_is_an_error_with_libvirts_reason(n: Node) -> None:
    sid, cid = n.running_container()
    n.domain(cid).crash()
    n.wait_exit_handlers()
    state, code, reason, message = _state(n, cid)
    assert (state, code, reason) == (st.CONTAINER_EXITED, 1, "Error")
    assert message == "the VM stopped: QEMU process ended unexpectedly (killed or crashed)"
    assert n.net.taps == {}
    _clean_up(n, sid)


# -- RemoveContainer ------------------------------------------------------------------------------------------
def test_remove_a_running_container(n: Node) -> None:
    sid, cid = n.running_container()
    n.d.vms.remove(cid)
    assert n.d.store.get_container(cid) is None and n.domain(cid) is None and n.net.taps == {}
    assert not n.d.vms.container_dir(cid).exists()
    n.d.vms.remove(cid)  # idempotent
    _clean_up(n, sid)


def test_remove_on_a_driver_without_undefine_flags(n: Node) -> None:
    n.conn.undefine_flags_supported = False
    sid, cid = n.running_container()
    n.d.vms.remove(cid)
    assert n.domain(cid) is None
    assert n.conn.domains == {}
    _clean_up(n, sid)


def test_remove_fails_when_libvirt_cannot_undefine(n: Node) -> None:
    sid, cid = n.running_container()
    n.domain(cid).fail["undefineFlags"] = FakeLibvirtError("internal error: cannot delete nvram")
    with pytest.raises(errors.Internal, match="cannot delete nvram"):
        n.d.vms.remove(cid)
    assert n.d.store.get_container(cid) is not None  # the record stays: the kubelet's retry removes it
    del n.domain(cid).fail["undefineFlags"]
    _clean_up(n, sid)


def test_queries(n: Node) -> None:
    sid, cid = n.running_container()
    assert "<virtlet:overlay>" in n.d.vms.domain_xml(cid)
    assert n.d.vms.domain_xml("none") == ""
    n.d.vms.reopen_log(cid)
    assert n.parts.writers[-1].reopened == 1
    n.d.vms.guest_agent(cid)  # a running VM has an agent transport
    n.d.vms.stop(cid, 0)
    with pytest.raises(errors.FailedPrecondition, match="not running"):
        n.d.vms.guest_agent(cid)
    with pytest.raises(errors.FailedPrecondition, match="only a running VM"):
        n.d.vms.reopen_log(cid)
    _clean_up(n, sid)


def test_update_resources_applies_live_or_refuses(n: Node) -> None:
    from virtlet.vm.manager import ResourceUpdate

    sid, cid = n.running_container()
    max_bytes = 256 << 20  # the VM's size at create (what VmParts.prepare records)
    n.d.store.update_container(cid, extra={**n.d.store.get_container(cid).extra, "memory_bytes": max_bytes})
    with pytest.raises(errors.InvalidArgument, match="memory_limit_in_bytes"):
        n.d.vms.update_resources(cid, ResourceUpdate(memory_limit_bytes=max_bytes + 1))
    assert "setMemoryFlags" not in n.domain(cid).calls
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
    n.d.vms.update_resources(cid, ResourceUpdate(memory_limit_bytes=max_bytes // 2))
    assert n.domain(cid).memory_set == (max_bytes // 2048, live)
    n.domain(cid).fail["setSchedulerParametersFlags"] = FakeLibvirtError("cgroup CPU controller is not mounted")
    with pytest.raises(errors.FailedPrecondition, match="applied before it: memory"):
        n.d.vms.update_resources(cid, ResourceUpdate(memory_limit_bytes=max_bytes, cpu_shares=512))
    assert n.d.store.get_container(cid).extra["resources"] == {"memory_limit_in_bytes": max_bytes}
    del n.domain(cid).fail["setSchedulerParametersFlags"]
    in_force = n.d.vms.update_resources(cid, ResourceUpdate(cpu_shares=512, cpu_quota=-1))
    assert in_force == {"memory_limit_in_bytes": max_bytes, "cpu_shares": 512, "cpu_quota": -1, "cpu_period": 0}
    assert [p for p, _ in n.domain(cid).sched_set][-1] == {"cpu_shares": 512, "global_quota": -1}
    n.d.vms.stop(cid, 10)
    with pytest.raises(errors.FailedPrecondition, match="EXITED"):
        n.d.vms.update_resources(cid, ResourceUpdate(cpu_shares=2))
    _clean_up(n, sid)


def test_update_resources_pins_every_vcpu_and_the_emulator(n: Node) -> None:
    """cpuset_cpus (the kubelet's static CPU manager): every vCPU up to the maximum and QEMU's emulator threads,
    live and in the definition; a list the node cannot have is refused before anything changes."""
    from virtlet.vm.manager import ResourceUpdate

    sid, cid = n.running_container()
    n.d.store.update_container(cid, extra={**n.d.store.get_container(cid).extra, "vcpus": 1, "max_vcpus": 2})
    n.d.vms.parts.host_cpus = 4
    with pytest.raises(errors.InvalidArgument, match=r"cpuset_cpus.*from 0 to 3"):
        n.d.vms.update_resources(cid, ResourceUpdate(memory_limit_bytes=64 << 20, cpuset_cpus="2-4"))
    assert "setMemoryFlags" not in n.domain(cid).calls and "pinVcpuFlags" not in n.domain(cid).calls
    live = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
    in_force = n.d.vms.update_resources(cid, ResourceUpdate(cpuset_cpus="1, 3"))
    expected = ((False, True, False, True), live)
    assert n.domain(cid).vcpus_pinned == {0: expected, 1: expected} and n.domain(cid).emulator_pinned == expected
    assert in_force["cpuset_cpus"] == "1,3"
    calls = len(n.domain(cid).calls)
    n.d.vms.update_resources(cid, ResourceUpdate(cpuset_cpus="1,3"))  # the same list again: nothing to do
    assert "pinVcpuFlags" not in n.domain(cid).calls[calls:]
    n.domain(cid).fail["pinEmulator"] = FakeLibvirtError("cgroup cpuset controller is not mounted")
    with pytest.raises(errors.FailedPrecondition, match="cpuset controller.*applied before it: memory"):
        n.d.vms.update_resources(cid, ResourceUpdate(memory_limit_bytes=64 << 20, cpuset_cpus="0"))
    assert n.d.store.get_container(cid).extra["resources"]["cpuset_cpus"] == "1,3"
    _clean_up(n, sid)


# -- start-up recovery without a crash in a call ---------------------------------------------------------------
def test_recovery_finds_a_running_vm_again(n: Node) -> None:
    sid, cid = n.running_container()
    n.restart()
    assert _state(n, cid)[0] == st.CONTAINER_RUNNING and n.net.taps == {sid: "pod"}
    assert n.parts.running_writers() == [n.log_dir / "pod" / "vm/0.log"]
    n.domain(cid).crash()  # and the new virtletd gets its events
    n.wait_exit_handlers()
    assert _state(n, cid)[:3] == (st.CONTAINER_EXITED, 1, "Error")
    _clean_up(n, sid)


@pytest.mark.parametrize(("reason", "expected"), [
    (libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, (0, "Completed", "the guest powered off")),
    (libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, (1, "Error", "the VM stopped: QEMU crashed or was killed"))])
def test_recovery_of_a_vm_that_went_down_while_virtletd_was_dead(n: Node, reason: int,
                                                                 expected: tuple[int, str, str]) -> None:
    sid, cid = n.running_container()
    n.restart(lambda: n.domain(cid).vanish_silently(reason))
    assert _state(n, cid) == (st.CONTAINER_EXITED, *expected)
    assert n.net.taps == {}
    _clean_up(n, sid)


def test_recovery_of_a_vm_whose_domain_disappeared(n: Node) -> None:
    sid, cid = n.running_container()
    n.restart(n.conn.domains.clear)
    assert _state(n, cid) == (st.CONTAINER_EXITED, 1, "Error", "the VM's libvirt domain disappeared")
    _clean_up(n, sid)


def test_recovery_removes_orphans_but_not_another_virtletds_domains(n: Node) -> None:
    orphan = "6b1c5cc1-2d0e-4c9b-9c39-0d1c3c1b7a11"
    other = "7b1c5cc1-2d0e-4c9b-9c39-0d1c3c1b7a12"
    ours = n.tmp / "state" / "containers" / orphan / "root.qcow2"
    meta = "<metadata><v:virtlet xmlns:v='https://virtlet.cloud/xmlns/domain/1.0'><v:overlay>{}</v:overlay>" \
           "</v:virtlet></metadata>"
    n.conn.add_domain(f"virtlet-{orphan}", f"<domain><name>virtlet-{orphan}</name>{meta.format(ours)}</domain>",
                      running=True)
    n.conn.add_domain(f"virtlet-{other}", f"<domain><name>virtlet-{other}</name>"
                      f"{meta.format('/elsewhere/containers/x/root.qcow2')}</domain>")
    n.conn.add_domain("someones-vm")
    ours.parent.mkdir(parents=True)
    (n.tmp / "run" / "console" / f"{orphan}.sock").touch()
    n.d.recover()
    assert sorted(n.conn.domains) == ["someones-vm", f"virtlet-{other}"]
    assert not ours.parent.exists() and list((n.tmp / "run" / "console").iterdir()) == []


# -- every crash window of a container call --------------------------------------------------------------------
# (failpoint, the call killed there, what recovery leaves: container state or None when rolled back, taps)
CREATE = ["container.create.after_record", "container.create.after_prepare", "container.before_define",
          "container.create.after_define"]


@pytest.mark.parametrize("failpoint", CREATE)
def test_create_killed_is_rolled_back(n: Node, failpoint: str) -> None:
    sid = n.run_sandbox()
    n.kill_at(failpoint, lambda: n.d.vms.create(n.container_spec(sid)))
    assert n.d.store.list_containers() == [] and n.conn.domains == {}
    assert list((n.tmp / "state" / "containers").iterdir()) == []
    cid = n.d.vms.create(n.container_spec(sid)).id  # the kubelet's retry
    n.d.vms.start(cid)
    _clean_up(n, sid)


@pytest.mark.parametrize(("failpoint", "state", "taps"), [
    ("container.start.after_log_writer", st.CONTAINER_CREATED, set()),
    ("container.start.after_taps", st.CONTAINER_CREATED, set()),  # the host-netns taps are deleted
    ("container.start.after_domain_start", st.CONTAINER_RUNNING, {"pod"}),  # the running VM is adopted
    ("container.start.after_attach", st.CONTAINER_RUNNING, {"pod"})])
def test_start_killed(n: Node, failpoint: str, state: str, taps: set[str]) -> None:
    sid = n.run_sandbox()
    cid = n.d.vms.create(n.container_spec(sid)).id
    n.kill_at(failpoint, lambda: n.d.vms.start(cid))
    assert _state(n, cid)[0] == state
    assert set(n.net.taps.values()) == taps
    assert n.domain(cid).isActive() == (state == st.CONTAINER_RUNNING)
    assert bool(n.parts.running_writers()) == (state == st.CONTAINER_RUNNING)
    n.d.vms.start(cid)  # the kubelet's retry succeeds
    assert _state(n, cid)[0] == st.CONTAINER_RUNNING and n.net.taps == {sid: "pod"}
    _clean_up(n, sid)


@pytest.mark.parametrize("failpoint", ["container.stop.after_shutdown_request", "container.stop.after_domain_stopped"])
def test_stop_killed_after_the_vm_went_down(n: Node, failpoint: str) -> None:
    """The VM went down (ACPI honoured) while virtletd was dead: it is EXITED 0 as if the stop had finished."""
    sid, cid = n.running_container()
    n.kill_at(failpoint, lambda: n.d.vms.stop(cid, 10))
    assert _state(n, cid) == (st.CONTAINER_EXITED, 0, "Completed", "stopped by StopContainer")
    assert n.net.taps == {}
    n.d.vms.stop(cid, 10)  # the kubelet's retry
    _clean_up(n, sid)


def test_stop_killed_while_the_guest_still_runs(n: Node) -> None:
    sid, cid = n.running_container()
    n.domain(cid).acpi_ignored = True
    n.kill_at("container.stop.after_shutdown_request", lambda: n.d.vms.stop(cid, 10))
    assert _state(n, cid)[0] == st.CONTAINER_RUNNING and n.net.taps == {sid: "pod"}
    n.d.vms.stop(cid, 0)  # the kubelet's retry
    assert _state(n, cid)[:3] == (st.CONTAINER_EXITED, 137, "Error")
    _clean_up(n, sid)


def test_stop_killed_after_destroying_the_guest_reports_137(n: Node) -> None:
    """Killed after the destroy at the end of the grace period: recovery reports the kill, not a clean stop."""
    sid, cid = n.running_container()
    n.domain(cid).acpi_ignored = True
    n.kill_at("container.stop.after_domain_stopped", lambda: n.d.vms.stop(cid, 0))
    assert _state(n, cid)[:3] == (st.CONTAINER_EXITED, 137, "Error")
    _clean_up(n, sid)


def test_remove_killed_after_destroy(n: Node) -> None:
    sid, cid = n.running_container()
    n.kill_at("container.remove.after_destroy", lambda: n.d.vms.remove(cid))
    assert _state(n, cid)[:3] == (st.CONTAINER_EXITED, 1, "Error")  # the domain is gone
    assert n.domain(cid) is None and not n.d.vms.container_dir(cid).exists()
    n.d.vms.remove(cid)  # the kubelet's retry
    _clean_up(n, sid)
