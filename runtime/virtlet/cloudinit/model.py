"""Plain data handed to and returned by the cloud-init renderer.

Kept apart from the rendering code so the callers (CreateContainer, the network helper that turns a CNI result
into ``NicConfig`` objects) depend only on these small types, not on YAML or ISO details.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

SeedKind = Literal["nocloud", "configdrive"]

#: Volume label cloud-init looks for, per data source.
VOLUME_LABELS: dict[str, str] = {"nocloud": "cidata", "configdrive": "config-2"}


@dataclass(frozen=True)
class NicConfig:
    """One VM network interface, in guest order (``eth0`` first), as the CNI result describes it.

    ``addresses`` are ``"10.1.2.3/24"``-style interface addresses; an empty list means the guest should use
    DHCP on this NIC.  ``routes`` are ``(destination CIDR, gateway)`` pairs; an empty gateway means "via this
    NIC's ``gateway``".  Only the first NIC's ``gateway`` becomes a default route (one default route per
    guest).  ``mtu`` None or 0 leaves the guest's default.  An empty ``gateway`` string counts as None.
    """

    mac: str
    mtu: int | None = None
    addresses: list[str] = field(default_factory=list)
    gateway: str | None = None
    routes: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class CloudInitRequest:
    """Everything the seed of one VM container is made from.

    ``annotations`` are the pod's annotations (all of them; the ``Virtlet*`` cloud-init ones are read);
    ``env`` is the container's environment in CRI order; ``hostname`` is the pod's hostname (empty: the pod
    name is used).
    """

    pod_name: str
    pod_namespace: str
    pod_uid: str
    hostname: str
    annotations: Mapping[str, str] = field(default_factory=dict)
    env: list[tuple[str, str]] = field(default_factory=list)
    nics: list[NicConfig] = field(default_factory=list)
    dns_servers: list[str] = field(default_factory=list)
    dns_search: list[str] = field(default_factory=list)
    #: cloud-config virtlet adds for pod volumes (``mounts``, ``write_files``), merged into the generated map
    extra_user_data: Mapping[str, Any] = field(default_factory=dict)
    #: more files on the seed, by relative path (``virtlet/mounts`` for the tiny guest's mount script)
    extra_files: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    instance_id: str | None = None  # None: ``<pod>.<namespace>``; a persistent root disk brings its own


@dataclass(frozen=True)
class SeedFiles:
    """The rendered seed: file contents by relative POSIX path, plus what the ISO volume must be called.

    ``repr`` leaves the contents out on purpose: user-data may hold secrets and must never reach a log.
    """

    kind: SeedKind
    volume_label: str
    files: dict[str, bytes] = field(repr=False)

    def names(self) -> list[str]:
        """The relative paths in the seed, sorted (safe to log)."""
        return sorted(self.files)
