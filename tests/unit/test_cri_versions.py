"""``virtlet.cri.versions`` against a real in-process gRPC server on a unix socket.

A tiny servicer answers Version and the server-streaming GetContainerEvents; the tests call it as
``runtime.v1`` and ``runtime.v1alpha2`` (through our stubs and through hand-built call paths), and probe which
version a backend speaks.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest

from virtlet import errors
from virtlet.cri import versions
from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.gen import api_pb2_grpc as api_grpc


class TinyRuntime(api_grpc.RuntimeServiceServicer):
    """Answers Version (echoing the caller's version) and streams two container events."""

    def Version(self, request: api.VersionRequest, context: grpc.ServicerContext) -> api.VersionResponse:
        return api.VersionResponse(version=request.version, runtime_name="tiny", runtime_version="0.0.1",
                                   runtime_api_version="v1")

    def GetContainerEvents(self, request: api.GetEventsRequest,
                           context: grpc.ServicerContext) -> Iterator[api.ContainerEventResponse]:
        for n, kind in enumerate((api.CONTAINER_CREATED_EVENT, api.CONTAINER_STARTED_EVENT)):
            yield api.ContainerEventResponse(container_id=f"c{n}", container_event_type=kind,
                                             created_at=n + 1)


class TinyImages(api_grpc.ImageServiceServicer):
    def ImageFsInfo(self, request: api.ImageFsInfoRequest,
                    context: grpc.ServicerContext) -> api.ImageFsInfoResponse:
        usage = api.FilesystemUsage(timestamp=1, fs_id=api.FilesystemIdentifier(mountpoint="/images"))
        return api.ImageFsInfoResponse(image_filesystems=[usage])


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # short path: unix socket paths are limited to 108 bytes, pytest's tmp_path can be longer
    path = Path(tempfile.mkdtemp(prefix="vl-criver-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def serving(sock: Path, served: tuple[str, ...] | None) -> Iterator[grpc.Channel]:
    """A real server on ``sock`` offering ``served`` versions (None: no CRI service at all), and a channel."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    if served is not None:
        versions.add_servicers(server, TinyRuntime(), TinyImages(), versions=served)
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    channel = grpc.insecure_channel(f"unix://{sock}")
    try:
        yield channel
    finally:
        channel.close()
        server.stop(None).wait(5)


@pytest.fixture
def both(sockdir: Path) -> Iterator[grpc.Channel]:
    with serving(sockdir / "cri.sock", versions.VERSIONS) as channel:
        yield channel


@pytest.mark.parametrize("version", ["v1", "v1alpha2"])
def test_unary_and_server_streaming_calls_under_each_version(both: grpc.Channel, version: str) -> None:
    stub = versions.runtime_stub(both, version)
    reply = stub.Version(api.VersionRequest(version=version), timeout=5)
    # the v1 servicer's "v1" is answered as the version the caller used
    assert (reply.version, reply.runtime_name, reply.runtime_api_version) == (version, "tiny", version)
    events = list(stub.GetContainerEvents(api.GetEventsRequest(), timeout=5))
    assert [(e.container_id, e.container_event_type) for e in events] == [
        ("c0", api.CONTAINER_CREATED_EVENT), ("c1", api.CONTAINER_STARTED_EVENT)]
    fs = versions.image_stub(both, version).ImageFsInfo(api.ImageFsInfoRequest(), timeout=5)
    assert fs.image_filesystems[0].fs_id.mountpoint == "/images"


def test_v1alpha2_path_is_served_for_a_client_that_knows_nothing_of_our_stubs(both: grpc.Channel) -> None:
    """What an old kubelet does: its own call path and bytes; the fields it sends are v1-compatible."""
    call = both.unary_unary("/runtime.v1alpha2.RuntimeService/Version")  # raw bytes in and out
    raw = call(api.VersionRequest(version="0.1.0").SerializeToString(), timeout=5)
    assert api.VersionResponse.FromString(raw).runtime_name == "tiny"
    stream = both.unary_stream("/runtime.v1alpha2.RuntimeService/GetContainerEvents")
    assert len(list(stream(b"", timeout=5))) == 2


def test_unimplemented_methods_say_so_under_the_alias(both: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        versions.image_stub(both, "v1alpha2").ListImages(api.ListImagesRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == "Method not implemented!"  # the servicer answered: the method is routed


def test_stubs_have_the_callables_of_the_generated_stubs(both: grpc.Channel) -> None:
    for ours, generated in ((versions.runtime_stub(both, "v1alpha2"), api_grpc.RuntimeServiceStub(both)),
                            (versions.image_stub(both), api_grpc.ImageServiceStub(both))):
        assert sorted(vars(generated)) == sorted(k for k in vars(ours) if k not in ("service", "version"))
    stub, generated_stub = versions.runtime_stub(both), api_grpc.RuntimeServiceStub(both)
    for name in ("Version", "GetContainerEvents"):  # same call kind (unary or server streaming)
        assert type(getattr(stub, name)) is type(getattr(generated_stub, name))
    with pytest.raises(AttributeError, match="runtime.v1.RuntimeService has no method 'NoSuchCall'"):
        stub.NoSuchCall  # noqa: B018


def test_servicer_without_a_method_answers_unimplemented(sockdir: Path) -> None:
    class Bare:  # not derived from the generated servicer: only Version
        def Version(self, request: api.VersionRequest, context: grpc.ServicerContext) -> api.VersionResponse:
            return api.VersionResponse(runtime_name="bare")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    versions.add_servicers(server, Bare(), None)
    server.add_insecure_port(f"unix://{sockdir / 'bare.sock'}")
    server.start()
    channel = grpc.insecure_channel(f"unix://{sockdir / 'bare.sock'}")
    try:
        stub = versions.runtime_stub(channel, "v1alpha2")
        assert stub.Version(api.VersionRequest(), timeout=5).runtime_name == "bare"
        with pytest.raises(grpc.RpcError) as info:
            stub.Status(api.StatusRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert "Status is not implemented" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # no image servicer: the service is absent
            versions.image_stub(channel).ListImages(api.ListImagesRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()
        server.stop(None).wait(5)


@pytest.mark.parametrize(("served", "expected"), [
    (("v1", "v1alpha2"), "v1"),
    (("v1",), "v1"),
    (("v1alpha2",), "v1alpha2"),
])
def test_probe_version(sockdir: Path, served: tuple[str, ...], expected: str) -> None:
    with serving(sockdir / "probe.sock", served) as channel:
        assert versions.probe_version(channel, timeout=5) == expected


def test_only_v1_served_means_v1alpha2_is_unimplemented(sockdir: Path) -> None:
    with serving(sockdir / "v1only.sock", ("v1",)) as channel:
        with pytest.raises(grpc.RpcError) as info:
            versions.runtime_stub(channel, "v1alpha2").Version(api.VersionRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_probe_a_backend_without_cri(sockdir: Path) -> None:
    with serving(sockdir / "none.sock", None) as channel:
        with pytest.raises(errors.FailedPrecondition, match="none of runtime.v1, runtime.v1alpha2"):
            versions.probe_version(channel, timeout=5)


def test_probe_nothing_listening(sockdir: Path) -> None:
    channel = grpc.insecure_channel(f"unix://{sockdir / 'absent.sock'}")
    try:
        with pytest.raises(errors.Unavailable, match=r"runtime\.v1 Version call: UNAVAILABLE"):
            versions.probe_version(channel, timeout=3)
    finally:
        channel.close()


@pytest.mark.parametrize("call", [  # refused before the channel or server (None here) is ever touched
    lambda: versions.runtime_stub(None, "v1beta1"),  # type: ignore[arg-type]
    lambda: versions.add_servicers(None, TinyRuntime(), None, versions=("v1", "v2")),  # type: ignore[arg-type]
])
def test_unknown_versions_are_refused(call: Any) -> None:
    with pytest.raises(errors.InvalidArgument, match="supported: v1, v1alpha2"):
        call()


def test_method_table_follows_the_proto() -> None:
    table = {m.name: m for m in versions.methods("RuntimeService")}
    assert len(table) == len(api.DESCRIPTOR.services_by_name["RuntimeService"].methods)
    assert table["GetContainerEvents"].server_streaming and not table["GetContainerEvents"].client_streaming
    assert table["Version"].request is api.VersionRequest and table["Version"].response is api.VersionResponse
    assert {m.name for m in versions.methods("ImageService")} >= {"ListImages", "PullImage", "ImageFsInfo"}
