"""What the stored CRI PodSandboxConfig of a sandbox says: its log directory, its host name, and where a
container's CRI log file lives.  One place, so the VM manager, the cloud-init seed and the CRI status replies
agree."""

from __future__ import annotations

from virtlet.cri.gen import api_pb2 as api
from virtlet.state import store as st


def pod_config(rec: st.SandboxRecord) -> api.PodSandboxConfig:
    return api.PodSandboxConfig.FromString(rec.config) if rec.config else api.PodSandboxConfig()


def log_directory(rec: st.SandboxRecord) -> str:
    return pod_config(rec).log_directory


def hostname(rec: st.SandboxRecord) -> str:
    """The pod's host name (the kubelet sets it; the pod name otherwise)."""
    return pod_config(rec).hostname or rec.name


def container_log_path(log_dir: str, log_path: str) -> str:
    """The CRI log file of a container: ``log_path`` relative to the sandbox's ``log_dir`` ("" when unset)."""
    if log_dir and log_path and not log_path.startswith("/"):
        return f"{log_dir.rstrip('/')}/{log_path}"
    return log_path
