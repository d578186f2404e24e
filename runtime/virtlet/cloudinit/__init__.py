"""cloud-init seeds for VM pods: NoCloud (``cidata``) or ConfigDrive (``config-2``) ISO images.

Typical use in CreateContainer::

    opts = parse_cloudinit_options(pod_annotations)   # early: bad annotations fail before anything exists
    seed = render(CloudInitRequest(...))              # pure
    write_iso(seed, container_dir / "seed.iso")       # attach read-only as the last CD-ROM

See ``docs/cloud-init.md`` for the annotations and what ends up in the seed.
"""

from __future__ import annotations

from pathlib import Path

from virtlet.cloudinit.iso import write_iso
from virtlet.cloudinit.model import VOLUME_LABELS, CloudInitRequest, NicConfig, SeedFiles, SeedKind
from virtlet.cloudinit.options import ANNOTATIONS, CloudInitOptions, parse_cloudinit_options
from virtlet.cloudinit.render import render


def build_seed_iso(req: CloudInitRequest, dest: Path) -> SeedFiles:
    """Render the seed for ``req`` and write it as an ISO at ``dest``; returns what was written."""
    seed = render(req)
    write_iso(seed, dest)
    return seed


__all__ = [
    "ANNOTATIONS",
    "VOLUME_LABELS",
    "CloudInitOptions",
    "CloudInitRequest",
    "NicConfig",
    "SeedFiles",
    "SeedKind",
    "build_seed_iso",
    "parse_cloudinit_options",
    "render",
    "write_iso",
]
