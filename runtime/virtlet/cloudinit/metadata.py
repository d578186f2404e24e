"""Instance meta-data: NoCloud ``meta-data`` (YAML) and ConfigDrive ``meta_data.json``.

Both start from the same NoCloud-style map (``instance-id``, ``local-hostname``, ``public-keys``) with the
``VirtletCloudInitMetaData`` keys laid over it; ConfigDrive then renames the keys cloud-init's OpenStack
reader expects under other names (``uuid``, ``hostname``, ``public_keys``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from virtlet import errors
from virtlet.cloudinit import yamlio

#: NoCloud key -> key of the same value in OpenStack's meta_data.json.
_CONFIGDRIVE_NAMES = {"instance-id": "uuid", "local-hostname": "hostname", "public-keys": "public_keys"}


def instance_id(pod_name: str, pod_namespace: str) -> str:
    """``<pod>.<namespace>``: stable across container restarts, so cloud-init runs per-instance steps once."""
    return f"{pod_name}.{pod_namespace}"


def meta_data_map(
    pod_name: str,
    pod_namespace: str,
    hostname: str,
    ssh_keys: Sequence[str],
    overrides: Mapping[str, Any] | None,
    fixed_instance_id: str | None = None,
) -> dict[str, Any]:
    """The NoCloud meta-data map; ``overrides`` (VirtletCloudInitMetaData) replace keys one by one.
    ``fixed_instance_id`` replaces the pod-derived instance id (a persistent root disk's own id)."""
    data: dict[str, Any] = {
        "instance-id": fixed_instance_id or instance_id(pod_name, pod_namespace),
        "local-hostname": hostname or pod_name,
    }
    if ssh_keys:
        data["public-keys"] = list(ssh_keys)
    for key, value in (overrides or {}).items():
        data[key] = copy.deepcopy(value)
    return data


def nocloud_meta_data(data: Mapping[str, Any]) -> bytes:
    return yamlio.dump(dict(data)).encode()


def configdrive_meta_data(data: Mapping[str, Any], pod_name: str) -> bytes:
    """OpenStack-style meta_data.json; ``public_keys`` becomes the ``{"key-N": key}`` map OpenStack uses."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _CONFIGDRIVE_NAMES.get(key, key)
        if name == "public_keys" and isinstance(value, list):
            value = {f"key-{i}": k for i, k in enumerate(value)}
        out[name] = value
    out.setdefault("name", pod_name)
    try:
        text = json.dumps(out, indent=2, sort_keys=True, default=str, allow_nan=False)
    except ValueError:  # .inf / .nan from the annotation's YAML: JSON has no such numbers
        raise errors.InvalidArgument(
            "annotation VirtletCloudInitMetaData: .inf and .nan cannot be written to meta_data.json; "
            "quote them to make them strings") from None
    return (text + "\n").encode()
