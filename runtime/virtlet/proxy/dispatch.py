"""How the CRI proxy reaches its backends: one call routed by its id (through the id index) or image prefix,
or one list call fanned out to every backend at once (a failing primary fails the call; a secondary that is
down or slow is answered for by its last-known list, see ``state``, or left out if it never answered).

``CriProxy`` (``servicer``) builds the CRI methods on these.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy.backends import Backend, Backends
from virtlet.proxy.naming import PRIMARY, display
from virtlet.proxy.routing import Rules
from virtlet.proxy.state import HEX64, LIST_KINDS, ProxyState

log = logging.getLogger("virtlet.proxy")

RT = "RuntimeService"
IMG = "ImageService"
NO_DEADLINE = 3600.0

Out = Callable[[str, Any], None] | None
Fallback = Callable[[str], Any] | None
SYNC_RETRY_S = 5.0
FAN_OUT_WORKERS = 16  # secondary calls of list fan-outs in flight at once (each bounded by list_timeout)
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=FAN_OUT_WORKERS, thread_name_prefix="criproxy-fanout")


def _call_by(backend: Backend, service: str, method: str, request: Any, deadline: float) -> Any:
    """``backend.call`` with what is left of ``deadline`` (a call that waited in the pool keeps its bound)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise errors.Unavailable(f"{display(backend.name)}: no free fan-out thread before the list deadline")
    return backend.call(service, method, request, remaining)


