"""The proxy's servicer against fake CRI backends (in-process gRPC servers on unix sockets): a hung secondary
is cut off by the list deadline, v1alpha2-only backends are spoken to in v1alpha2, events are merged."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from virtlet import errors
from virtlet.cri import versions
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy import config
from virtlet.proxy.main import ProxyServer
from virtlet.proxy.naming import external_id
from virtlet.proxy.state import ProxyState


class FakeRuntime:
    """A CRI backend that knows one sandbox and one event; ``hang`` makes ListPodSandbox block."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hang = threading.Event()
        self.release = threading.Event()
        self.seen: list[str] = []
        self.flood = 0  # GetContainerEvents sends this many extra events at once

    def Version(self, request: Any, context: Any) -> api.VersionResponse:
        return api.VersionResponse(runtime_name=self.name, runtime_api_version="v1")

    def ListPodSandbox(self, request: api.ListPodSandboxRequest, context: Any) -> api.ListPodSandboxResponse:
        self.seen.append(request.filter.id)
        if self.hang.is_set():
            self.release.wait(10)
        return api.ListPodSandboxResponse(items=[api.PodSandbox(id=f"{self.name}-sb")])

    def GetContainerEvents(self, request: Any, context: Any) -> Iterator[api.ContainerEventResponse]:
        yield api.ContainerEventResponse(container_id=f"{self.name}-c",
                                         pod_sandbox_status=api.PodSandboxStatus(id=f"{self.name}-sb"))
        for i in range(self.flood):
            yield api.ContainerEventResponse(container_id=f"{self.name}-{i}", pod_sandbox_status=api.PodSandboxStatus(
                id=f"{self.name}-sb", annotations={"pad": "x" * 2000}))
        self.release.wait(10)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Any, FakeRuntime, FakeRuntime]]:
    servers = []
    fakes = []
    for name, vers in (("primary", versions.VERSIONS), ("vm", ("v1alpha2",))):
        fake = FakeRuntime(name)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        versions.add_servicers(server, fake, None, versions=vers)
        server.add_insecure_port(f"unix://{tmp_path}/{name}.sock")
        server.start()
        servers.append(server)
        fakes.append(fake)
    cfg = config.from_mapping({"listen": str(tmp_path / "proxy.sock"),
                               "primary": str(tmp_path / "primary.sock"),
                               "secondaries": {"virtlet.cloud": str(tmp_path / "vm.sock")},
                               "list_timeout": 0.5, "state_dir": str(tmp_path / "state")})
    proxy = ProxyServer(cfg, workers=4)
    proxy.start()
    channel = grpc.insecure_channel(f"unix://{tmp_path}/proxy.sock")
    try:
        yield channel, fakes[0], fakes[1]
    finally:
        for fake in fakes:
            fake.release.set()
        channel.close()
        proxy.stop(grace=1)
        for server in servers:
            server.stop(0).wait()


def test_lists_merge_and_narrow(world: tuple[Any, FakeRuntime, FakeRuntime]) -> None:
    channel, primary, vm = world
    rt = versions.runtime_stub(channel, "v1alpha2")
    ids = [s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=5).items]
    assert ids == ["primary-sb", external_id("virtlet.cloud", "vm-sb")]
    narrowed = api.ListPodSandboxRequest(filter=api.PodSandboxFilter(id="virtlet.cloud__x"))
    rt.ListPodSandbox(narrowed, timeout=5)
    assert vm.seen[-1] == "x" and len(primary.seen) == 1  # only the secondary was asked, without the prefix
    narrowed = api.ListPodSandboxRequest(filter=api.PodSandboxFilter(id=ids[1]))  # the shown id, via the index
    rt.ListPodSandbox(narrowed, timeout=5)
    assert vm.seen[-1] == "vm-sb" and len(primary.seen) == 1


