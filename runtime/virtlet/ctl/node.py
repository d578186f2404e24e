"""Node mode: talk to virtletd's CRI socket directly, find pods by ``namespace/name`` or id.

Why a module of its own: every command starts by turning what the user typed into one running VM
(sandbox + container), with an error that says which of "unknown", "not a VM pod" or "not running" it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from virtlet.cri import versions
from virtlet.cri.gen import api_pb2 as api

DEFAULT_ENDPOINT = "unix:///run/virtlet.sock"
VM_HANDLER = "virtlet"


class CtlError(Exception):
    """An error for the user: printed as ``virtletctl: <message>``, exit status 1."""


@dataclass(frozen=True)
class Pod:
    sandbox_id: str
    namespace: str
    name: str
    container_id: str
    domain: str
    hostname: str = ""


def _rpc_error(what: str, exc: grpc.RpcError) -> CtlError:
    code = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return CtlError(f"{what}: {code}: {details}")


class NodeClient:
    """CRI calls against ``endpoint`` (``unix:///path`` or a path)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 10.0) -> None:
        target = endpoint if endpoint.startswith("unix:") else f"unix://{endpoint}"
        self.endpoint = endpoint
        self.channel = grpc.insecure_channel(target)
        self.runtime = versions.runtime_stub(self.channel)
        self.image = versions.image_stub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def call(self, stub: Any, method: str, request: Any) -> Any:
        try:
            return getattr(stub, method)(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise CtlError(f"cannot reach the runtime at {self.endpoint} ({exc.details()}); is virtletd "
                               "running? (--endpoint)") from exc
            raise _rpc_error(method, exc) from exc

    # -- lookups ----------------------------------------------------------------------------------------
    def version(self) -> api.VersionResponse:
        resp: api.VersionResponse = self.call(self.runtime, "Version", api.VersionRequest(version="v1"))
        return resp

    def sandboxes(self) -> list[api.PodSandbox]:
        return list(self.call(self.runtime, "ListPodSandbox", api.ListPodSandboxRequest()).items)

    def containers(self, sandbox_id: str = "") -> list[api.Container]:
        flt = api.ContainerFilter(pod_sandbox_id=sandbox_id)
        return list(self.call(self.runtime, "ListContainers", api.ListContainersRequest(filter=flt)).containers)

    def container_info(self, container_id: str) -> dict[str, Any]:
        resp = self.call(self.runtime, "ContainerStatus",
                         api.ContainerStatusRequest(container_id=container_id, verbose=True))
        info: dict[str, Any] = json.loads(resp.info.get("info", "{}") or "{}")
        return info

    def find_sandbox(self, ref: str) -> api.PodSandbox:
        """A pod by id (or unique id prefix), ``namespace/name`` or ``name`` (namespace ``default``)."""
        items = self.sandboxes()
        by_id = [s for s in items if s.id == ref] or [s for s in items if len(ref) >= 6 and s.id.startswith(ref)]
        if not by_id:
            ns, _, name = ref.rpartition("/")
            ns = ns or "default"
            by_id = [s for s in items if s.metadata.namespace == ns and s.metadata.name == name]
        if not by_id:
            raise CtlError(f"pod {ref!r} is unknown to the runtime at {self.endpoint} (use namespace/name or a "
                           "sandbox id; `virtletctl dump-metadata` lists them)")
        ready = [s for s in by_id if s.state == api.SANDBOX_READY]
        if len(ready) > 1:
            raise CtlError(f"pod {ref!r} is ambiguous: {', '.join(s.id for s in ready)}")
        return (ready or sorted(by_id, key=lambda s: s.created_at))[-1]

    def find_pod(self, ref: str) -> Pod:
        """The running VM of pod ``ref``, or a ``CtlError`` that says why there is none."""
        sandbox = self.find_sandbox(ref)
        label = f"{sandbox.metadata.namespace}/{sandbox.metadata.name}"
        runtime_name = self.version().runtime_name
        if runtime_name != "virtlet" and sandbox.runtime_handler != VM_HANDLER:
            raise CtlError(f"pod {label} is not a VM pod (runtime handler {sandbox.runtime_handler!r}, "
                           f"runtime {runtime_name!r})")
        if sandbox.state != api.SANDBOX_READY:
            raise CtlError(f"pod {label} is not running (its sandbox is not ready)")
        running = [c for c in self.containers(sandbox.id) if c.state == api.CONTAINER_RUNNING]
        if not running:
            raise CtlError(f"pod {label} is not running: its VM has not started or has exited")
        c = running[0]
        info = self.container_info(c.id)
        return Pod(sandbox.id, sandbox.metadata.namespace, sandbox.metadata.name, c.id,
                   str(info.get("extra", {}).get("domain", "")))

    def attach_url(self, container_id: str) -> str:
        req = api.AttachRequest(container_id=container_id, stdin=True, stdout=True, tty=True)
        resp: api.AttachResponse = self.call(self.runtime, "Attach", req)
        return resp.url

    def port_forward_url(self, sandbox_id: str, ports: list[int]) -> str:
        resp: api.PortForwardResponse = self.call(self.runtime, "PortForward",
                                                  api.PortForwardRequest(pod_sandbox_id=sandbox_id, port=ports))
        return resp.url

    def domain_xml(self, container_id: str) -> str:
        return str(self.container_info(container_id).get("domain_xml", ""))


def message_dict(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)
