"""Checks of CRI request fields that the servicers make before anything is done: ids, pod metadata, labels and
label selectors.  Every refusal is ``errors.InvalidArgument`` naming the field, with the value cut short."""

from __future__ import annotations

import re
from typing import Any

from virtlet import errors
from virtlet.cri.gen import api_pb2 as api

# Kubernetes label syntax: optional DNS-subdomain prefix "/" name (<= 63), value (<= 63, may be empty)
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def label_selector(selector: dict[str, str]) -> None:
    """Reject a label selector no Kubernetes label could match (INVALID_ARGUMENT naming the bad entry)."""
    for key, value in selector.items():
        prefix, _, name = key.rpartition("/")
        if (not _LABEL_NAME.match(name) or (prefix and (len(prefix) > 253 or not _LABEL_PREFIX.match(prefix)))
                or key.count("/") > 1):
            raise errors.InvalidArgument(
                f"label selector: {key!r} is not a valid label key (optional DNS prefix/, then up to 63 "
                f"alphanumerics, '-', '_' or '.')")
        if not _LABEL_VALUE.match(value):
            raise errors.InvalidArgument(
                f"label selector: value {value!r} of {key!r} is not a valid label value (up to 63 alphanumerics, "
                f"'-', '_' or '.', starting and ending alphanumeric)")


# Ids virtletd issues are uuid4 (hex for sandboxes, dashed for containers).  Other code builds file and socket
# paths from an id even when the id is unknown (RemoveContainer cleans up leftovers of unknown ids), so an id
# that is not a plain word (``..``, ``a/b``, NUL, 300 characters) never gets past the servicer.  Short unknown
# words ("nope") keep the answers the kubelet expects: NOT_FOUND from *Status, success from Stop/Remove.
MAX_ID_LENGTH = 128
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def pod_metadata(md: api.PodSandboxMetadata) -> None:
    """Pod name and namespace as Kubernetes allows them (DNS subdomain, DNS label), uid a plain word: they reach
    CNI_ARGS (``;`` and ``=`` separate its pairs), file names and logs, so anything else is INVALID_ARGUMENT
    here instead of an INTERNAL from a CNI plugin later."""
    for what, value, limit, pattern in (("metadata.name", md.name, 253, _DNS_SUBDOMAIN),
                                        ("metadata.namespace", md.namespace, 63, _DNS_SUBDOMAIN),
                                        ("metadata.uid", md.uid, MAX_ID_LENGTH, _UID)):
        if value and (len(value) > limit or not pattern.fullmatch(value)):
            shown = value if len(value) <= 80 else value[:80] + "..."
            raise errors.InvalidArgument(
                f"pod sandbox config: {what} {shown!r} is not valid (at most {limit} characters; "
                + ("letters, digits, '_', '.', '-')" if what == "metadata.uid" else
                   "lowercase letters, digits, '-' and '.', starting and ending alphanumeric)"))


#: Labels are short in Kubernetes (63-byte values); all of a pod's together are bounded like its annotations.
MAX_LABELS_TOTAL = 256 * 1024


def labels_size(labels: Any) -> None:
    total = sum(len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
                for k, v in labels.items())
    if total > MAX_LABELS_TOTAL:
        raise errors.InvalidArgument(
            f"RunPodSandbox: the pod's labels are {total} bytes together, more than {MAX_LABELS_TOTAL} (256 KiB)")


def require_id(value: str, name: str) -> None:
    if not value:
        raise errors.InvalidArgument(f"{name} is required")
    if len(value) > MAX_ID_LENGTH or not _ID.fullmatch(value):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise errors.InvalidArgument(
            f"{name} {shown!r} is not an id virtletd issues (letters, digits, '_', '.', '-'; starting with a "
            f"letter or digit; at most {MAX_ID_LENGTH} characters)")


def container_security_context(cfg: api.ContainerConfig, sandbox_config: api.PodSandboxConfig) -> None:
    """Refuse the security-context combinations containerd refuses at CreateContainer (its messages, as
    INVALID_ARGUMENT naming the field; containerd itself answers them as UNKNOWN).  The rest of a container's
    security context (capabilities, seccomp, AppArmor, SELinux, read-only root) means nothing for a VM, whose
    guest is its own kernel, and is ignored as before.

    - a group (``run_as_group``) without a user (``run_as_user`` or ``run_as_username``): containerd cannot
      build the ``user:group`` string and answers ``user group "G" is specified without user``;
    - a privileged container whose sandbox config (the request's ``sandbox_config``, which is what containerd
      checks too) is not privileged: ``no privileged container allowed in sandbox``.  The kubelet makes the
      sandbox privileged whenever one of the pod's containers is, so only a hand-made request meets this.
    """
    if not cfg.HasField("linux") or not cfg.linux.HasField("security_context"):
        return
    sc = cfg.linux.security_context
    if sc.HasField("run_as_group") and not sc.HasField("run_as_user") and not sc.run_as_username:
        raise errors.InvalidArgument(
            f"CreateContainer: config.linux.security_context: user group \"{sc.run_as_group.value}\" is specified "
            f"without user (set run_as_user or run_as_username too)")
    if sc.privileged and not sandbox_config.linux.security_context.privileged:
        raise errors.InvalidArgument(
            "CreateContainer: config.linux.security_context.privileged: no privileged container allowed in sandbox "
            "(sandbox_config.linux.security_context.privileged is false)")
