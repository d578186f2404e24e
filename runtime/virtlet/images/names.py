"""Image names as virtletd receives them: normalised so that one image has one spelling in the index.

The CRI proxy strips ``virtlet.cloud/`` before virtletd sees a name, but a kubelet pointed straight at
virtletd does not, so the prefix is removed here too.  Tags are meaningless for a disk image at a URL (the URL
is the version), so ``:latest`` and friends are dropped; ``@sha256:<hex>`` pins the content and is kept apart.

A name is hostile input (any pod author writes one) and becomes part of a URL (``https://<name>``, or ``$1`` of
a translation regexp), so it is held to a small grammar before anything else sees it:

* at most ``MAX_NAME_LENGTH`` characters, printable ASCII from ``NAME_CHARS`` only (no spaces, controls, NUL,
  non-ASCII, ``[ ] \\ # @ < > " { } | ^ `` `` ` ``): nothing that changes how a URL built from it is split,
  and no IPv6 literals (use a translation for those);
* ``%`` only as a ``%XX`` escape;
* no ``.`` or ``..`` path segment (also escaped as ``%2e``): a translation ``https://mirror/images/$1`` must not
  be walked out of its directory on a host the admin trusts;
* a ``host:port`` first component (a name with a ``/``) has a port 1-65535.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from urllib.parse import unquote

from virtlet import errors

PREFIX = "virtlet.cloud/"
MAX_NAME_LENGTH = 1024
NAME_CHARS = frozenset(string.ascii_letters + string.digits + "-._~:/%+=&?,!$'()*;")
_HEX = re.compile(r"^[0-9a-f]{64}$")
_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_GRAMMAR = "expected [virtlet.cloud/]<host>[:port]/<path>[:tag][@sha256:<64 hex digits>]"


@dataclass(frozen=True)
class ImageName:
    """A parsed image name: ``name`` without prefix or tag, ``digest`` ("sha256:<hex>") when pinned."""

    name: str
    digest: str | None = None


def _bad(raw: str, why: str) -> errors.InvalidArgument:
    shown = raw if len(raw) <= 80 else raw[:80] + "…"
    return errors.InvalidArgument(f"image name {shown!r}: {why}; {_GRAMMAR}")


def parse(raw: str) -> ImageName:
    """Split ``[virtlet.cloud/]host/path[:tag][@sha256:<hex>]``; InvalidArgument naming what is wrong."""
    if len(raw) > MAX_NAME_LENGTH + len(PREFIX) + 80:  # room for prefix, tag and digest
        raise _bad(raw, f"longer than {MAX_NAME_LENGTH} characters ({len(raw)})")
    text = raw.strip()
    if text.startswith(PREFIX):
        text = text[len(PREFIX):]
    digest = None
    if "@" in text:
        text, _, pin = text.rpartition("@")
        m = _DIGEST.match(pin)
        if not m:
            raise _bad(raw, f"the part after '@' must be sha256:<64 lowercase hex digits>, got {pin[:80]!r}")
        digest = f"sha256:{m.group(1)}"
    # A tag is a ':' after the last '/', so "host:8080/img" keeps its port; in a name without '/', a numeric
    # suffix is a port ("host:8080"), anything else a tag ("cirros:latest").
    slash = text.rfind("/")
    colon = text.rfind(":")
    if colon > slash and (slash != -1 or not text[colon + 1:].isdigit()):
        text = text[:colon]
    _check(raw, text)
    return ImageName(text, digest)


def _check(raw: str, text: str) -> None:
    if not text:
        raise _bad(raw, "the name is empty")
    if len(text) > MAX_NAME_LENGTH:
        raise _bad(raw, f"longer than {MAX_NAME_LENGTH} characters ({len(text)})")
    bad = sorted({c for c in text if c not in NAME_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        raise _bad(raw, f"contains characters not allowed in an image name ({shown}); allowed are ASCII "
                        "letters, digits and -._~:/%+=&?,!$'()*;")
    if _ESCAPE.search(text):
        raise _bad(raw, "'%' must start a %XX escape")
    segments = text.split("?", 1)[0].split("/")
    if any(unquote(s) in (".", "..") for s in segments):
        raise _bad(raw, "'.' and '..' path segments are not allowed")
    if "/" in text or ":" in text:
        host = segments[0]
        if ":" in host:
            hostname, _, port = host.rpartition(":")
            if not hostname or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise _bad(raw, f"the port in {host!r} must be a number 1-65535")
            if ":" in hostname:
                raise _bad(raw, f"the host {host!r} has more than one ':'")


def digest_of(ref: str) -> str | None:
    """``sha256:<hex>`` for a bare digest reference (``sha256:<hex>`` or ``<hex>``), else None."""
    text = ref.strip()
    if _HEX.match(text):
        return f"sha256:{text}"
    m = _DIGEST.match(text)
    return f"sha256:{m.group(1)}" if m else None
