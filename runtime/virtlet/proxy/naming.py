"""Id and image-name prefixes: how one namespace of names is shared by several runtimes.

Why: the kubelet sees one runtime, so ids and image names of secondaries must be unambiguous and routable.
A secondary's ids are shown as 64-hex strings like containerd's (``sha256("<runtime>/<id>")``: log shippers
parse the kubelet's ``/var/log/containers/<pod>_<ns>_<container>-<id>.log`` links, ``crictl`` shows the first
13 characters); ``state.ProxyState`` maps them back.  The older form ``virtlet.cloud__<id>`` (proxies before
the id index) is still accepted on input.  Images of ``virtlet.cloud`` are shown as ``virtlet.cloud/<name>``;
the primary's ids and names are shown unchanged.  ``PRIMARY`` ("") names the primary.
Everything here is pure string work (unit-tested in ``tests/unit/test_proxy_naming.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection

from virtlet import errors

PRIMARY = ""
ID_SEPARATOR = "__"


def external_id(runtime: str, raw: str) -> str:
    """The id the kubelet sees for ``raw`` of ``runtime`` (unchanged for the primary and for empty ids)."""
    if runtime == PRIMARY or not raw:
        return raw
    return hashlib.sha256(f"{runtime}/{raw}".encode()).hexdigest()


def legacy_id(runtime: str, raw: str) -> str:
    """The form earlier proxies showed (``virtlet.cloud__<id>``); accepted on input, never shown."""
    return f"{runtime}{ID_SEPARATOR}{raw}"


def split_id(value: str, secondaries: Collection[str], what: str = "id") -> tuple[str, str]:
    """``(runtime, backend id)`` for an id in the legacy prefix form; any other id is ``(PRIMARY, id)`` here
    (the caller looks 64-hex ids up in the id index first).

    An id without ``__`` belongs to the primary.  An id with a prefix that names no configured secondary is
    refused (InvalidArgument naming the prefix), since forwarding it anywhere would only produce NOT_FOUND.
    """
    prefix, sep, rest = value.partition(ID_SEPARATOR)
    if not sep:
        return PRIMARY, value
    if prefix in secondaries and rest:
        return prefix, rest
    known = ", ".join(f"{s}{ID_SEPARATOR}<id>" for s in sorted(secondaries)) or "none"
    raise errors.InvalidArgument(
        f"{what} {value!r} has runtime prefix {prefix!r} that this CRI proxy does not serve "
        f"(prefixed ids it knows: {known}; ids of the primary runtime have no prefix)")


def external_image(runtime: str, raw: str) -> str:
    """An image name, ref, digest or id of ``runtime`` as the kubelet sees it (``virtlet.cloud/<raw>``)."""
    if runtime == PRIMARY or not raw or raw.startswith(f"{runtime}/"):
        return raw
    return f"{runtime}/{raw}"


def split_image(value: str, secondaries: Collection[str]) -> tuple[str, str]:
    """``(runtime, backend name)``: names starting with ``<secondary>/`` go there without the prefix."""
    head, sep, rest = value.partition("/")
    if sep and head in secondaries and rest:
        return head, rest
    return PRIMARY, value


def display(runtime: str) -> str:
    """A runtime's name for messages ("primary runtime" or "runtime virtlet.cloud")."""
    return "primary runtime" if runtime == PRIMARY else f"runtime {runtime}"
