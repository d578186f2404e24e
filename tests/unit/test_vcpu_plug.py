"""vCPU hot-plug in UpdateContainerResources (virtlet.vm.vcpu_plug) and the guest's exit code in the VM manager's
exit paths (virtlet.vm.guest_exit), with the shared fake libvirt."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from tests.fakes.libvirt import FakeLibvirtError
from tests.fakes.node import Node, node
from virtlet import errors
from virtlet.state import store as st
from virtlet.vm import domain_xml as dx
from virtlet.vm import guest_agent as ga
from virtlet.vm import guest_exit, vcpu_plug
from virtlet.vm.annotations import CpuResources, parse_vm_options
from virtlet.vm.manager import ResourceUpdate

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG


@pytest.fixture
def n(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    with node(tmp_path, monkeypatch) as world:
        world.onlined = []  # type: ignore[attr-defined]
        # the fake libvirt has no guest agent: record the onlining asked for (tested below with an agent script)
        monkeypatch.setattr(vcpu_plug, "online_in_guest",
                            lambda call, count, pod: world.onlined.append(count) or count)  # type: ignore[attr-defined]
        yield world


def _running(n: Node, vcpus: int, max_vcpus: int) -> tuple[str, str]:
    sid, cid = n.running_container()
    rec = n.d.store.require_container(cid)
    n.d.store.update_container(cid, extra={**rec.extra, "vcpus": vcpus, "max_vcpus": max_vcpus})
    return sid, cid


def _state(n: Node, cid: str) -> tuple[str, int, str, str]:
    rec = n.d.store.require_container(cid)
    return rec.state, rec.exit_code, rec.reason, rec.message


def test_a_higher_cpu_limit_hot_plugs_vcpus_up_to_the_maximum(n: Node) -> None:
    sid, cid = _running(n, 1, 3)
    dom = n.domain(cid)
    in_force = n.d.vms.update_resources(cid, ResourceUpdate(cpu_quota=150_000, cpu_period=100_000))
    assert getattr(dom, "vcpus_set", []) == [(2, LIVE)]  # 1.5 CPUs -> 2 vCPUs
    assert (in_force["cpu_quota"], in_force["cpu_period"]) == (150_000, 100_000)
    assert n.d.store.require_container(cid).extra["vcpus"] == 2
    # a lower limit keeps the vCPUs (no unplug: it needs the guest's cooperation); only the quota changes
    n.d.vms.update_resources(cid, ResourceUpdate(cpu_quota=50_000, cpu_period=100_000))
    assert dom.vcpus_set == [(2, LIVE)] and dom.sched_set[-1][0]["global_quota"] == 50_000
    n.d.vms.update_resources(cid, ResourceUpdate(cpu_quota=300_000, cpu_period=100_000))
    assert dom.vcpus_set[-1] == (3, LIVE)
    assert n.onlined == [2, 3]  # type: ignore[attr-defined]
    n.d.remove_sandbox(sid)


def test_beyond_the_maximum_is_refused_before_anything_changes(n: Node) -> None:
    sid, cid = _running(n, 1, 1)  # no VirtletMaxVCPUs: no room
    dom = n.domain(cid)
    with pytest.raises(errors.FailedPrecondition, match=r"needs 2 vCPUs.*VirtletMaxVCPUs: \"2\""):
        n.d.vms.update_resources(cid, ResourceUpdate(memory_limit_bytes=64 << 20, cpu_quota=200_000,
                                                     cpu_period=100_000))
    assert not hasattr(dom, "vcpus_set") and not hasattr(dom, "memory_set") and not hasattr(dom, "sched_set")
    assert "resources" not in n.d.store.require_container(cid).extra
    n.d.store.update_container(cid, extra={**n.d.store.require_container(cid).extra, "max_vcpus": 2})
    with pytest.raises(errors.FailedPrecondition, match=r"at most 2 vCPUs"):
        n.d.vms.update_resources(cid, ResourceUpdate(cpu_quota=10**12, cpu_period=1000))
    n.d.remove_sandbox(sid)


def test_libvirt_refusing_the_hot_plug_says_what_was_applied(n: Node) -> None:
    sid, cid = _running(n, 1, 2)
    n.domain(cid).fail["setVcpusFlags"] = FakeLibvirtError("unsupported configuration: CPU hot-plug")
    with pytest.raises(errors.FailedPrecondition, match=r"CPU hot-plug.*applied before it: memory"):
        n.d.vms.update_resources(cid, ResourceUpdate(memory_limit_bytes=64 << 20, cpu_quota=200_000,
                                                     cpu_period=100_000))
    rec = n.d.store.require_container(cid)
    assert rec.extra["vcpus"] == 1 and rec.extra["resources"] == {"memory_limit_in_bytes": 64 << 20}
    n.d.remove_sandbox(sid)


def test_vcpu_room_in_the_domain_and_the_options() -> None:
    def opts(ann: dict[str, str], quota: int = 0) -> tuple[int, int]:
        o = parse_vm_options(ann, 0, CpuResources(quota=quota, period=100_000 if quota else 0), "uid", 4)
        return o.vcpus, o.max_vcpus

    assert opts({}) == (1, 1)
    assert opts({}, quota=300_000) == (1, 1)  # no room: VirtletVCPUCount, as before
    assert opts({"VirtletMaxVCPUs": "4"}) == (1, 4)
    assert opts({"VirtletVCPUCount": "2", "VirtletMaxVCPUs": "3"}, quota=250_000) == (3, 3)  # restart after resize
    assert opts({"VirtletMaxVCPUs": "3"}, quota=900_000) == (3, 3)
    for bad in ("0", "5", "1.5", "two", "²"):
        with pytest.raises(errors.InvalidArgument, match="VirtletMaxVCPUs"):
            opts({"VirtletVCPUCount": "2", "VirtletMaxVCPUs": bad})
    with pytest.raises(errors.InvalidArgument, match="VirtletMaxVCPUs"):
        opts({"VirtletVCPUCount": "2", "VirtletMaxVCPUs": "1"})
    dom = dx.Domain(name="d", uuid="u", memory_bytes=1 << 27, vcpus=1, max_vcpus=4, devices=dx.Devices(emulator="/q"))
    xml = dx.to_string(dom)
    assert "<vcpu placement=\"static\" current=\"1\">4</vcpu>" in xml
    back = dx.from_string(xml)
    assert (back.vcpus, back.max_vcpus) == (1, 4)
    plain = dx.to_string(dx.Domain(name="d", uuid="u", memory_bytes=1 << 27, vcpus=2,
                                   devices=dx.Devices(emulator="/q")))
    assert "<vcpu placement=\"static\">2</vcpu>" in plain and dx.from_string(plain).max_vcpus is None


# -- the guest's own exit code (virtlet.vm.guest_exit) -----------------------------------------------------
def _report(n: Node, cid: str, text: bytes) -> None:
    guest_exit.exit_file(n.d.vms.container_dir(cid)).write_bytes(text)


def test_power_off_with_a_reported_code(n: Node) -> None:
    sid, cid = n.running_container()
    _report(n, cid, b"exit-code 3\n")
    n.domain(cid).power_off()
    n.wait_exit_handlers()
    assert _state(n, cid)[:3] == (st.CONTAINER_EXITED, 3, "Error")
    assert "the guest reported exit code 3" in _state(n, cid)[3]
    n.d.remove_sandbox(sid)


def test_garbage_or_a_crash_ignores_the_report(n: Node) -> None:
    sid, cid = n.running_container()
    _report(n, cid, b"exit-code 300\n")
    n.domain(cid).power_off()
    n.wait_exit_handlers()
    assert _state(n, cid) == (st.CONTAINER_EXITED, 0, "Completed", "the guest powered off")
    n.d.remove_sandbox(sid)
    sid, cid = n.running_container("pod2")
    _report(n, cid, b"exit-code 0\n")
    n.domain(cid).crash()  # a QEMU crash keeps libvirt's reason
    n.wait_exit_handlers()
    assert _state(n, cid)[1:3] == (1, "Error")
    n.d.remove_sandbox(sid)


def test_stop_reports_the_code_but_a_destroy_is_137(n: Node) -> None:
    sid, cid = n.running_container()
    _report(n, cid, b"exit-code 4\n")
    n.d.vms.stop(cid, 10)  # off on the ACPI button: the code the guest reported on its way down
    assert _state(n, cid)[1:3] == (4, "Error")
    n.d.remove_sandbox(sid)
    sid, cid = n.running_container("pod2")
    _report(n, cid, b"exit-code 0\n")
    n.domain(cid).acpi_ignored = True
    n.d.vms.stop(cid, 0)
    assert _state(n, cid)[1:3] == (137, "Error")
    n.d.remove_sandbox(sid)


def test_start_empties_a_stale_report(n: Node) -> None:
    sid = n.run_sandbox()
    cid = n.d.vms.create(n.container_spec(sid)).id
    _report(n, cid, b"exit-code 9\n")
    n.d.vms.start(cid)
    assert guest_exit.exit_file(n.d.vms.container_dir(cid)).read_bytes() == b""
    n.domain(cid).power_off()
    n.wait_exit_handlers()
    assert _state(n, cid)[1:3] == (0, "Completed")
    n.d.remove_sandbox(sid)


class ScriptedAgent:
    """A guest agent whose CPU 1 appears only at the second guest-get-vcpus (a hot-add the kernel sees late)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[dict[str, object]] = []
        self.online = {0: True}
        self.fail = fail

    def __call__(self, cmd: dict[str, object], timeout: float) -> object:
        self.calls.append(cmd)
        if self.fail is not None:
            raise self.fail
        if cmd["execute"] == "guest-get-vcpus":
            if len([c for c in self.calls if c["execute"] == "guest-get-vcpus"]) >= 2:
                self.online.setdefault(1, False)
            return [{"logical-id": i, "online": up, "can-offline": i > 0} for i, up in self.online.items()]
        for item in cmd["arguments"]["vcpus"]:  # type: ignore[index]
            self.online[item["logical-id"]] = item["online"]
        return len(cmd["arguments"]["vcpus"])  # type: ignore[index]


