"""How the CRI proxy reaches its backends: one call routed by an id or image prefix, or one list call fanned
out to every backend at once (a secondary that is down or slow is left out, a failing primary fails the call).

``CriProxy`` (``servicer``) builds the CRI methods on these.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

from virtlet import errors
from virtlet.proxy.backends import Backend, Backends
from virtlet.proxy.naming import PRIMARY, display
from virtlet.proxy.routing import Rules

log = logging.getLogger("virtlet.proxy")

RT = "RuntimeService"
IMG = "ImageService"
NO_DEADLINE = 3600.0

Out = Callable[[str, Any], None] | None


class Dispatcher:
    """Routes calls to ``backends`` by ``rules``; remembers which secondaries are down (to log each change once)."""

    def __init__(self, backends: Backends, rules: Rules, list_timeout: float = 2.0) -> None:
        self.backends = backends
        self.rules = rules
        self.list_timeout = list_timeout
        self._down: set[str] = set()
        self._down_lock = threading.Lock()


    @staticmethod
    def _timeout(context: grpc.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        if remaining is None or remaining > NO_DEADLINE:
            return None
        return max(remaining, 0.001)

    def _call(self, runtime: str, service: str, method: str, request: Any, context: grpc.ServicerContext,
              out: Out = None) -> Any:
        resp = self.backends[runtime].call(service, method, request, self._timeout(context))
        if out is not None and runtime != PRIMARY:
            out(runtime, resp)
        return resp

    def _by_sandbox(self, method: str, request: Any, context: grpc.ServicerContext, out: Out = None) -> Any:
        runtime, request.pod_sandbox_id = self.rules.split_id(request.pod_sandbox_id, "pod_sandbox_id")
        return self._call(runtime, RT, method, request, context, out)

    def _by_container(self, method: str, request: Any, context: grpc.ServicerContext, out: Out = None) -> Any:
        runtime, request.container_id = self.rules.split_id(request.container_id, "container_id")
        return self._call(runtime, RT, method, request, context, out)

    def _by_image(self, method: str, request: Any, context: grpc.ServicerContext, out: Out = None) -> Any:
        runtime, request.image.image = self.rules.split_image(request.image.image)
        return self._call(runtime, IMG, method, request, context, out)

    def _mark(self, backend: Backend, up: bool, reason: str = "") -> None:
        """Log a secondary going down once (warning) and coming back once (info), not every relist."""
        with self._down_lock:
            was_down = backend.name in self._down
            if up and was_down:
                self._down.discard(backend.name)
                log.info("%s at %s answers again", display(backend.name), backend.address)
            elif not up and not was_down:
                self._down.add(backend.name)
                log.warning("%s is left out of lists while it is down: %s", display(backend.name), reason)

    def _fan_out(self, service: str, method: str, requests: dict[str, Any],
                 context: grpc.ServicerContext) -> list[tuple[str, Any]]:
        """Send one request per backend at once; a secondary that fails or is slower than ``list_timeout`` is
        skipped (with a warning), a failing primary fails the call."""
        timeout = self._timeout(context)
        started: list[tuple[Backend, grpc.Future[Any]]] = []
        for runtime, request in requests.items():
            backend = self.backends[runtime]
            limit = timeout if runtime == PRIMARY else min(self.list_timeout, timeout or self.list_timeout)
            try:
                started.append((backend, backend.future(service, method, request, limit)))
            except errors.VirtletError as exc:  # the version probe failed: the backend is down
                if runtime == PRIMARY:
                    raise
                self._mark(backend, False, str(exc))
        results = []
        for backend, future in started:
            try:
                results.append((backend.name, future.result()))
            except grpc.RpcError as exc:
                err = backend.relay(exc)
                if backend.name == PRIMARY:
                    raise err from None
                self._mark(backend, False, str(err))
                continue
            if backend.name != PRIMARY:
                self._mark(backend, True)
        return results

    def _list(self, method: str, request: Any, context: grpc.ServicerContext, ids: tuple[str, ...],
              service: str = RT) -> list[tuple[str, Any]]:
        """Fan out a list call whose ``request.filter`` may name ids (``ids`` are the filter's id fields)."""
        filt = request.filter if request.HasField("filter") else None
        pairs = [(name, getattr(filt, name)) for name in ids] if filt is not None else []
        targets, stripped = self.rules.list_targets(*pairs)
        requests: dict[str, Any] = {}
        for runtime in sorted(targets):  # PRIMARY ("") first
            if stripped and runtime != PRIMARY:
                req = type(request)()
                req.CopyFrom(request)
                for name, value in stripped.items():
                    setattr(req.filter, name, value)
                requests[runtime] = req
            else:
                requests[runtime] = request
        return self._fan_out(service, method, requests, context)
