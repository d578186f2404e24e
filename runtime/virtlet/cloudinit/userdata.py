"""The ``user-data`` document: generated ``#cloud-config`` merged with the pod's annotations.

Precedence, from the annotations (see ``docs/cloud-init.md``):

* ``VirtletCloudInitUserDataScript``: used verbatim, nothing generated.
* ``VirtletCloudInitUserData`` with ``VirtletCloudInitUserDataOverwrite: "true"``: the annotation's map alone.
* ``VirtletCloudInitUserData``: merged into the generated map (maps recursively, lists appended, scalars and
  mismatched types replaced by the annotation's value).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

from virtlet import errors
from virtlet.cloudinit import yamlio
from virtlet.cloudinit.options import CloudInitOptions

ENVIRONMENT_FILE = "/etc/cloud/environment"

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def render_user_data(opts: CloudInitOptions, env: Sequence[tuple[str, str]],
                     extra: Mapping[str, Any] | None = None) -> bytes:
    """The bytes of the user-data file for these options and container environment; ``extra`` is virtlet's own
    cloud-config for the pod's volumes, merged into the generated map (not used with a user-data script or
    ``VirtletCloudInitUserDataOverwrite``: the user then owns the whole document)."""
    if opts.user_data_script is not None:
        return opts.user_data_script.encode()
    if opts.user_data is not None and opts.user_data_overwrite:
        data = copy.deepcopy(opts.user_data)
    else:
        data = generated_user_data(opts.ssh_keys, env)
        if extra:
            data = merge(data, extra)
        if opts.user_data is not None:
            data = merge(data, opts.user_data)
            _keep_default_user(data, opts.ssh_keys)
    body = yamlio.dump(data) if data else ""
    return ("#cloud-config\n" + body).encode()


def generated_user_data(ssh_keys: Sequence[str], env: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """What virtlet itself puts into user-data: the SSH keys and the environment file."""
    data: dict[str, Any] = {}
    if ssh_keys:
        data["ssh_authorized_keys"] = list(ssh_keys)
    if env:
        data["write_files"] = [
            {
                "path": ENVIRONMENT_FILE,
                "owner": "root:root",
                "permissions": "0600",  # the pod's environment may hold secrets
                "content": environment_file(env),
            }
        ]
    return data


def environment_file(env: Sequence[tuple[str, str]]) -> str:
    """``KEY='value'`` lines that a POSIX shell can source and systemd's EnvironmentFile= can read.

    Values are single-quoted (a ``'`` inside becomes ``'\\''``), so ``$``, backticks, spaces and newlines
    arrive unchanged.  Names must be shell identifiers; anything else would make the file unusable.
    """
    lines = []
    for name, value in env:
        if not _ENV_NAME.match(name):
            raise errors.InvalidArgument(
                f"environment variable {name!r} cannot be written to {ENVIRONMENT_FILE}: names must be "
                "letters, digits and '_' and must not start with a digit"
            )
        lines.append(f"{name}='" + value.replace("'", "'\\''") + "'\n")
    return "".join(lines)


def merge(base: Any, extra: Any) -> Any:
    """Deep-merge ``extra`` into a copy of ``base``: maps recursively, lists appended, the rest replaced."""
    if isinstance(base, Mapping) and isinstance(extra, Mapping):
        out = {k: copy.deepcopy(v) for k, v in base.items()}
        for key, value in extra.items():
            out[key] = merge(out[key], value) if key in out else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(extra, list):
        return copy.deepcopy(base) + copy.deepcopy(extra)
    return copy.deepcopy(extra)


def _keep_default_user(data: dict[str, Any], ssh_keys: Sequence[str]) -> None:
    """Keep the image's default user when the annotation lists ``users`` and VirtletSSHKeys is set.

    cloud-init gives top-level ``ssh_authorized_keys`` to the default user, and a ``users`` list without the
    ``default`` entry means "no default user": the keys from VirtletSSHKeys would then silently go nowhere.
    """
    users = data.get("users")
    if not ssh_keys or not isinstance(users, list) or "default" in users:
        return
    data["users"] = ["default", *users]
