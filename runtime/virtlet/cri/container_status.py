"""A container's CRI status from its record: state, times, exit, image, log path, and, from the ContainerConfig
CreateContainer stored, its mounts and the resources in force (with what UpdateContainerResources applied)."""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError

from virtlet.cri.gen import api_pb2 as api
from virtlet.sandbox import podconfig
from virtlet.state import store as st

log = logging.getLogger(__name__)


_CONTAINER_STATES: dict[str, api.ContainerState] = {
    st.CONTAINER_CREATED: api.CONTAINER_CREATED,
    st.CONTAINER_RUNNING: api.CONTAINER_RUNNING,
    st.CONTAINER_EXITED: api.CONTAINER_EXITED,
}


def container_state(state: str) -> api.ContainerState:
    return _CONTAINER_STATES.get(state, api.CONTAINER_UNKNOWN)


def stored_config(rec: st.ContainerRecord) -> api.ContainerConfig:
    """The ContainerConfig CreateContainer stored (an empty one for a record of an older virtletd without it)."""
    cfg = api.ContainerConfig()
    try:
        cfg.ParseFromString(rec.config)
    except DecodeError:
        log.warning("container %s: its stored config cannot be read; its status lists no mounts", rec.id)
    return cfg


def container_status(rec: st.ContainerRecord, log_dir: str) -> api.ContainerStatus:
    log_path = podconfig.container_log_path(log_dir, rec.log_path)
    cfg = stored_config(rec)
    # mounts: the config's, as given, as containerd reports them (how a VM gets each one is docs/vm-pods.md's)
    return api.ContainerStatus(
        id=rec.id, metadata=api.ContainerMetadata(name=rec.name, attempt=rec.attempt),
        state=container_state(rec.state), created_at=rec.created_at, started_at=rec.started_at,
        finished_at=rec.finished_at, exit_code=rec.exit_code, reason=rec.reason, message=rec.message,
        image=api.ImageSpec(image=rec.image), image_ref=rec.image_ref, image_id=rec.image_ref, labels=rec.labels,
        annotations=rec.annotations, log_path=log_path, mounts=cfg.mounts, resources=_resources_in_force(rec, cfg))


def _resources_in_force(rec: st.ContainerRecord, cfg: api.ContainerConfig) -> api.ContainerResources:
    """CreateContainer's resources with what UpdateContainerResources applied since; the memory is the VM's
    (its size at create when no limit was given: the VM has exactly that much)."""
    linux = api.LinuxContainerResources()
    linux.CopyFrom(cfg.linux.resources)
    for name, value in (rec.extra.get("resources") or {}).items():
        setattr(linux, name, str(value) if name == "cpuset_cpus" else int(value))
    if not linux.memory_limit_in_bytes and rec.extra.get("memory_bytes"):
        linux.memory_limit_in_bytes = int(rec.extra["memory_bytes"])
    return api.ContainerResources(linux=linux)
