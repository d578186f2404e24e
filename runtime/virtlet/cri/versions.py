"""CRI API versions: serve the ``runtime.v1`` servicers under ``runtime.v1alpha2`` too, and dial either.

Why: kubelets 1.20-1.25 and old CRI proxies call ``/runtime.v1alpha2.RuntimeService/<Method>`` and
``/runtime.v1alpha2.ImageService/<Method>``.  For every field both versions share, the v1alpha2 messages are
wire-identical to v1 (``tests/unit/test_proto_wire.py`` proves it against the reference package), so the v1
servicers answer them unchanged: only the service name in the call path differs.  Fields that v1alpha2 lacks
are simply never sent by such a client, and fields it has that v1 dropped are ignored as unknown fields.

Everything here is built from the method table of the generated v1 descriptor, so a method added to the proto
is served and dialled under every version without touching this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

import grpc
from google.protobuf.message import Message

from virtlet import errors
from virtlet.cri.gen import api_pb2 as api

VERSIONS: tuple[str, ...] = ("v1", "v1alpha2")
SERVICES: tuple[str, ...] = ("RuntimeService", "ImageService")


@dataclass(frozen=True)
class MethodSpec:
    """One RPC of the v1 proto: its name, message classes and streaming kind."""

    name: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool


@cache
def methods(service: str) -> tuple[MethodSpec, ...]:
    """The v1 method table of ``service`` (``RuntimeService`` or ``ImageService``), in proto order."""
    if service not in SERVICES:
        raise errors.InvalidArgument(f"unknown CRI service {service!r}; known: {', '.join(SERVICES)}")
    desc = api.DESCRIPTOR.services_by_name[service]
    return tuple(MethodSpec(m.name, getattr(api, m.input_type.name), getattr(api, m.output_type.name),
                            m.client_streaming, m.server_streaming)
                 for m in desc.methods)


def service_name(service: str, version: str = "v1") -> str:
    """Fully qualified gRPC service name, e.g. ``runtime.v1alpha2.ImageService``."""
    if version not in VERSIONS:
        raise errors.InvalidArgument(f"unknown CRI API version {version!r}; supported: {', '.join(VERSIONS)}")
    return f"runtime.{version}.{service}"


def _method_handler(spec: MethodSpec, behaviour: Callable[..., Any]) -> grpc.RpcMethodHandler[Any, Any]:
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(spec.client_streaming, spec.server_streaming)]
    return make(behaviour, request_deserializer=spec.request.FromString,
                response_serializer=spec.response.SerializeToString)


def _unimplemented(name: str) -> Callable[..., Any]:
    def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by this servicer")

    return behaviour


def _version_naming(behaviour: Callable[..., Any], version: str) -> Callable[..., Any]:
    """``Version`` under another API version: a v1 servicer's ``runtime_api_version: v1`` becomes the version the
    caller used (containerd's v1alpha2 service answers ``v1alpha2``; a kubelet logs and may check it)."""

    def named(request: Any, context: grpc.ServicerContext) -> Any:
        reply = behaviour(request, context)
        if isinstance(reply, api.VersionResponse) and reply.runtime_api_version == "v1":
            reply.runtime_api_version = version
        return reply

    return named


def method_handlers(servicer: Any, service: str, version: str = "v1") -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """Handlers for every v1 method of ``service``, calling the servicer's method of the same name (a method
    the servicer lacks answers UNIMPLEMENTED), served under ``version``."""
    handlers = {}
    for spec in methods(service):
        behaviour = getattr(servicer, spec.name, None) or _unimplemented(spec.name)
        if spec.name == "Version" and service == "RuntimeService" and version != "v1":
            behaviour = _version_naming(behaviour, version)
        handlers[spec.name] = _method_handler(spec, behaviour)
    return handlers


def add_servicers(server: grpc.Server, runtime_servicer: Any, image_servicer: Any | None,
                  versions: Iterable[str] = VERSIONS) -> None:
    """Register the v1 servicers under the service names of every version in ``versions``.

    ``image_servicer`` may be None for a server that only offers the RuntimeService.
    """
    versions = tuple(versions)
    for version in versions:
        service_name("RuntimeService", version)  # validates before anything is registered
    for version in versions:
        for service, servicer in (("RuntimeService", runtime_servicer), ("ImageService", image_servicer)):
            if servicer is None:
                continue
            name = service_name(service, version)
            handlers = method_handlers(servicer, service, version)
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
            register = getattr(server, "add_registered_method_handlers", None)
            if register is not None:  # grpcio >= 1.62: the faster path the generated code also uses
                register(name, handlers)


class CriStub:
    """Client callables named after the CRI methods (same names and kinds as the generated stubs), bound to
    one version's service name, e.g. ``runtime_stub(ch, "v1alpha2").Version(api.VersionRequest())``."""

    def __init__(self, channel: grpc.Channel, service: str, version: str = "v1") -> None:
        self.service = service_name(service, version)
        self.version = version
        for spec in methods(service):
            make = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(spec.client_streaming, spec.server_streaming)]
            setattr(self, spec.name, make(f"/{self.service}/{spec.name}",
                                          request_serializer=spec.request.SerializeToString,
                                          response_deserializer=spec.response.FromString))

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not CRI methods
        raise AttributeError(f"{self.service} has no method {name!r}")

    def __repr__(self) -> str:
        return f"<CriStub {self.service}>"


def runtime_stub(channel: grpc.Channel, version: str = "v1") -> CriStub:
    """A RuntimeService client that calls ``/runtime.<version>.RuntimeService/<Method>``."""
    return CriStub(channel, "RuntimeService", version)


def image_stub(channel: grpc.Channel, version: str = "v1") -> CriStub:
    """An ImageService client that calls ``/runtime.<version>.ImageService/<Method>``."""
    return CriStub(channel, "ImageService", version)


def probe_version(channel: grpc.Channel, timeout: float = 5.0) -> str:
    """Which CRI version the backend on ``channel`` speaks: ``"v1"`` if it answers the v1 Version RPC, else
    ``"v1alpha2"`` if it answers that one.  UNIMPLEMENTED on one version means try the next.

    Raises ``errors.FailedPrecondition`` when the backend implements neither, ``errors.Unavailable`` when it
    cannot be reached or fails otherwise within ``timeout`` seconds (for both attempts together).
    """
    deadline = time.monotonic() + timeout
    for version in VERSIONS:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.Unavailable(f"CRI backend did not answer Version within {timeout}s")
        try:
            runtime_stub(channel, version).Version(api.VersionRequest(version=version), timeout=remaining)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                continue
            name = code.name if code is not None else type(exc).__name__
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise errors.Unavailable(f"CRI backend failed the runtime.{version} Version call: "
                                     f"{name}: {details}") from exc
        return version
    tried = ", ".join(f"runtime.{v}" for v in VERSIONS)
    raise errors.FailedPrecondition(f"CRI backend implements none of {tried} (Version is UNIMPLEMENTED)")