def test_online_in_guest_polls_until_the_cpu_shows_up() -> None:
    agent = ScriptedAgent()
    assert vcpu_plug.online_in_guest(agent, 2, "pod", budget=5.0) == 2
    assert agent.online == {0: True, 1: True}
    assert {"execute": "guest-set-vcpus", "arguments": {"vcpus": [{"logical-id": 1, "online": True}]}} in agent.calls


def test_online_in_guest_without_an_agent_gives_up_quietly() -> None:
    assert vcpu_plug.online_in_guest(ScriptedAgent(ga.AgentUnavailable("not connected")), 2, "pod") == 0
    # CPU 1 never shows up in the guest: bounded by the budget, what is online is answered
    assert vcpu_plug.online_in_guest(lambda cmd, t: [{"logical-id": 0, "online": True}], 2, "pod", budget=0.6) == 1


def test_cpus_the_guest_sees_late_are_onlined_in_the_background() -> None:
    class LateAgent(ScriptedAgent):
        """CPU 1 shows up only at the fifth guest-get-vcpus: after the call's own budget."""

        def __call__(self, cmd: dict[str, object], timeout: float) -> object:
            if cmd["execute"] == "guest-get-vcpus" and len(
                    [c for c in self.calls if c["execute"] == "guest-get-vcpus"]) < 4:
                self.calls.append(cmd)
                return [{"logical-id": 0, "online": True}]
            return super().__call__(cmd, timeout)

    agent = LateAgent()
    assert vcpu_plug.online_in_guest(agent, 2, "pod", budget=0.3) == 1  # the call's budget ends first
    thread = vcpu_plug.online_in_background(agent, 2, "pod", budget=30.0)
    thread.join(30)
    assert not thread.is_alive()
    assert agent.online == {0: True, 1: True}


def test_the_background_onliner_waits_for_an_agent_that_connects_late() -> None:
    """qemu-ga starts late in a guest's boot: an update right after the pod's ready line finds it not connected
    (what made a CI run leave the CPU offline); the background thread asks again until it answers."""

    class LateConnect(ScriptedAgent):
        def __call__(self, cmd: dict[str, object], timeout: float) -> object:
            if len(self.calls) < 3:
                self.calls.append(cmd)
                raise ga.AgentUnavailable("QEMU guest agent is not connected")
            return super().__call__(cmd, timeout)

    agent = LateConnect()
    assert vcpu_plug.online_in_guest(agent, 2, "pod") == 0  # the call itself does not wait for the agent
    thread = vcpu_plug.online_in_background(agent, 2, "pod", budget=30.0)
    thread.join(30)
    assert not thread.is_alive()
    assert agent.online == {0: True, 1: True}