class Dispatcher:
    """Routes calls to ``backends`` by ``rules``; remembers which secondaries are down (to log each change once)."""

    def __init__(self, backends: Backends, rules: Rules, list_timeout: float = 2.0,
                 state: ProxyState | None = None) -> None:
        self.backends = backends
        self.rules = rules
        self.list_timeout = list_timeout
        self.state = state if state is not None else ProxyState(None)
        self._down: set[str] = set()
        self._down_lock = threading.Lock()
        self._sync_tried: dict[str, float] = {}

    def split_id(self, value: str, what: str) -> tuple[str, str]:
        """``(runtime, backend id)`` of an id in a request: the legacy ``<runtime>__<id>`` form, else the id
        index, else the primary's.  While a secondary has not been listed in full since the proxy started
        and the index file was lost, a 64-hex id not in the index makes the proxy list it first (at most every
        ``SYNC_RETRY_S`` while that fails, so containerd's own ids are not slowed by a hung secondary)."""
        runtime, raw = self.rules.split_id(value, what)
        if runtime != PRIMARY or not HEX64.match(value):
            return runtime, raw
        hit = self.state.resolve(value)
        if hit is None and not self.state.index_loaded:
            for backend in self.backends.secondaries:
                if not self.state.synced(backend.name) and self._sync(backend):
                    hit = self.state.resolve(value)
                    if hit is not None:
                        break
        return hit if hit is not None else (PRIMARY, value)

    def _sync(self, backend: Backend) -> bool:
        """List ``backend``'s sandboxes and containers into the index (at most once a second while it fails)."""
        now = time.monotonic()
        if now - self._sync_tried.get(backend.name, -SYNC_RETRY_S) < SYNC_RETRY_S:
            return False
        self._sync_tried[backend.name] = now
        try:
            for method in LIST_KINDS:
                req = api.ListPodSandboxRequest() if method == "ListPodSandbox" else api.ListContainersRequest()
                self.state.remember_list(backend.name, method, backend.call(RT, method, req, self.list_timeout))
        except errors.VirtletError as exc:
            log.debug("cannot index %s yet: %s", display(backend.name), exc)
            return False
        return True

    @staticmethod
    def _timeout(context: grpc.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        if remaining is None or remaining > NO_DEADLINE:
            return None
        return max(remaining, 0.001)

    def _call(self, runtime: str, service: str, method: str, request: Any, context: grpc.ServicerContext,
              out: Out = None, raw: bool = False) -> Any:
        """The backend's answer; with ``raw``, the primary's answer stays serialized (nothing to rewrite in
        it: the kubelet gets its bytes, which saves a parse and a serialize per call)."""
        if raw and runtime == PRIMARY:
            return self.backends.primary.call_raw(service, method, request, self._timeout(context))
        resp = self.backends[runtime].call(service, method, request, self._timeout(context))
        if out is not None and runtime != PRIMARY:
            out(runtime, resp)
        return resp

    def _by_sandbox(self, method: str, request: Any, context: grpc.ServicerContext, out: Out = None) -> Any:
        runtime, request.pod_sandbox_id = self.split_id(request.pod_sandbox_id, "pod_sandbox_id")
        return self._call(runtime, RT, method, request, context, out, raw=True)

    def _by_container(self, method: str, request: Any, context: grpc.ServicerContext, out: Out = None) -> Any:
        runtime, request.container_id = self.split_id(request.container_id, "container_id")
        return self._call(runtime, RT, method, request, context, out, raw=True)

    def _by_image(self, method: str, request: Any, context: grpc.ServicerContext, out: Out = None) -> Any:
        runtime, request.image.image = self.rules.split_image(request.image.image)
        return self._call(runtime, IMG, method, request, context, out, raw=True)

    def _mark(self, backend: Backend, up: bool, reason: str = "") -> None:
        """Log a secondary going down once (warning) and coming back once (info), not every relist."""
        with self._down_lock:
            was_down = backend.name in self._down
            if up and was_down:
                self._down.discard(backend.name)
                log.info("%s at %s answers again", display(backend.name), backend.address)
            elif not up and not was_down:
                self._down.add(backend.name)
                log.warning("%s is down (lists show its last-known sandboxes and containers): %s",
                            display(backend.name), reason)

    def _fan_out(self, service: str, method: str, requests: dict[str, Any],
                 context: grpc.ServicerContext, fallback: Fallback = None,
                 raw_primary: bool = False) -> list[tuple[str, Any]]:
        """Send one request per backend at once; a failing primary fails the call.  A secondary that fails or
        is slower than ``list_timeout`` is answered for by ``fallback(name)`` (its last-known list) or, when
        that gives None, skipped; either way with one warning.

        Latency: the secondaries are asked from long-lived pool threads and the primary from the calling
        thread (grpc's ``future()`` starts a new thread per call, which cost about 0.4 ms per backend)."""
        timeout = self._timeout(context)
        pending: list[tuple[Backend, float, concurrent.futures.Future[Any]]] = []
        results: list[tuple[str, Any]] = []
        for runtime, request in requests.items():
            if runtime == PRIMARY:
                continue
            backend = self.backends[runtime]
            limit = min(self.list_timeout, timeout or self.list_timeout)
            deadline = time.monotonic() + limit
            pending.append((backend, deadline, _POOL.submit(_call_by, backend, service, method, request, deadline)))
        if PRIMARY in requests:
            call = self.backends.primary.call_raw if raw_primary else self.backends.primary.call
            results.append((PRIMARY, call(service, method, requests[PRIMARY], timeout)))
        for backend, deadline, future in pending:
            try:
                # the call has its own deadline; this bound only matters if the pool is saturated
                results.append((backend.name, future.result(max(0.0, deadline - time.monotonic()) + 0.5)))
            except (errors.VirtletError, TimeoutError) as exc:
                self._mark(backend, False, str(exc) or f"no answer within {self.list_timeout}s")
                self._stand_in(results, backend.name, fallback)
                continue
            self._mark(backend, True)
        results.sort(key=lambda r: r[0])  # the primary ("") first, then the secondaries by name
        return results

    @staticmethod
    def _stand_in(results: list[tuple[str, Any]], runtime: str, fallback: Fallback) -> None:
        known = fallback(runtime) if fallback is not None else None
        if known is not None:
            results.append((runtime, known))

    def _list(self, method: str, request: Any, context: grpc.ServicerContext, ids: tuple[str, ...],
              service: str = RT, raw_primary: bool = False) -> list[tuple[str, Any]]:
        """Fan out a list call whose ``request.filter`` may name ids (``ids`` are the filter's id fields).
        ListPodSandbox and ListContainers answers of secondaries are remembered (unfiltered ones) and stand in
        for a secondary that is down."""
        filt = request.filter if request.HasField("filter") else None
        pairs = [(name, getattr(filt, name)) for name in ids] if filt is not None else []
        targets, stripped = self.rules.list_targets(*pairs, split=self.split_id)
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
        if method not in LIST_KINDS:
            return self._fan_out(service, method, requests, context)
        stood_in: set[str] = set()

        def last_known(runtime: str) -> Any:
            stood_in.add(runtime)
            return self.state.last_list(runtime, method, requests[runtime])

        results = self._fan_out(service, method, requests, context, last_known, raw_primary)
        for runtime, resp in results:
            if runtime != PRIMARY and runtime not in stood_in and not requests[runtime].HasField("filter"):
                self.state.remember_list(runtime, method, resp)
        return results
