"""CRI stats of VM pods through the real servicer, VM manager and state store, with fake libvirt domains and a
fake link reader: CPU rate, memory mapping, writable layer, not-running and vanished VMs, filters, errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from tests.fakes import libvirt as fake
from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.runtime_service import RuntimeServicer
from virtlet.network.model import NicInfo, PodNetworkInfo
from virtlet.network.plumbing import LinkNotFound
from virtlet.sandbox.manager import SandboxManager
from virtlet.state import store as st
from virtlet.vm.libvirt_host import LibvirtHost
from virtlet.vm.manager import VmManager

SEC = 1_000_000_000


def FakeDomain(cpu_ns: int = 0, rss_kib: int = 150_000, actual_kib: int = 262_144,
               cgroup: bool = True) -> fake.FakeDomain:
    """A running domain of the shared fake libvirt with these counters (``world.container`` adds it)."""
    dom = fake.FakeDomain()
    dom.cpu_ns, dom.rss_kib, dom.actual_kib, dom.cgroup = cpu_ns, rss_kib, actual_kib, cgroup
    dom.state_reason = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
    return dom


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000 * SEC

    def __call__(self) -> int:
        return self.now


class World:
    """A servicer over a real store and VM manager; domains, links and the clock are fakes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.store = st.StateStore(tmp / "v.db")
        self.conn = fake.FakeConnection()
        self.host = LibvirtHost("fake:///", open_connection=self.conn.open)
        self.vms = VmManager(self.store, self.host, parts=None, state_dir=tmp / "state",  # type: ignore[arg-type]
                             run_dir=tmp / "run")
        self.clock = Clock()
        self.vms.stats.clock = self.clock
        self.links: dict[tuple[str, str], dict[str, int]] = {}
        self.vms.stats.read_link = self._read_link
        self.rt = RuntimeServicer(SandboxManager(self.store, containers=self.vms), lambda: [], containers=self.vms)

    def _read_link(self, netns_path: str, ifname: str) -> dict[str, int]:
        try:
            return self.links[(netns_path, ifname)]
        except KeyError:
            raise LinkNotFound(f"interface {ifname} not found in {netns_path}") from None

    def sandbox(self, sid: str, state: str = st.SANDBOX_READY, labels: dict[str, str] | None = None,
                veth: str = "eth0") -> st.SandboxRecord:
        self.store.add_sandbox(st.SandboxRecord(
            id=sid, name=f"pod-{sid}", namespace="default", uid=f"uid-{sid}", attempt=0, state=st.SANDBOX_CREATING,
            created_at=st.now_ns(), runtime_handler="virtlet", netns=f"/var/run/netns/{sid}",
            labels=labels or {}, annotations={"note": sid}))
        network = PodNetworkInfo(
            sandbox_id=sid, netns_path=f"/var/run/netns/{sid}", dns_servers=[], dns_searches=[], dns_options=[],
            nics=[NicInfo(index=0, mac="02:00:00:00:00:02", mtu=1500, ip="10.1.0.2", prefix=24, gateway="",
                          routes=[], veth=veth, bridge="vmbr0", tap=f"vt{sid}0")]) if veth else None
        self.store.update_sandbox(sid, state=st.SANDBOX_READY, network=network)
        if state != st.SANDBOX_READY:
            self.store.update_sandbox(sid, state=state)
        return self.store.require_sandbox(sid)

    def container(self, cid: str, sid: str, state: str = st.CONTAINER_RUNNING, labels: dict[str, str] | None = None,
                  domain: fake.FakeDomain | None = None, overlay_bytes: int = 3 * 4096) -> st.ContainerRecord:
        cdir = self.vms.container_dir(cid)
        cdir.mkdir(parents=True)
        (cdir / "root.qcow2").write_bytes(b"\x01" * overlay_bytes)
        (cdir / "config.iso").write_bytes(b"\x02" * 4096)
        self.store.add_container(st.ContainerRecord(
            id=cid, sandbox_id=sid, name="vm", attempt=0, state=st.CONTAINER_CREATED, created_at=st.now_ns(),
            image="img", image_ref="sha256:ab", log_path="vm/0.log", labels=labels or {}, annotations={"a": cid},
            extra={"dir": str(cdir), "root": str(cdir / "root.qcow2"), "config_drive": str(cdir / "config.iso")}))
        if state != st.CONTAINER_CREATED:
            self.store.update_container(cid, state=st.CONTAINER_RUNNING)
        if state == st.CONTAINER_EXITED:
            self.store.update_container(cid, state=st.CONTAINER_EXITED)
        if domain is not None:
            self.conn.add_domain(VmManager.domain_name(cid), dom=domain)
        return self.store.require_container(cid)

    def container_stats(self, cid: str) -> api.ContainerStats:
        return self.rt.ContainerStats(api.ContainerStatsRequest(container_id=cid), None).stats

    def list_container_stats(self, **flt: Any) -> list[api.ContainerStats]:
        req = api.ListContainerStatsRequest(filter=api.ContainerStatsFilter(**flt))
        return list(self.rt.ListContainerStats(req, None).stats)

    def sandbox_stats(self, sid: str) -> api.PodSandboxStats:
        return self.rt.PodSandboxStats(api.PodSandboxStatsRequest(pod_sandbox_id=sid), None).stats

    def list_sandbox_stats(self, **flt: Any) -> list[api.PodSandboxStats]:
        req = api.ListPodSandboxStatsRequest(filter=api.PodSandboxStatsFilter(**flt))
        return list(self.rt.ListPodSandboxStats(req, None).stats)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.store.close()


