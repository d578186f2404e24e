"""Connections to the CRI backends: one gRPC channel each, the CRI version it speaks, errors relayed.

Why: backends come and go (virtletd restarts, containerd upgrades).  gRPC channels reconnect by themselves;
here the reconnect backoff is kept short so routing resumes within about a second, and the CRI version is
probed once per connection (again after every disconnect, since a restarted backend may speak another
version).  Calls never wait for a backend to come up (``wait_for_ready=False``): a down backend answers
UNAVAILABLE at once, which keeps the kubelet's one-second relist from stalling.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import grpc

from virtlet import errors
from virtlet.cri import versions
from virtlet.proxy.naming import PRIMARY, display

log = logging.getLogger("virtlet.proxy")

MAX_MESSAGE = 16 * 1024 * 1024
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class BackendError(errors.VirtletError):
    """A backend's own gRPC status, relayed to the kubelet with the backend named in the message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Backend:
    """One runtime behind the proxy (``name`` is ``PRIMARY`` or a secondary such as ``virtlet.cloud``)."""

    def __init__(self, name: str, address: str, probe_timeout: float = 5.0) -> None:
        self.name = name
        self.address = address
        self.probe_timeout = probe_timeout
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self._lock = threading.Lock()
        self._version: str | None = None
        self._stubs: dict[str, tuple[versions.CriStub, versions.CriStub]] = {}
        self._raw: dict[tuple[str, str, str], Any] = {}  # (version, service, method) -> bytes-answer callable
        self.channel.subscribe(self._on_state, try_to_connect=False)

    def __repr__(self) -> str:
        return f"<Backend {display(self.name)} {self.address}>"

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        if state is not grpc.ChannelConnectivity.READY and state is not grpc.ChannelConnectivity.CONNECTING:
            self._version = None  # the connection is gone: the next call probes the (maybe new) backend

    def version(self, probe_timeout: float | None = None) -> str:
        """The CRI version this backend answers (probed now when not known for this connection)."""
        version = self._version
        if version is not None:
            return version
        with self._lock:
            if self._version is None:
                try:
                    self._version = versions.probe_version(self.channel, probe_timeout or self.probe_timeout)
                except errors.VirtletError as exc:
                    raise type(exc)(f"{display(self.name)} at {self.address}: {exc}") from exc
                log.info("%s at %s speaks CRI %s", display(self.name), self.address, self._version)
            return self._version

    def stub(self, service: str, probe_timeout: float | None = None) -> versions.CriStub:
        """The RuntimeService or ImageService client in the backend's version."""
        version = self.version(min(probe_timeout, self.probe_timeout) if probe_timeout else None)
        stubs = self._stubs.get(version)
        if stubs is None:
            stubs = (versions.runtime_stub(self.channel, version), versions.image_stub(self.channel, version))
            self._stubs[version] = stubs
        return stubs[0] if service == "RuntimeService" else stubs[1]

    def relay(self, exc: grpc.RpcError) -> BackendError:
        """The backend's failure as an error for the kubelet (UNAVAILABLE says which runtime is down)."""
        code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            self._version = None
            return BackendError(code, f"{display(self.name)} at {self.address} is unavailable: {details}")
        return BackendError(code, details if self.name == PRIMARY else f"{display(self.name)}: {details}")

    def call(self, service: str, method: str, request: Any, timeout: float | None) -> Any:
        """A unary call; the backend's error status is raised as BackendError."""
        fn = getattr(self.stub(service, timeout), method)
        try:
            return fn(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise self.relay(exc) from None

    def call_raw(self, service: str, method: str, request: Any, timeout: float | None) -> bytes:
        """``call`` with the answer left serialized (for the kubelet unchanged: no parse, no re-serialize)."""
        version = self.version(min(timeout, self.probe_timeout) if timeout else None)
        fn = self._raw.get((version, service, method))
        if fn is None:
            spec = next(s for s in versions.methods(service) if s.name == method)
            fn = self.channel.unary_unary(f"/{versions.service_name(service, version)}/{method}",
                                          request_serializer=spec.request.SerializeToString,
                                          response_deserializer=None)
            self._raw[(version, service, method)] = fn
        try:
            answer: bytes = fn(request, timeout=timeout)
            return answer
        except grpc.RpcError as exc:
            raise self.relay(exc) from None

    def stream(self, service: str, method: str, request: Any, timeout: float | None = None) -> Any:
        """A server-streaming call (an iterator that is also a grpc.Call, so it can be cancelled)."""
        return getattr(self.stub(service), method)(request, timeout=timeout)

    def close(self) -> None:
        self.channel.unsubscribe(self._on_state)
        self.channel.close()


class Backends:
    """The primary and the secondaries, by name."""

    def __init__(self, primary: str, secondaries: dict[str, str], probe_timeout: float = 5.0) -> None:
        self.by_name: dict[str, Backend] = {PRIMARY: Backend(PRIMARY, primary, probe_timeout)}
        for name, address in secondaries.items():
            self.by_name[name] = Backend(name, address, probe_timeout)

    def __getitem__(self, name: str) -> Backend:
        return self.by_name[name]

    @property
    def primary(self) -> Backend:
        return self.by_name[PRIMARY]

    @property
    def secondaries(self) -> list[Backend]:
        return [b for n, b in self.by_name.items() if n != PRIMARY]

    def close(self) -> None:
        for backend in self.by_name.values():
            backend.close()
