"""The CRI methods of the proxy: route each call, strip prefixes on the way in, add them on the way out.

Why one class for RuntimeService and ImageService: both share the routing rules and the backends, and
``virtlet.cri.versions.add_servicers`` looks methods up by name, so one object serves both services.  One
instance exists per served CRI version (only ``Version`` differs between them).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy import rewrite
from virtlet.proxy.backends import Backend, Backends
from virtlet.proxy.naming import PRIMARY, display, external_id, external_image
from virtlet.proxy.routing import Rules

log = logging.getLogger("virtlet.proxy")

RT = "RuntimeService"
IMG = "ImageService"
NO_DEADLINE = 3600.0
EVENT_RETRY_S = 1.0

Out = Callable[[str, Any], None] | None


class CriProxy:
    """Routes CRI calls between the primary runtime and the secondaries (see docs/criproxy.md)."""

    def __init__(self, backends: Backends, rules: Rules, served_version: str = "v1",
                 list_timeout: float = 2.0) -> None:
        self.backends = backends
        self.rules = rules
        self.served_version = served_version
        self.list_timeout = list_timeout
        self._down: set[str] = set()
        self._down_lock = threading.Lock()

    # -- plumbing --------------------------------------------------------------------------------------------

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
        started: list[tuple[Backend, grpc.Future]] = []
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

    # -- RuntimeService: runtime-wide ------------------------------------------------------------------------

    def Version(self, request: api.VersionRequest, context: grpc.ServicerContext) -> api.VersionResponse:
        resp = self._call(PRIMARY, RT, "Version", request, context)
        resp.runtime_api_version = self.served_version
        return resp

    def Status(self, request: api.StatusRequest, context: grpc.ServicerContext) -> api.StatusResponse:
        """The primary's status, plus one ``<name>/RuntimeReady`` condition per secondary (the kubelet only
        acts on RuntimeReady/NetworkReady, so a down virtletd does not make the node NotReady)."""
        resp = self._call(PRIMARY, RT, "Status", request, context)
        add_handlers = len(resp.runtime_handlers) > 0
        for backend in self.backends.secondaries:
            cond = resp.status.conditions.add(type=f"{backend.name}/RuntimeReady")
            try:
                limit = min(self.list_timeout, self._timeout(context) or NO_DEADLINE)
                st = backend.call(RT, "Status", api.StatusRequest(), limit)
            except errors.VirtletError as exc:
                cond.status, cond.reason, cond.message = False, "BackendUnavailable", str(exc)
                continue
            bad = [c for c in st.status.conditions if not c.status]
            cond.status = not bad and len(st.status.conditions) > 0
            if not cond.status:
                cond.reason = "BackendNotReady"
                cond.message = "; ".join(f"{c.type}: {c.reason} {c.message}".strip() for c in bad) or \
                    "no conditions reported"
            if add_handlers:
                resp.runtime_handlers.extend(st.runtime_handlers)
        if request.verbose:
            resp.info["criproxy"] = ", ".join(f"{display(b.name)}={b.address}"
                                              for b in self.backends.by_name.values())
        return resp

    def UpdateRuntimeConfig(self, request: api.UpdateRuntimeConfigRequest,
                            context: grpc.ServicerContext) -> api.UpdateRuntimeConfigResponse:
        """Goes to every backend; only the primary's failure fails the call (a down secondary is warned)."""
        for runtime, _ in self._fan_out(RT, "UpdateRuntimeConfig",
                                        dict.fromkeys(self.backends.by_name, request), context):
            log.debug("UpdateRuntimeConfig reached %s", display(runtime))
        return api.UpdateRuntimeConfigResponse()

    def RuntimeConfig(self, request: api.RuntimeConfigRequest,
                      context: grpc.ServicerContext) -> api.RuntimeConfigResponse:
        return self._call(PRIMARY, RT, "RuntimeConfig", request, context)

    # -- sandboxes -------------------------------------------------------------------------------------------

    def RunPodSandbox(self, request: api.RunPodSandboxRequest,
                      context: grpc.ServicerContext) -> api.RunPodSandboxResponse:
        runtime = self.rules.sandbox_runtime(request.runtime_handler, request.config.annotations)
        resp = self._call(runtime, RT, "RunPodSandbox", request, context)
        resp.pod_sandbox_id = external_id(runtime, resp.pod_sandbox_id)
        return resp

    def StopPodSandbox(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_sandbox("StopPodSandbox", request, context)

    def RemovePodSandbox(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_sandbox("RemovePodSandbox", request, context)

    def PodSandboxStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_sandbox("PodSandboxStatus", request, context, rewrite.sandbox_status_response)

    def PodSandboxStats(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_sandbox("PodSandboxStats", request, context,
                                lambda r, m: rewrite.sandbox_stats(r, m.stats))

    def PortForward(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_sandbox("PortForward", request, context)  # the URL points at the backend: unchanged

    def UpdatePodSandboxResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_sandbox("UpdatePodSandboxResources", request, context)

    def ListPodSandbox(self, request: api.ListPodSandboxRequest,
                       context: grpc.ServicerContext) -> api.ListPodSandboxResponse:
        resp = api.ListPodSandboxResponse()
        for runtime, part in self._list("ListPodSandbox", request, context, ("id",)):
            for item in part.items:
                item.id = external_id(runtime, item.id)
            resp.items.extend(part.items)
        return resp

    def ListPodSandboxStats(self, request: api.ListPodSandboxStatsRequest,
                            context: grpc.ServicerContext) -> api.ListPodSandboxStatsResponse:
        resp = api.ListPodSandboxStatsResponse()
        for runtime, part in self._list("ListPodSandboxStats", request, context, ("id",)):
            for item in part.stats:
                rewrite.sandbox_stats(runtime, item)
            resp.stats.extend(part.stats)
        return resp

    def ListPodSandboxMetrics(self, request: api.ListPodSandboxMetricsRequest,
                              context: grpc.ServicerContext) -> api.ListPodSandboxMetricsResponse:
        resp = api.ListPodSandboxMetricsResponse()
        requests = dict.fromkeys(self.backends.by_name, request)
        for runtime, part in self._fan_out(RT, "ListPodSandboxMetrics", requests, context):
            for item in part.pod_metrics:
                rewrite.sandbox_metrics(runtime, item)
            resp.pod_metrics.extend(part.pod_metrics)
        return resp

    def ListMetricDescriptors(self, request: api.ListMetricDescriptorsRequest,
                              context: grpc.ServicerContext) -> api.ListMetricDescriptorsResponse:
        resp = api.ListMetricDescriptorsResponse()
        seen: set[str] = set()
        requests = dict.fromkeys(self.backends.by_name, request)
        for _, part in self._fan_out(RT, "ListMetricDescriptors", requests, context):
            for d in part.descriptors:
                if d.name not in seen:
                    seen.add(d.name)
                    resp.descriptors.append(d)
        return resp

    # -- containers ------------------------------------------------------------------------------------------

    def CreateContainer(self, request: api.CreateContainerRequest,
                        context: grpc.ServicerContext) -> api.CreateContainerResponse:
        runtime, request.pod_sandbox_id = self.rules.split_id(request.pod_sandbox_id, "pod_sandbox_id")
        spec = request.config.image
        spec.image = self.rules.container_image(runtime, spec.image)
        for name in ("image_ref", "user_specified_image"):
            value = getattr(spec, name)
            if value and self.rules.split_image(value)[0] == runtime:
                setattr(spec, name, self.rules.split_image(value)[1])
        resp = self._call(runtime, RT, "CreateContainer", request, context)
        resp.container_id = external_id(runtime, resp.container_id)
        return resp

    def StartContainer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_container("StartContainer", request, context)

    def StopContainer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_container("StopContainer", request, context)

    def RemoveContainer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_container("RemoveContainer", request, context)

    def ContainerStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_container("ContainerStatus", request, context,
                                  lambda r, m: rewrite.container_status(r, m.status))

    def ContainerStats(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_container("ContainerStats", request, context,
                                  lambda r, m: rewrite.container_stats(r, m.stats))

    def UpdateContainerResources(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_container("UpdateContainerResources", request, context)

    def ReopenContainerLog(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_container("ReopenContainerLog", request, context)

    def ExecSync(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_container("ExecSync", request, context)

    def Exec(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_container("Exec", request, context)  # streaming URLs pass through unchanged

    def Attach(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_container("Attach", request, context)

    def CheckpointContainer(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_container("CheckpointContainer", request, context)

    def ListContainers(self, request: api.ListContainersRequest,
                       context: grpc.ServicerContext) -> api.ListContainersResponse:
        resp = api.ListContainersResponse()
        for runtime, part in self._list("ListContainers", request, context, ("id", "pod_sandbox_id")):
            for c in part.containers:
                rewrite.container(runtime, c)
            resp.containers.extend(part.containers)
        return resp

    def ListContainerStats(self, request: api.ListContainerStatsRequest,
                           context: grpc.ServicerContext) -> api.ListContainerStatsResponse:
        resp = api.ListContainerStatsResponse()
        for runtime, part in self._list("ListContainerStats", request, context, ("id", "pod_sandbox_id")):
            for s in part.stats:
                rewrite.container_stats(runtime, s)
            resp.stats.extend(part.stats)
        return resp

    def GetContainerEvents(self, request: api.GetEventsRequest,
                           context: grpc.ServicerContext) -> Iterator[api.ContainerEventResponse]:
        """Merges the event streams of all backends; a backend whose stream breaks is re-subscribed every
        second until the kubelet goes away; one that does not implement events is left out."""
        events: queue.Queue[api.ContainerEventResponse] = queue.Queue()
        stop = threading.Event()
        calls: list[Any] = []
        lock = threading.Lock()

        def pump(backend: Backend) -> None:
            while not stop.is_set():
                try:
                    call = backend.stream(RT, "GetContainerEvents", request)
                    with lock:
                        calls.append(call)
                    if stop.is_set():
                        call.cancel()
                    for event in call:
                        rewrite.container_event(backend.name, event)
                        events.put(event)
                except grpc.RpcError as exc:
                    if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                        log.info("%s does not implement GetContainerEvents", display(backend.name))
                        return
                except errors.VirtletError:
                    pass
                stop.wait(EVENT_RETRY_S)

        def finish() -> None:
            stop.set()
            with lock:
                for call in calls:
                    call.cancel()

        context.add_callback(finish)
        threads = [threading.Thread(target=pump, args=(b,), daemon=True, name=f"events-{b.name or 'primary'}")
                   for b in self.backends.by_name.values()]
        for t in threads:
            t.start()
        try:
            while context.is_active():
                try:
                    yield events.get(timeout=EVENT_RETRY_S)
                except queue.Empty:
                    continue
        finally:
            finish()

    # -- ImageService ----------------------------------------------------------------------------------------

    def ListImages(self, request: api.ListImagesRequest,
                   context: grpc.ServicerContext) -> api.ListImagesResponse:
        name = request.filter.image.image if request.HasField("filter") else ""
        targets, raw = self.rules.image_list_targets(name)
        requests: dict[str, Any] = {}
        for runtime in sorted(targets):
            req = request
            if name and runtime != PRIMARY:
                req = api.ListImagesRequest()
                req.CopyFrom(request)
                req.filter.image.image = raw
            requests[runtime] = req
        resp = api.ListImagesResponse()
        for runtime, part in self._fan_out(IMG, "ListImages", requests, context):
            for img in part.images:
                rewrite.image(runtime, img)
            resp.images.extend(part.images)
        return resp

    def ImageStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_image("ImageStatus", request, context,
                              lambda r, m: rewrite.image(r, m.image) if m.HasField("image") else None)

    def PullImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        def out(runtime: str, resp: Any) -> None:
            resp.image_ref = external_image(runtime, resp.image_ref)

        return self._by_image("PullImage", request, context, out)

    def RemoveImage(self, request: Any, context: grpc.ServicerContext) -> Any:
        return self._by_image("RemoveImage", request, context)

    def ImageFsInfo(self, request: api.ImageFsInfoRequest,
                    context: grpc.ServicerContext) -> api.ImageFsInfoResponse:
        resp = api.ImageFsInfoResponse()
        requests = dict.fromkeys(self.backends.by_name, request)
        for _, part in self._fan_out(IMG, "ImageFsInfo", requests, context):
            resp.image_filesystems.extend(part.image_filesystems)
            resp.container_filesystems.extend(part.container_filesystems)
        return resp
