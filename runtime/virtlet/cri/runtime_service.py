"""CRI RuntimeService: thin servicers.  Each method validates its request, calls one domain operation and builds
the reply; it knows nothing of libvirt XML or netlink.  Methods a later part of virtlet implements answer
UNIMPLEMENTED with a message that says so (see ``_unimplemented``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

import virtlet
from virtlet import errors, preconditions
from virtlet.cri import stats_pb, validation
from virtlet.cri.container_status import container_state, container_status, stored_config
from virtlet.cri.cri_metrics import MetricsCalls
from virtlet.cri.events import ContainerEvents, EventCalls
from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.gen import api_pb2_grpc as api_grpc
from virtlet.cri.ports import Containers, StreamingUrls
from virtlet.cri.stream_lists import StreamListCalls
from virtlet.network import capabilities as net_capabilities
from virtlet.sandbox.manager import SandboxManager, SandboxSpec
from virtlet.state import store as st
from virtlet.vm import annotations as vm_annotations
from virtlet.vm import guest_agent as ga
from virtlet.volumes.devices import DeviceRequest

log = logging.getLogger(__name__)

RUNTIME_NAME = "virtlet"
RUNTIME_API_VERSION = "v1"
HANDLER = "virtlet"

def _sandbox_state(state: str) -> api.PodSandboxState:
    return api.SANDBOX_READY if state == st.SANDBOX_READY else api.SANDBOX_NOTREADY


def _metadata(rec: st.SandboxRecord) -> api.PodSandboxMetadata:
    return api.PodSandboxMetadata(name=rec.name, namespace=rec.namespace, uid=rec.uid, attempt=rec.attempt)


class RuntimeServicer(MetricsCalls, EventCalls, StreamListCalls, api_grpc.RuntimeServiceServicer):
    """CRI RuntimeService of virtletd, built by the daemon with every part it uses: the sandbox manager, the VM
    manager (``containers``) and the streaming service.  Without ``containers``/``streaming`` (unit tests of
    other calls) the calls that need them answer UNAVAILABLE."""

    def __init__(self, sandboxes: SandboxManager, status_probe: Callable[[], list[api.RuntimeCondition]],
                 status_info: Callable[[], dict[str, str]] | None = None, *,
                 containers: Containers | None = None, streaming: StreamingUrls | None = None) -> None:
        self.sandboxes = sandboxes
        self.store = sandboxes.store
        self.status_probe = status_probe
        self.status_info = status_info or (lambda: {})
        self.pod_cidr = ""
        self.containers = containers
        self.streaming = streaming
        self.events = ContainerEvents(self.store, self._event_statuses)  # GetContainerEvents (virtlet.cri.events)

    # -- runtime ---------------------------------------------------------------------------------------
    def Version(self, request: api.VersionRequest, context: grpc.ServicerContext) -> api.VersionResponse:
        return api.VersionResponse(version="0.1.0", runtime_name=RUNTIME_NAME,
                                   runtime_version=virtlet.__version__, runtime_api_version=RUNTIME_API_VERSION)

    def Status(self, request: api.StatusRequest, context: grpc.ServicerContext) -> api.StatusResponse:
        resp = api.StatusResponse(status=api.RuntimeStatus(conditions=self.status_probe()))
        resp.runtime_handlers.add(name=HANDLER)
        if request.verbose:
            resp.info.update(self.status_info())
        return resp

    def RuntimeConfig(self, request: api.RuntimeConfigRequest,
                      context: grpc.ServicerContext) -> api.RuntimeConfigResponse:
        # VM pods are not in kubelet-managed cgroups; report the driver of the systemd nodes virtlet targets.
        return api.RuntimeConfigResponse(linux=api.LinuxRuntimeConfiguration(cgroup_driver=api.SYSTEMD))

    def UpdateRuntimeConfig(self, request: api.UpdateRuntimeConfigRequest,
                            context: grpc.ServicerContext) -> api.UpdateRuntimeConfigResponse:
        self.pod_cidr = request.runtime_config.network_config.pod_cidr
        log.info("runtime config updated: pod CIDR %r", self.pod_cidr)
        return api.UpdateRuntimeConfigResponse()

    # -- sandboxes -------------------------------------------------------------------------------------
    def RunPodSandbox(self, request: api.RunPodSandboxRequest,
                      context: grpc.ServicerContext) -> api.RunPodSandboxResponse:
        cfg = request.config
        if not request.HasField("config") or not cfg.HasField("metadata"):
            raise errors.InvalidArgument("RunPodSandbox: config.metadata (name, namespace, uid) is required")
        md = cfg.metadata
        validation.pod_metadata(md)
        vm_annotations.check_annotation_sizes(cfg.annotations, "pod")  # stored in the state db: bounded first
        net_capabilities.from_annotations(cfg.annotations)  # bad bandwidth/IP/MAC values: refused before any work
        validation.labels_size(cfg.labels)
        # The one conversion of the PodSandboxConfig: below this layer a sandbox is typed facts, never a proto.
        spec = SandboxSpec(
            name=md.name, namespace=md.namespace, uid=md.uid, attempt=md.attempt,
            hostname=cfg.hostname or md.name, runtime_handler=request.runtime_handler,
            labels=dict(cfg.labels), annotations=dict(cfg.annotations), log_directory=cfg.log_directory,
            port_mappings=[json_format.MessageToDict(p, preserving_proto_field_name=True)
                           for p in cfg.port_mappings],
            dns={"servers": list(cfg.dns_config.servers), "searches": list(cfg.dns_config.searches),
                 "options": list(cfg.dns_config.options)})
        rec = self.sandboxes.run(spec)
        return api.RunPodSandboxResponse(pod_sandbox_id=rec.id)

    def StopPodSandbox(self, request: api.StopPodSandboxRequest,
                       context: grpc.ServicerContext) -> api.StopPodSandboxResponse:
        validation.require_id(request.pod_sandbox_id, "pod_sandbox_id")
        self.sandboxes.stop(request.pod_sandbox_id)
        return api.StopPodSandboxResponse()

    def RemovePodSandbox(self, request: api.RemovePodSandboxRequest,
                         context: grpc.ServicerContext) -> api.RemovePodSandboxResponse:
        validation.require_id(request.pod_sandbox_id, "pod_sandbox_id")
        self.sandboxes.remove(request.pod_sandbox_id)  # VMs, network, namespace, record: in that order
        return api.RemovePodSandboxResponse()

    def PodSandboxStatus(self, request: api.PodSandboxStatusRequest,
                         context: grpc.ServicerContext) -> api.PodSandboxStatusResponse:
        validation.require_id(request.pod_sandbox_id, "pod_sandbox_id")
        rec = self.store.require_sandbox(request.pod_sandbox_id)
        status = api.PodSandboxStatus(
            id=rec.id, metadata=_metadata(rec), state=_sandbox_state(rec.state), created_at=rec.created_at,
            labels=rec.labels, annotations=rec.annotations, runtime_handler=rec.runtime_handler)
        ips = rec.network.pod_ips if rec.network is not None else []
        if ips:
            status.network.ip = ips[0]
            for extra in ips[1:]:
                status.network.additional_ips.add(ip=extra)
        # VM pods have their own network namespace (POD mode) and no shared PID/IPC with the host.
        status.linux.namespaces.options.network = api.POD
        status.linux.namespaces.options.pid = api.POD
        status.linux.namespaces.options.ipc = api.POD
        resp = api.PodSandboxStatusResponse(status=status)
        if request.verbose:
            network = {**rec.network.to_dict(), "pod_ips": rec.network.pod_ips} if rec.network is not None else {}
            info = {"id": rec.id, "state": rec.state, "netns": rec.netns, "network": network,
                    "hostname": rec.hostname, "log_directory": rec.log_directory,
                    "network_torn_down": rec.network_torn_down, "runtime_handler": rec.runtime_handler}
            resp.info["info"] = json.dumps(info, sort_keys=True)
        resp.containers_statuses.extend(self.statuses_for_sandbox(rec.id, rec.log_directory))
        return resp

    def ListPodSandbox(self, request: api.ListPodSandboxRequest,
                       context: grpc.ServicerContext) -> api.ListPodSandboxResponse:
        flt = request.filter
        if flt.label_selector:
            validation.label_selector(dict(flt.label_selector))
        items = []
        for rec in self.store.list_sandboxes():
            if rec.state == st.SANDBOX_CREATING:
                continue
            if flt.id and not rec.id.startswith(flt.id):
                continue
            if flt.HasField("state") and _sandbox_state(rec.state) != flt.state.state:
                continue
            if any(rec.labels.get(k) != v for k, v in flt.label_selector.items()):
                continue
            items.append(api.PodSandbox(
                id=rec.id, metadata=_metadata(rec), state=_sandbox_state(rec.state), created_at=rec.created_at,
                labels=rec.labels, annotations=rec.annotations, runtime_handler=rec.runtime_handler))
        return api.ListPodSandboxResponse(items=items)

    # -- containers (VMs) ------------------------------------------------------------------------------
    def _vms(self) -> Containers:
        if self.containers is None:
            raise errors.Unavailable("virtletd runs without a VM manager (libvirt unavailable at start-up)")
        return self.containers

    def CreateContainer(self, request: api.CreateContainerRequest,
                        context: grpc.ServicerContext) -> api.CreateContainerResponse:
        from virtlet.vm.annotations import CpuResources
        from virtlet.vm.manager import ContainerSpec
        from virtlet.volumes.mounts import CriMount

        validation.require_id(request.pod_sandbox_id, "pod_sandbox_id")
        cfg = request.config
        if not request.HasField("config") or not cfg.HasField("metadata") or not cfg.metadata.name:
            raise errors.InvalidArgument("CreateContainer: config.metadata.name is required")
        validation.container_security_context(cfg, request.sandbox_config)
        res = cfg.linux.resources if cfg.HasField("linux") and cfg.linux.HasField("resources") else None
        spec = ContainerSpec(
            sandbox_id=request.pod_sandbox_id, name=cfg.metadata.name, attempt=cfg.metadata.attempt,
            image=cfg.image.image, labels=dict(cfg.labels), annotations=dict(cfg.annotations),
            envs=[(e.key, e.value) for e in cfg.envs], log_path=cfg.log_path,
            memory_limit_bytes=res.memory_limit_in_bytes if res is not None else 0,
            cpu=CpuResources.from_cri(res), tty=cfg.tty, stdin=cfg.stdin, config=cfg.SerializeToString(),
            mounts=tuple(CriMount(container_path=m.container_path, host_path=m.host_path, readonly=m.readonly)
                         for m in cfg.mounts),
            devices=[DeviceRequest(d.host_path, d.container_path, d.permissions) for d in cfg.devices])
        rec = self._vms().create(spec)
        return api.CreateContainerResponse(container_id=rec.id)

    def StartContainer(self, request: api.StartContainerRequest,
                       context: grpc.ServicerContext) -> api.StartContainerResponse:
        validation.require_id(request.container_id, "container_id")
        self._vms().start(request.container_id)
        return api.StartContainerResponse()

    def StopContainer(self, request: api.StopContainerRequest,
                      context: grpc.ServicerContext) -> api.StopContainerResponse:
        validation.require_id(request.container_id, "container_id")
        self._vms().stop(request.container_id, int(request.timeout))
        return api.StopContainerResponse()

    def RemoveContainer(self, request: api.RemoveContainerRequest,
                        context: grpc.ServicerContext) -> api.RemoveContainerResponse:
        validation.require_id(request.container_id, "container_id")
        self._vms().remove(request.container_id)
        return api.RemoveContainerResponse()

    def ReopenContainerLog(self, request: api.ReopenContainerLogRequest,
                           context: grpc.ServicerContext) -> api.ReopenContainerLogResponse:
        validation.require_id(request.container_id, "container_id")
        self._vms().reopen_log(request.container_id)
        return api.ReopenContainerLogResponse()

    def ContainerStatus(self, request: api.ContainerStatusRequest,
                        context: grpc.ServicerContext) -> api.ContainerStatusResponse:
        validation.require_id(request.container_id, "container_id")
        rec = self.store.require_container(request.container_id)
        resp = api.ContainerStatusResponse(status=container_status(rec, self._log_dir(rec.sandbox_id)))
        if request.verbose and self.containers is not None:
            info = {"id": rec.id, "sandbox_id": rec.sandbox_id, "extra": rec.extra,
                    "qemu_pid": self.containers.qemu_pid(rec.id), "domain_xml": self.containers.domain_xml(rec.id)}
            resp.info["info"] = json.dumps(info, sort_keys=True)
        return resp

    def ListContainers(self, request: api.ListContainersRequest,
                       context: grpc.ServicerContext) -> api.ListContainersResponse:
        flt = request.filter
        if flt.label_selector:
            validation.label_selector(dict(flt.label_selector))
        items = []
        for rec in self.store.list_containers(flt.pod_sandbox_id or None):
            if flt.id and not rec.id.startswith(flt.id):
                continue
            if flt.HasField("state") and container_state(rec.state) != flt.state.state:
                continue
            if any(rec.labels.get(k) != v for k, v in flt.label_selector.items()):
                continue
            items.append(api.Container(
                id=rec.id, pod_sandbox_id=rec.sandbox_id, metadata=api.ContainerMetadata(
                    name=rec.name, attempt=rec.attempt), image=api.ImageSpec(image=rec.image), image_ref=rec.image_ref,
                state=container_state(rec.state), created_at=rec.created_at, labels=rec.labels,
                annotations=rec.annotations))
        return api.ListContainersResponse(containers=items)

    # -- stats (numbers explained in virtlet.vm.stats) ---------------------------------------------------
    def ContainerStats(self, request: api.ContainerStatsRequest,
                       context: grpc.ServicerContext) -> api.ContainerStatsResponse:
        validation.require_id(request.container_id, "container_id")
        rec = self.store.require_container(request.container_id)
        return api.ContainerStatsResponse(stats=stats_pb.container_stats(self._vms().container_stats(rec)))

    def ListContainerStats(self, request: api.ListContainerStatsRequest,
                           context: grpc.ServicerContext) -> api.ListContainerStatsResponse:
        flt = request.filter
        records = _select(self.store.list_containers(flt.pod_sandbox_id or None), flt.id, dict(flt.label_selector))
        vms = self._vms()
        return api.ListContainerStatsResponse(
            stats=[stats_pb.container_stats(vms.container_stats(rec)) for rec in records])

    def PodSandboxStats(self, request: api.PodSandboxStatsRequest,
                        context: grpc.ServicerContext) -> api.PodSandboxStatsResponse:
        validation.require_id(request.pod_sandbox_id, "pod_sandbox_id")
        rec = self.store.require_sandbox(request.pod_sandbox_id)
        return api.PodSandboxStatsResponse(stats=stats_pb.sandbox_stats(self._vms().sandbox_stats(rec)))

    def ListPodSandboxStats(self, request: api.ListPodSandboxStatsRequest,
                            context: grpc.ServicerContext) -> api.ListPodSandboxStatsResponse:
        flt = request.filter
        live = [r for r in self.store.list_sandboxes() if r.state != st.SANDBOX_CREATING]
        records = _select(live, flt.id, dict(flt.label_selector))
        vms = self._vms()
        return api.ListPodSandboxStatsResponse(stats=[stats_pb.sandbox_stats(vms.sandbox_stats(r)) for r in records])

    def UpdateContainerResources(self, request: api.UpdateContainerResourcesRequest,
                                 context: grpc.ServicerContext) -> api.UpdateContainerResourcesResponse:
        # What QEMU applies live is applied (virtlet.vm.lifecycle.update_resources): memory by balloon up to the VM's
        # size at create, vCPU hot-plug for a CPU limit above the VM's vCPUs up to VirtletMaxVCPUs (beyond it
        # FAILED_PRECONDITION), pinning to host CPUs (cpuset_cpus: the kubelet's static CPU manager sends it),
        # CPU shares/quota/period; a NUMA memory node change (cpuset_mems) is FAILED_PRECONDITION (QEMU's guest
        # memory stays where it was allocated); fields with no meaning for a VM (OOM score, hugepages, swap,
        # unified cgroup keys) are ignored as at CreateContainer.  Never OK for a change that was not applied.
        from virtlet.vm.manager import ResourceUpdate

        validation.require_id(request.container_id, "container_id")
        rec = self.store.require_container(request.container_id)
        res = request.linux
        if request.HasField("linux"):
            created = stored_config(rec).linux.resources.cpuset_mems
            if res.cpuset_mems and res.cpuset_mems != created:
                raise errors.FailedPrecondition(
                    f"UpdateContainerResources: linux.cpuset_mems {res.cpuset_mems[:64]!r}: a VM's memory cannot move "
                    f"to other NUMA nodes live (it is {created or 'unset'!r}); recreate the pod")
        self._vms().update_resources(request.container_id, ResourceUpdate(
            memory_limit_bytes=res.memory_limit_in_bytes, cpu_shares=res.cpu_shares, cpu_quota=res.cpu_quota,
            cpu_period=res.cpu_period, cpuset_cpus=res.cpuset_cpus))
        return api.UpdateContainerResourcesResponse()

    def ExecSync(self, request: api.ExecSyncRequest, context: grpc.ServicerContext) -> api.ExecSyncResponse:
        # Runs through the QEMU guest agent (virtlet.vm.guest_agent): exit code and output of a finished command;
        # a command past request.timeout answers DEADLINE_EXCEEDED (the kubelet's probe timeout).  Sent while the
        # VM boots, it first waits for the agent to connect: within request.timeout, or (timeout 0, "no limit")
        # for at most ga.AGENT_WAIT_DEFAULT seconds, then FAILED_PRECONDITION saying the agent never answered.
        validation.require_id(request.container_id, "container_id")
        preconditions.require_cmd("ExecSync", request.cmd)
        preconditions.container_running("ExecSync", request.container_id,
                                         self.store.require_container(request.container_id).state)
        agent = self._vms().guest_agent(request.container_id)
        # stdout + stderr are truncated together at ga.EXEC_SYNC_OUTPUT_CAP (16 MiB less the response's framing,
        # so it fits the kubelet's 16 MiB message limit), as containerd does since CVE-2022-1708.
        result = agent.exec(list(request.cmd), None, timeout=float(request.timeout) or None, alive=context.is_active,
                            max_output=ga.EXEC_SYNC_OUTPUT_CAP, agent_wait=ga.AGENT_WAIT_DEFAULT)
        return api.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)

    def Exec(self, request: api.ExecRequest, context: grpc.ServicerContext) -> api.ExecResponse:
        # Through the exec channel (virtlet.vm.exec_channel) when the guest runs virtlet-exec-agent: streamed
        # output, and with tty a pty in the guest; otherwise the guest agent, where a tty is refused in the stream.
        validation.require_id(request.container_id, "container_id")
        preconditions.require_cmd("Exec", request.cmd)
        preconditions.require_stdio("Exec", request.stdin, request.stdout, request.stderr)
        url = self._streaming().exec_url(request.container_id, list(request.cmd), stdin=request.stdin,
                                         stdout=request.stdout, stderr=request.stderr, tty=request.tty)
        return api.ExecResponse(url=url)

    # -- streaming (issue 9: URLs of virtlet.stream.service.StreamingService) ----------------------------------
    def _streaming(self) -> StreamingUrls:
        if self.streaming is None:
            raise errors.Unavailable("virtletd runs without a streaming server; attach and port-forward are off")
        return self.streaming

    def Attach(self, request: api.AttachRequest, context: grpc.ServicerContext) -> api.AttachResponse:
        validation.require_id(request.container_id, "container_id")
        url = self._streaming().attach_url(request.container_id, stdin=request.stdin, stdout=request.stdout,
                                           stderr=request.stderr, tty=request.tty)
        return api.AttachResponse(url=url)

    def PortForward(self, request: api.PortForwardRequest,
                    context: grpc.ServicerContext) -> api.PortForwardResponse:
        validation.require_id(request.pod_sandbox_id, "pod_sandbox_id")
        return api.PortForwardResponse(url=self._streaming().port_forward_url(request.pod_sandbox_id,
                                                                              list(request.port)))

    def _log_dir(self, sandbox_id: str) -> str:
        rec = self.store.get_sandbox(sandbox_id)
        return rec.log_directory if rec is not None else ""

    def statuses_for_sandbox(self, sandbox_id: str, log_dir: str | None = None) -> list[api.ContainerStatus]:
        """``log_dir``: the sandbox's, when the caller has its record already (one state query less)."""
        log_dir = self._log_dir(sandbox_id) if log_dir is None else log_dir
        return [container_status(r, log_dir) for r in self.store.list_containers(sandbox_id)]


