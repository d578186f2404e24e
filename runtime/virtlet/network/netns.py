"""Named network namespaces (``/var/run/netns/<name>``), the same kind ``ip netns`` makes.

Every helper is idempotent: creating a namespace that exists and deleting one that is gone both succeed.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from virtlet import errors

NETNS_DIR = Path("/var/run/netns")


def path(name: str) -> Path:
    """The bind-mount path of the named namespace."""
    return NETNS_DIR / name


def exists(name: str) -> bool:
    return path(name).exists()


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def create(name: str) -> Path:
    """Create the namespace ``name`` unless it exists; return its path."""
    if exists(name):
        return path(name)
    res = _ip("netns", "add", name)
    if res.returncode != 0 and not exists(name):
        raise errors.Internal(f"cannot create network namespace {name}: {res.stderr.strip()}")
    # bring up loopback inside, as every pod expects it
    _ip("-n", name, "link", "set", "lo", "up")
    return path(name)


def delete(name: str) -> None:
    """Delete the namespace ``name``; a missing namespace is success."""
    if not exists(name):
        return
    res = _ip("netns", "delete", name)
    if res.returncode != 0 and exists(name):
        raise errors.Internal(f"cannot delete network namespace {name}: {res.stderr.strip()}")


def list_names() -> list[str]:
    """Names of all named namespaces on the host."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir())
