"""The CRI methods of the proxy: route each call, strip prefixes on the way in, add them on the way out.

Why one class for RuntimeService and ImageService: both share the routing rules and the backends, and
``virtlet.cri.versions.add_servicers`` looks methods up by name, so one object serves both services.  One
instance exists per served CRI version (only ``Version`` differs between them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from virtlet import errors
from virtlet.cri import stream_lists
from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.stream_lists import StreamListCalls
from virtlet.proxy import rewrite
from virtlet.proxy.backends import Backends
from virtlet.proxy.dispatch import IMG, NO_DEADLINE, RT, Dispatcher
from virtlet.proxy.events import merged_events
from virtlet.proxy.naming import PRIMARY, display, external_image
from virtlet.proxy.routing import Rules
from virtlet.proxy.state import CONTAINER, SANDBOX, ProxyState

log = logging.getLogger("virtlet.proxy")


class CriProxy(StreamListCalls, Dispatcher):
    """Routes CRI calls between the primary runtime and the secondaries (see docs/criproxy.md).

    The ``Stream*`` list calls (``StreamListCalls``) are the merged ``List*`` answers below sent in batches:
    same fan-out, same id rewriting, same last-known stand-ins for a down secondary.  Backends are asked with
    ``List*`` (containerd 1.6 has no ``Stream*``), so one backend's list is still bounded by the 16 MiB message
    limit; the kubelet's merged view is not.
    """

    def __init__(self, backends: Backends, rules: Rules, served_version: str = "v1",
                 list_timeout: float = 2.0, state: ProxyState | None = None) -> None:
        super().__init__(backends, rules, list_timeout, state)
        self.served_version = served_version

    # -- RuntimeService: runtime-wide ------------------------------------------------------------------------

    def Version(self, request: api.VersionRequest, context: grpc.ServicerContext) -> api.VersionResponse | bytes:
        if self.backends.primary.version() == self.served_version:  # its answer already names this version
            raw: bytes = self._call(PRIMARY, RT, "Version", request, context, raw=True)
            return raw
        resp: api.VersionResponse = self._call(PRIMARY, RT, "Version", request, context)
        resp.runtime_api_version = self.served_version
        return resp

    def Status(self, request: api.StatusRequest, context: grpc.ServicerContext) -> api.StatusResponse:
        """The primary's status, plus one ``<name>/RuntimeReady`` condition per secondary (the kubelet only
        acts on RuntimeReady/NetworkReady, so a down virtletd does not make the node NotReady)."""
        resp: api.StatusResponse = self._call(PRIMARY, RT, "Status", request, context)
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
        resp: api.RuntimeConfigResponse = self._call(PRIMARY, RT, "RuntimeConfig", request, context)
        return resp

    # -- sandboxes -------------------------------------------------------------------------------------------

    def RunPodSandbox(self, request: api.RunPodSandboxRequest,
                      context: grpc.ServicerContext) -> api.RunPodSandboxResponse:
        runtime = self.rules.sandbox_runtime(request.runtime_handler, request.config.annotations)
        resp: api.RunPodSandboxResponse = self._call(runtime, RT, "RunPodSandbox", request, context)
        resp.pod_sandbox_id = self.state.record(runtime, SANDBOX, resp.pod_sandbox_id)
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

    def ListPodSandbox(self, request: api.ListPodSandboxRequest,  # type: ignore[override]  # bytes: see below
                       context: grpc.ServicerContext) -> bytes:
        """The primary's answer is passed on as bytes (nothing in it is rewritten) and the secondaries'
        appended: a list message is its repeated items, so serialized answers concatenate into the merged one."""
        chunks: list[bytes] = []
        for runtime, part in self._list("ListPodSandbox", request, context, ("id",), raw_primary=True):
            if runtime == PRIMARY:
                chunks.append(part)
                continue
            for item in part.items:
                item.id = self.state.record(runtime, SANDBOX, item.id)
            chunks.append(part.SerializeToString())
        return b"".join(chunks)

    def StreamPodSandboxes(self, request: api.StreamPodSandboxesRequest,
                           context: grpc.ServicerContext) -> Iterable[api.StreamPodSandboxesResponse]:
        merged = self.ListPodSandbox(api.ListPodSandboxRequest(filter=request.filter), context)
        items = api.ListPodSandboxResponse.FromString(merged).items
        return stream_lists.stream(items, lambda b: api.StreamPodSandboxesResponse(pod_sandboxes=b))

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
        runtime, request.pod_sandbox_id = self.split_id(request.pod_sandbox_id, "pod_sandbox_id")
        spec = request.config.image
        spec.image = self.rules.container_image(runtime, spec.image)
        for name in ("image_ref", "user_specified_image"):
            value = getattr(spec, name)
            if value and self.rules.split_image(value)[0] == runtime:
                setattr(spec, name, self.rules.split_image(value)[1])
        resp: api.CreateContainerResponse = self._call(runtime, RT, "CreateContainer", request, context)
        resp.container_id = self.state.record(runtime, CONTAINER, resp.container_id)
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

    def ListContainers(self, request: api.ListContainersRequest,  # type: ignore[override]  # bytes: see below
                       context: grpc.ServicerContext) -> bytes:
        """Merged as bytes, as ListPodSandbox."""
        chunks: list[bytes] = []
        for runtime, part in self._list("ListContainers", request, context, ("id", "pod_sandbox_id"),
                                        raw_primary=True):
            if runtime == PRIMARY:
                chunks.append(part)
                continue
            for c in part.containers:
                self.state.record(runtime, CONTAINER, c.id)
                rewrite.container(runtime, c)
            chunks.append(part.SerializeToString())
        return b"".join(chunks)

    def StreamContainers(self, request: api.StreamContainersRequest,
                         context: grpc.ServicerContext) -> Iterable[api.StreamContainersResponse]:
        merged = self.ListContainers(api.ListContainersRequest(filter=request.filter), context)
        items = api.ListContainersResponse.FromString(merged).containers
        return stream_lists.stream(items, lambda b: api.StreamContainersResponse(containers=b))

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
        return merged_events(self.backends, request, context)

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