def _disk_bytes(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_cpu_rate_between_samples_and_memory_mapping(world: World) -> None:
    dom = FakeDomain(cpu_ns=10 * SEC, rss_kib=150_000, actual_kib=262_144)
    world.sandbox("s1")
    world.container("c1", "s1", domain=dom)
    first = world.container_stats("c1")
    assert first.cpu.usage_core_nano_seconds.value == 10 * SEC
    assert not first.cpu.HasField("usage_nano_cores")  # no earlier sample
    assert first.cpu.timestamp == world.clock.now
    assert first.memory.rss_bytes.value == 150_000 * 1024
    assert first.memory.usage_bytes.value == first.memory.working_set_bytes.value == 150_000 * 1024
    assert first.memory.available_bytes.value == (262_144 - 150_000) * 1024
    world.clock.now += 2 * SEC
    dom.cpu_ns += SEC  # half a core over two seconds
    second = world.list_container_stats()[0]
    assert second.cpu.usage_nano_cores.value == SEC // 2
    assert second.cpu.usage_core_nano_seconds.value == 11 * SEC


def test_rss_above_configured_size_leaves_nothing_available(world: World) -> None:
    world.sandbox("s1")
    world.container("c1", "s1", domain=FakeDomain(rss_kib=150_000, actual_kib=131_072))
    assert world.container_stats("c1").memory.available_bytes.value == 0


def test_counter_going_back_gives_no_rate(world: World) -> None:
    dom = FakeDomain(cpu_ns=10 * SEC)
    world.sandbox("s1")
    world.container("c1", "s1", domain=dom)
    world.container_stats("c1")
    world.clock.now += SEC
    dom.cpu_ns = SEC
    assert not world.container_stats("c1").cpu.HasField("usage_nano_cores")
    world.clock.now += SEC
    dom.cpu_ns = 2 * SEC
    assert world.container_stats("c1").cpu.usage_nano_cores.value == SEC  # the new counter is the base


def test_cpu_time_without_cgroup_accounting_comes_from_info(world: World) -> None:
    world.sandbox("s1")
    world.container("c1", "s1", domain=FakeDomain(cpu_ns=7 * SEC, cgroup=False))
    assert world.container_stats("c1").cpu.usage_core_nano_seconds.value == 7 * SEC


def test_attributes_and_writable_layer(world: World) -> None:
    world.sandbox("s1")
    rec = world.container("c1", "s1", labels={"app": "vm"}, domain=FakeDomain(), overlay_bytes=5 * 4096)
    stats = world.container_stats("c1")
    assert stats.attributes.id == "c1" and stats.attributes.metadata.name == "vm"
    assert dict(stats.attributes.labels) == {"app": "vm"} and dict(stats.attributes.annotations) == {"a": "c1"}
    cdir = Path(rec.extra["dir"])
    assert stats.writable_layer.fs_id.mountpoint == str(cdir)
    expected = _disk_bytes(cdir / "root.qcow2") + _disk_bytes(cdir / "config.iso")
    assert stats.writable_layer.used_bytes.value == expected > 0
    assert stats.writable_layer.inodes_used.value == 2
    assert stats.writable_layer.timestamp == world.clock.now


def test_container_not_running_has_no_cpu_or_memory(world: World) -> None:
    world.sandbox("s1")
    world.container("c1", "s1", state=st.CONTAINER_EXITED, domain=FakeDomain(cpu_ns=SEC))
    world.container("c2", "s1", state=st.CONTAINER_CREATED)
    for cid in ("c1", "c2"):
        stats = world.container_stats(cid)
        assert stats.attributes.id == cid
        assert not stats.HasField("cpu") and not stats.HasField("memory")
        assert stats.writable_layer.used_bytes.value > 0


def test_vanished_domain_does_not_fail_the_list(world: World) -> None:
    stopped = FakeDomain(cpu_ns=SEC)
    world.sandbox("s1")
    world.sandbox("s2")
    world.sandbox("s3")
    world.container("c1", "s1", domain=FakeDomain(cpu_ns=SEC))
    world.container("c2", "s2", domain=stopped)
    world.container("c3", "s3")  # RUNNING in the store, no domain in libvirt any more
    stopped.vanish_silently()
    by_id = {s.attributes.id: s for s in world.list_container_stats()}
    assert set(by_id) == {"c1", "c2", "c3"}
    assert by_id["c1"].cpu.usage_core_nano_seconds.value == SEC
    for cid in ("c2", "c3"):
        assert not by_id[cid].HasField("cpu") and not by_id[cid].HasField("memory")
        assert by_id[cid].writable_layer.used_bytes.value > 0


def test_list_container_stats_filters(world: World) -> None:
    world.sandbox("s1")
    world.sandbox("s2")
    world.container("abc1", "s1", labels={"app": "a"}, domain=FakeDomain())
    world.container("abd2", "s2", labels={"app": "b"}, domain=FakeDomain())

    def ids(**flt: Any) -> list[str]:
        return sorted(s.attributes.id for s in world.list_container_stats(**flt))

    assert ids() == ["abc1", "abd2"]
    assert ids(id="abc") == ["abc1"]  # a prefix, as in ListContainers
    assert ids(pod_sandbox_id="s2") == ["abd2"]
    assert ids(label_selector={"app": "a"}) == ["abc1"]
    assert ids(id="ab", label_selector={"app": "b"}) == ["abd2"]
    assert ids(pod_sandbox_id="nope") == []
    with pytest.raises(errors.InvalidArgument, match="bad key!"):
        world.list_container_stats(label_selector={"bad key!": "x"})


def test_unknown_and_empty_ids(world: World) -> None:
    with pytest.raises(errors.NotFound, match="no-such-container"):
        world.container_stats("no-such-container")
    with pytest.raises(errors.NotFound, match="no-such-sandbox"):
        world.sandbox_stats("no-such-sandbox")
    with pytest.raises(errors.InvalidArgument, match="container_id is required"):
        world.container_stats("")
    with pytest.raises(errors.InvalidArgument, match="pod_sandbox_id is required"):
        world.sandbox_stats("")


def test_sandbox_sums_running_containers_and_reads_its_interface(world: World) -> None:
    world.sandbox("s1", labels={"app": "vm"})
    world.container("old", "s1", state=st.CONTAINER_EXITED)
    world.container("new", "s1", domain=FakeDomain(cpu_ns=3 * SEC, rss_kib=1000, actual_kib=4000))
    world.links[("/var/run/netns/s1", "eth0")] = {"rx_bytes": 1500, "rx_errors": 1, "tx_bytes": 900,
                                                 "tx_errors": 0}
    stats = world.sandbox_stats("s1")
    assert stats.attributes.id == "s1" and stats.attributes.metadata.uid == "uid-s1"
    assert dict(stats.attributes.labels) == {"app": "vm"}
    assert stats.linux.cpu.usage_core_nano_seconds.value == 3 * SEC
    assert stats.linux.memory.rss_bytes.value == 1000 * 1024
    assert stats.linux.memory.available_bytes.value == 3000 * 1024
    iface = stats.linux.network.default_interface
    assert (iface.name, iface.rx_bytes.value, iface.rx_errors.value, iface.tx_bytes.value,
            iface.tx_errors.value) == ("eth0", 1500, 1, 900, 0)
    assert [i.name for i in stats.linux.network.interfaces] == ["eth0"]
    by_id = {c.attributes.id: c for c in stats.linux.containers}
    assert set(by_id) == {"old", "new"}
    assert by_id["new"].HasField("cpu") and not by_id["old"].HasField("cpu")
    world.clock.now += SEC
    world.conn.domains[VmManager.domain_name("new")].cpu_ns += SEC // 4
    assert world.sandbox_stats("s1").linux.cpu.usage_nano_cores.value == SEC // 4


def test_sandbox_without_running_vm_or_interface(world: World) -> None:
    world.sandbox("s1", veth="")  # loopback-only network: no CNI interface
    world.sandbox("s2")  # its link is missing (torn down under us)
    for sid in ("s1", "s2"):
        stats = world.sandbox_stats(sid)
        assert stats.attributes.id == sid
        assert not stats.linux.HasField("cpu") and not stats.linux.HasField("memory")
        assert not stats.linux.HasField("network")


def test_notready_sandbox_gets_attributes_only(world: World) -> None:
    world.sandbox("s1")
    world.container("c1", "s1", state=st.CONTAINER_EXITED)
    world.store.update_sandbox("s1", state=st.SANDBOX_NOTREADY)
    world.links[("/var/run/netns/s1", "eth0")] = {"rx_bytes": 1, "rx_errors": 0, "tx_bytes": 1, "tx_errors": 0}
    stats = world.sandbox_stats("s1")
    assert stats.attributes.id == "s1" and not stats.HasField("linux")


def test_list_pod_sandbox_stats_filters(world: World) -> None:
    world.sandbox("sa1", labels={"app": "a"})
    world.sandbox("sb2", labels={"app": "b"}, state=st.SANDBOX_NOTREADY)
    world.store.add_sandbox(st.SandboxRecord(  # a RunPodSandbox in progress is invisible
        id="sc3", name="pod-c", namespace="default", uid="uid-c", attempt=0, state=st.SANDBOX_CREATING,
        created_at=st.now_ns(), runtime_handler="virtlet", netns=""))

    def ids(**flt: Any) -> list[str]:
        return sorted(s.attributes.id for s in world.list_sandbox_stats(**flt))

    assert ids() == ["sa1", "sb2"]
    assert ids(id="sb") == ["sb2"]
    assert ids(label_selector={"app": "a"}) == ["sa1"]
    assert ids(id="sa", label_selector={"app": "b"}) == []
    with pytest.raises(errors.InvalidArgument, match="-bad-"):
        world.list_sandbox_stats(label_selector={"app": "-bad-"})


def test_removed_container_is_forgotten(world: World) -> None:
    world.sandbox("s1")
    world.container("c1", "s1", domain=FakeDomain(cpu_ns=SEC))
    world.container_stats("c1")
    assert "c1" in world.vms.stats._previous
    world.store.update_container("c1", state=st.CONTAINER_EXITED)
    world.container_stats("c1")
    assert "c1" not in world.vms.stats._previous


def test_cri_metrics_with_cadvisor_names(world: World) -> None:
    world.sandbox("s1")
    world.container("old", "s1", state=st.CONTAINER_EXITED)
    world.container("new", "s1", domain=FakeDomain(cpu_ns=3 * SEC + 1, rss_kib=1000))
    world.links[("/var/run/netns/s1", "eth0")] = {"rx_bytes": 1500, "rx_errors": 1, "tx_bytes": 900,
                                                 "tx_errors": 0}
    descriptors = {d.name: list(d.label_keys) for d in world.rt.ListMetricDescriptors(
        api.ListMetricDescriptorsRequest(), None).descriptors}
    assert descriptors["container_cpu_usage_seconds_total"] == ["container", "id", "image", "name", "namespace",
                                                                "pod"]
    assert descriptors["container_network_receive_bytes_total"][-1] == "interface"
    [pod] = world.rt.ListPodSandboxMetrics(api.ListPodSandboxMetricsRequest(), None).pod_metrics
    assert pod.pod_sandbox_id == "s1"
    net = {m.name: m for m in pod.metrics}
    assert net["container_network_receive_bytes_total"].value.value == 1500
    assert net["container_network_receive_errors_total"].value.value == 1
    assert [c.container_id for c in pod.container_metrics] == ["new"]  # a stopped VM has no usage to report
    values = {m.name: m for m in pod.container_metrics[0].metrics}
    for m in (*pod.metrics, *values.values()):
        assert m.name in descriptors and len(m.label_values) == len(descriptors[m.name])
    assert values["container_cpu_usage_seconds_total"].value.value == 3
    assert values["container_cpu_usage_seconds_total"].metric_type == api.COUNTER
    assert values["container_memory_working_set_bytes"].value.value == 1000 * 1024
    assert values["container_memory_working_set_bytes"].metric_type == api.GAUGE
    assert values["container_fs_reads_bytes_total"].value.value == 4096
    assert values["container_fs_writes_total"].value.value == 1
    assert list(values["container_memory_rss"].label_values)[:2] == ["vm", "new"]
