"""Validation of the pod's cloud-init annotations, done before anything is created.

CreateContainer calls ``parse_cloudinit_options`` first: every bad value becomes ``errors.InvalidArgument``
naming the annotation and saying what is allowed.  Messages never quote the user-data itself (it may hold
secrets); YAML errors are reported by line and column only.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from virtlet import errors
from virtlet.cloudinit import yamlio
from virtlet.cloudinit.model import SeedKind

USER_DATA = "VirtletCloudInitUserData"
USER_DATA_OVERWRITE = "VirtletCloudInitUserDataOverwrite"
USER_DATA_SCRIPT = "VirtletCloudInitUserDataScript"
META_DATA = "VirtletCloudInitMetaData"
SSH_KEYS = "VirtletSSHKeys"
IMAGE_TYPE = "VirtletCloudInitImageType"
FORCE_DHCP = "VirtletForceDHCPNetworkConfig"
NETWORK_CONFIG_VERSION = "VirtletCloudInitNetworkConfigVersion"

ANNOTATIONS = (USER_DATA, USER_DATA_OVERWRITE, USER_DATA_SCRIPT, META_DATA, SSH_KEYS, IMAGE_TYPE, FORCE_DHCP,
               NETWORK_CONFIG_VERSION)

IMAGE_TYPES: tuple[SeedKind, ...] = ("nocloud", "configdrive")

#: Largest value of a text annotation (user-data, meta-data, script, SSH keys), in UTF-8 bytes.  All of a
#: pod's annotations together are at most 256 KiB anyway (Kubernetes' limit, also checked by virtletd).
MAX_TEXT_ANNOTATION = 128 * 1024
#: Largest value of a one-word annotation (image type, true/false switches), in characters.
MAX_WORD_ANNOTATION = 256
_TEXT_ANNOTATIONS = (USER_DATA, USER_DATA_SCRIPT, META_DATA, SSH_KEYS)
_WORD_ANNOTATIONS = (IMAGE_TYPE, USER_DATA_OVERWRITE, FORCE_DHCP, NETWORK_CONFIG_VERSION)

#: Key types OpenSSH accepts in authorized_keys (plain keys, security-key keys and certificates).
SSH_KEY_TYPES = (
    "ssh-rsa",
    "ssh-dss",
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-rsa-cert-v01@openssh.com",
    "ssh-dss-cert-v01@openssh.com",
    "ssh-ed25519-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "sk-ssh-ed25519-cert-v01@openssh.com",
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
)


@dataclass(frozen=True)
class CloudInitOptions:
    """The validated cloud-init annotations of one pod.

    Fields that may carry secrets are left out of ``repr`` so logging an options object is safe.
    """

    image_type: SeedKind = "nocloud"
    user_data: dict[str, Any] | None = field(default=None, repr=False)
    user_data_overwrite: bool = False
    user_data_script: str | None = field(default=None, repr=False)
    meta_data: dict[str, Any] | None = field(default=None, repr=False)
    ssh_keys: list[str] = field(default_factory=list)
    force_dhcp: bool = False
    network_config_version: int = 1  # NoCloud network-config format (ConfigDrive has its own)


def parse_cloudinit_options(annotations: Mapping[str, str]) -> CloudInitOptions:
    """Validate the ``Virtlet*`` cloud-init annotations; ``errors.InvalidArgument`` for the first bad one.

    Annotations this module does not know are ignored (other parts of virtlet read them).
    """
    _check_sizes(annotations)
    image_type = _image_type(annotations.get(IMAGE_TYPE))
    overwrite = _bool(USER_DATA_OVERWRITE, annotations.get(USER_DATA_OVERWRITE))
    force_dhcp = _bool(FORCE_DHCP, annotations.get(FORCE_DHCP))
    version = (annotations.get(NETWORK_CONFIG_VERSION) or "1").strip()
    if version not in ("1", "2"):
        raise errors.InvalidArgument(
            f"annotation {NETWORK_CONFIG_VERSION}: {version[:20]!r} is not a network-config version this runtime "
            'writes; use "1" (default) or "2"')
    user_data = _yaml_map(USER_DATA, annotations.get(USER_DATA))
    meta_data = _yaml_map(META_DATA, annotations.get(META_DATA))
    script = annotations.get(USER_DATA_SCRIPT)
    if script is not None and not script.strip():
        raise errors.InvalidArgument(
            f"annotation {USER_DATA_SCRIPT} is empty: give the verbatim user-data (e.g. a '#!/bin/sh' "
            "script) or remove the annotation"
        )
    if script is not None and user_data is not None:
        raise errors.InvalidArgument(
            f"annotations {USER_DATA_SCRIPT} and {USER_DATA} are both set: {USER_DATA_SCRIPT} replaces "
            f"the whole user-data, so {USER_DATA} would be ignored; keep only one of them"
        )
    if overwrite and user_data is None:
        raise errors.InvalidArgument(
            f'annotation {USER_DATA_OVERWRITE} is "true" but {USER_DATA} is not set: there is no '
            f"user-data to overwrite with; set {USER_DATA} or remove {USER_DATA_OVERWRITE}"
        )
    return CloudInitOptions(
        image_type=image_type,
        user_data=user_data,
        user_data_overwrite=overwrite,
        user_data_script=script,
        meta_data=meta_data,
        ssh_keys=parse_ssh_keys(annotations.get(SSH_KEYS)),
        force_dhcp=force_dhcp,
        network_config_version=int(version),
    )


def _check_sizes(annotations: Mapping[str, str]) -> None:
    for name in _WORD_ANNOTATIONS:
        value = annotations.get(name)
        if value is not None and len(value) > MAX_WORD_ANNOTATION:
            raise errors.InvalidArgument(
                f"annotation {name}: a value of {len(value)} characters is too long (at most {MAX_WORD_ANNOTATION})")
    for name in _TEXT_ANNOTATIONS:
        value = annotations.get(name)
        if value is None:
            continue
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_TEXT_ANNOTATION:
            raise errors.InvalidArgument(
                f"annotation {name} is {size} bytes, more than the {MAX_TEXT_ANNOTATION} bytes (128 KiB) allowed; "
                "make it smaller (for example download large files from the guest instead of embedding them)")


def _image_type(value: str | None) -> SeedKind:
    if value is None or not value.strip():
        return "nocloud"
    lowered = value.strip().lower()
    for kind in IMAGE_TYPES:
        if lowered == kind:
            return kind
    raise errors.InvalidArgument(
        f"annotation {IMAGE_TYPE}: unknown image type {value!r}; allowed: {', '.join(IMAGE_TYPES)}"
    )


def _bool(name: str, value: str | None) -> bool:
    """Booleans are the strings "true" and "false" (any case); anything else is refused, not guessed."""
    if value is None:
        return False
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise errors.InvalidArgument(f'annotation {name}: expected "true" or "false", got {value!r}')


def _yaml_map(name: str, value: str | None) -> dict[str, Any] | None:
    """Parse a YAML map annotation; an empty annotation counts as absent."""
    if value is None or not value.strip():
        return None
    try:
        data = yamlio.load_annotation(value)
    except yamlio.YamlRefused as exc:
        raise errors.InvalidArgument(f"annotation {name}: {exc}") from None
    except yaml.YAMLError as exc:
        raise errors.InvalidArgument(f"annotation {name} is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise errors.InvalidArgument(
            f"annotation {name} must be a YAML map (key: value lines), got a {_yaml_kind(data)}"
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise errors.InvalidArgument(f"annotation {name}: top-level keys must be strings, got {bad[0]!r}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what went wrong, without PyYAML's snippet of the (possibly secret) document."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or "cannot parse"
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(problem)


def _yaml_kind(data: Any) -> str:
    if isinstance(data, list):
        return "list"
    if isinstance(data, str):
        return "string"
    if isinstance(data, bool):
        return "boolean"
    if isinstance(data, int | float):
        return "number"
    return type(data).__name__


def parse_ssh_keys(value: str | None) -> list[str]:
    """Split ``VirtletSSHKeys`` into key lines, checking each is an OpenSSH public key.

    A line is ``<type> <base64> [comment]``; the base64 blob must decode and name the same key type, which
    catches truncated pastes.  Blank lines are skipped.  Error messages give the line number only: a private
    key pasted by mistake must not be echoed back.
    """
    if value is None:
        return []
    keys: list[str] = []
    for number, raw in enumerate(value.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        problem = _ssh_key_problem(line)
        if problem:
            raise errors.InvalidArgument(
                f"annotation {SSH_KEYS}: line {number} is not an OpenSSH public key ({problem}); "
                f"each line must be '<type> <base64> [comment]' with type one of "
                f"{', '.join(SSH_KEY_TYPES[:6])}, ..."
            )
        keys.append(" ".join(line.split()))
    return keys


def _ssh_key_problem(line: str) -> str | None:
    if line.startswith("-----BEGIN"):
        return "it looks like a private key or PEM file; give the contents of the .pub file"
    parts = line.split(None, 2)
    if parts[0] not in SSH_KEY_TYPES:
        return "unknown key type or authorized_keys options are present"
    if len(parts) < 2:
        return "the base64 key data is missing"
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return "the key data is not valid base64"
    if len(blob) < 4:
        return "the key data is too short"
    (length,) = struct.unpack(">I", blob[:4])
    if blob[4 : 4 + length] != parts[0].encode():
        return "the key data does not match the key type (truncated or mixed-up key?)"
    return None