_Rec = TypeVar("_Rec", st.SandboxRecord, st.ContainerRecord)


def _select(records: list[_Rec], id_prefix: str, selector: dict[str, str]) -> list[_Rec]:
    """The records a stats filter picks: id prefix and labels, matched like ListContainers/ListPodSandbox."""
    if selector:
        validation.label_selector(selector)
    return [r for r in records if r.id.startswith(id_prefix) and all(r.labels.get(k) == v for k, v in selector.items())]


def _unimplemented(name: str, later: str) -> Callable[..., Any]:
    def method(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        raise errors.Unimplemented(f"{name} is not implemented by virtletd yet ({later})")

    method.__name__ = name
    return method


def fill_unimplemented(cls: type, names: Iterable[str], later: str = "planned") -> None:
    """Give every CRI method the servicer (or a mixin of it, not the generated base) does not define a clear
    UNIMPLEMENTED answer."""
    own = [k for k in cls.__mro__ if k is not object and not k.__module__.endswith("_pb2_grpc")]
    for name in names:
        if not any(name in k.__dict__ for k in own):
            setattr(cls, name, _unimplemented(name, later))


def service_method_names(service: str) -> list[str]:
    return [m.name for m in api.DESCRIPTOR.services_by_name[service].methods]


fill_unimplemented(RuntimeServicer, service_method_names("RuntimeService"))