def test_last_known_list_stands_in_for_a_down_secondary(tmp_path: Path) -> None:
    """A secondary that answered once and then hangs is answered for by its last list; the state dir keeps it
    (and the id index) for the next proxy on the same dir."""
    state = ProxyState(tmp_path / "st")
    state.remember_list("virtlet.cloud", "ListPodSandbox", api.ListPodSandboxResponse(items=[
        api.PodSandbox(id="a", state=api.SANDBOX_READY, labels={"app": "x"}),
        api.PodSandbox(id="b", state=api.SANDBOX_NOTREADY)]))
    again = ProxyState(tmp_path / "st")
    assert again.resolve(external_id("virtlet.cloud", "a")) == ("virtlet.cloud", "a")
    assert not again.synced("virtlet.cloud")  # loaded from disk, not yet confirmed by a list since start
    req = api.ListPodSandboxRequest(filter=api.PodSandboxFilter(
        state=api.PodSandboxStateValue(state=api.SANDBOX_READY)))
    assert [i.id for i in again.last_list("virtlet.cloud", "ListPodSandbox", req).items] == ["a"]
    req = api.ListPodSandboxRequest(filter=api.PodSandboxFilter(label_selector={"app": "y"}))
    assert list(again.last_list("virtlet.cloud", "ListPodSandbox", req).items) == []
    assert again.last_list("virtlet.cloud", "ListContainers", api.ListContainersRequest()) is None
    assert oct((tmp_path / "st").stat().st_mode & 0o777) == "0o700"
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in (tmp_path / "st").iterdir())
    state.replace("virtlet.cloud", "sandbox", ["b"])  # "a" is gone from a full list: forgotten
    assert state.resolve(external_id("virtlet.cloud", "a")) is None


def test_lists_start_no_thread_per_call(world: tuple[Any, FakeRuntime, FakeRuntime],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Latency: a fan-out must not start threads per call (grpc's ``future()`` did, one per backend, about
    0.4 ms each); the secondaries are asked from long-lived pool threads."""
    channel, _, _ = world
    rt = versions.runtime_stub(channel)
    for _ in range(5):  # warm up: the pool's threads start once
        rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=5)
    started: list[str] = []
    real_start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        started.append(self.name)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", counting_start)
    for _ in range(20):
        assert len(rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=5).items) == 2
    assert len(started) <= 2, started


def test_hung_secondary_keeps_its_last_known_sandboxes(world: tuple[Any, FakeRuntime, FakeRuntime]) -> None:
    channel, _, vm = world
    rt = versions.runtime_stub(channel)
    shown = external_id("virtlet.cloud", "vm-sb")
    assert [s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=5).items] == ["primary-sb", shown]
    vm.hang.set()
    assert [s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=5).items] == ["primary-sb", shown]


def test_hung_secondary_is_cut_off_by_the_list_deadline(world: tuple[Any, FakeRuntime, FakeRuntime]) -> None:
    channel, _, vm = world
    vm.hang.set()
    rt = versions.runtime_stub(channel)
    # the proxy's own deadline for the secondary (0.5 s) ends the wait, well inside the caller's 5 s
    assert [s.id for s in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=5).items] == ["primary-sb"]


def test_events_are_merged_and_prefixed(world: tuple[Any, FakeRuntime, FakeRuntime]) -> None:
    channel, _, _ = world
    stream = versions.runtime_stub(channel).GetContainerEvents(api.GetEventsRequest(), timeout=10)
    got = {next(stream).container_id for _ in range(2)}
    stream.cancel()
    assert got == {"primary-c", external_id("virtlet.cloud", "vm-c")}


def test_a_slow_event_client_is_cut_off_not_buffered(world: tuple[Any, FakeRuntime, FakeRuntime]) -> None:
    """A client that does not read while a backend floods events gets RESOURCE_EXHAUSTED (and relists) after
    a bounded number of events; the proxy does not queue them all."""
    channel, primary, _ = world
    primary.flood = 5000  # 10 MB of events: far more than gRPC's flow-control windows plus the proxy's queue
    stream = versions.runtime_stub(channel).GetContainerEvents(api.GetEventsRequest(), timeout=60)
    stream.initial_metadata()
    time.sleep(3)  # not reading: the flood fills the windows and the proxy's bounded queue
    got = 0
    with pytest.raises(grpc.RpcError) as exc:
        for _ in stream:
            got += 1
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.value.details()
    assert "fell 256 events behind" in exc.value.details() and got < primary.flood


def test_damaged_or_unwritable_state_is_survived(tmp_path: Path) -> None:
    st = tmp_path / "st"
    st.mkdir()
    (st / "ids.json").write_text('{"ids": {"zz": ["virtlet.cloud", "sandbox", "a"]')  # torn write
    (st / "last-virtlet.cloud-ListPodSandbox.pb").write_bytes(b"\xff\xff\xff")
    state = ProxyState(st)  # both ignored (logged), nothing raised
    assert state.last_list("virtlet.cloud", "ListPodSandbox", api.ListPodSandboxRequest()) is None
    shutil.rmtree(st)  # the directory is gone (tests run as root, so a mode would not stop the writes)
    shown = state.record("virtlet.cloud", "sandbox", "a")  # cannot write: kept in memory, no error
    assert state.resolve(shown) == ("virtlet.cloud", "a") and not st.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(errors.FailedPrecondition, match="state_dir"):
        ProxyState(tmp_path / "file" / "sub")
