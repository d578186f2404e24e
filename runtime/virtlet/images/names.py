"""Image names as virtletd receives them: normalised so that one image has one spelling in the index.

The CRI proxy strips ``virtlet.cloud/`` before virtletd sees a name, but a kubelet pointed straight at
virtletd does not, so the prefix is removed here too.  Tags are meaningless for a disk image at a URL (the URL
is the version), so ``:latest`` and friends are dropped; ``@sha256:<hex>`` pins the content and is kept apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from virtlet import errors

PREFIX = "virtlet.cloud/"
_HEX = re.compile(r"^[0-9a-f]{64}$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


@dataclass(frozen=True)
class ImageName:
    """A parsed image name: ``name`` without prefix or tag, ``digest`` ("sha256:<hex>") when pinned."""

    name: str
    digest: str | None = None


def parse(raw: str) -> ImageName:
    """Split ``[virtlet.cloud/]host/path[:tag][@sha256:<hex>]``; InvalidArgument for an empty or bad name."""
    text = raw.strip()
    if text.startswith(PREFIX):
        text = text[len(PREFIX):]
    digest = None
    if "@" in text:
        text, _, pin = text.rpartition("@")
        m = _DIGEST.match(pin)
        if not m:
            raise errors.InvalidArgument(
                f"image {raw!r}: the part after '@' must be sha256:<64 lowercase hex digits>, got {pin!r}")
        digest = f"sha256:{m.group(1)}"
    # A tag is a ':' after the last '/', so "host:8080/img" keeps its port; in a name without '/', a numeric
    # suffix is a port ("host:8080"), anything else a tag ("cirros:latest").
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash and (slash != -1 or not text[colon + 1:].isdigit()):
        text = text[:colon]
    if not text or any(c.isspace() for c in text):
        raise errors.InvalidArgument(f"image {raw!r}: expected <host>/<path>[:tag][@sha256:<hex>]")
    return ImageName(text, digest)


def digest_of(ref: str) -> str | None:
    """``sha256:<hex>`` for a bare digest reference (``sha256:<hex>`` or ``<hex>``), else None."""
    text = ref.strip()
    if _HEX.match(text):
        return f"sha256:{text}"
    m = _DIGEST.match(text)
    return f"sha256:{m.group(1)}" if m else None
