"""The pod annotation ``k8s.v1.cni.cncf.io/networks`` (Multus' format): which extra networks a VM pod joins.

Two forms, as Multus accepts them:

- a comma-separated list of ``name``, ``namespace/name`` and either with ``@ifname``
  (``macvlan-a, team-a/storage@stor0``);
- a JSON list of objects with ``name`` (required), ``namespace``, ``interface``, ``mac`` and ``ips``
  (``[{"name": "storage", "interface": "stor0", "ips": ["10.1.2.3/24"]}]``).

Everything is checked before anything is made, and every error is ``errors.InvalidArgument`` naming the annotation,
the entry and the field.  Limits (a pod spec is hostile input): the value at most 4096 characters, at most
``MAX_EXTRA`` networks, names in the Kubernetes object-name grammar, interface names of the kernel's grammar
without ``lo``, the pod network's ``eth0`` and the prefixes of virtletd's own links (``vmbr``, ``vt``).  An entry
without ``interface`` gets ``net<position>`` (``net1`` for the first entry), as Multus names them.  Keys of
Multus' JSON form that virtletd does not implement (``default-route``, ``cni-args``, ``portMappings``,
``bandwidth``, ...) are refused rather than ignored: a pod asking for them would silently not get them.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from virtlet import errors

ANNOTATION = "k8s.v1.cni.cncf.io/networks"
MAX_EXTRA = 8
MAX_VALUE = 4096
KEYS = ("name", "namespace", "interface", "mac", "ips")
#: interface names the pod network and virtletd's own links use inside the pod netns
RESERVED_IFNAMES = ("lo", "eth0")
RESERVED_PREFIXES = ("vmbr", "vt")

_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", re.ASCII)  # a DNS-1123 subdomain
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)  # a DNS-1123 label
_IFNAME = re.compile(r"[A-Za-z0-9_-]{1,15}", re.ASCII)  # no '.', so cache file names stay unambiguous
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", re.ASCII)


@dataclass(frozen=True)
class Attachment:
    """One extra network a pod asked for (validated)."""

    name: str
    namespace: str  # "" when the pod named none (the pod's own namespace, then node-wide)
    ifname: str
    mac: str = ""  # lower case; "" when not asked for
    ips: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name


def _bad(where: str, text: str) -> errors.InvalidArgument:
    return errors.InvalidArgument(f"annotation {ANNOTATION}: {where}: {text}")


def _check_name(where: str, name: Any) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _bad(where, f"network name {str(name)[:64]!r} is not a Kubernetes object name "
                          "(lower-case letters, digits, '-' and '.', at most 253 characters)")
    return name


def _check_namespace(where: str, ns: Any) -> str:
    if not isinstance(ns, str) or not _NAMESPACE.fullmatch(ns):
        raise _bad(where, f"namespace {str(ns)[:64]!r} is not a Kubernetes namespace name")
    return ns


def _check_ifname(where: str, ifname: Any) -> str:
    if not isinstance(ifname, str) or not _IFNAME.fullmatch(ifname):
        raise _bad(where, f"interface {str(ifname)[:64]!r} is not an interface name (1-15 letters, digits, '_', '-')")
    if ifname in RESERVED_IFNAMES or ifname.startswith(RESERVED_PREFIXES):
        raise _bad(where, f"interface {ifname!r} is reserved (lo, eth0 and names starting with "
                          f"{' or '.join(RESERVED_PREFIXES)} are the pod network's and virtletd's)")
    return ifname


def _check_mac(where: str, mac: Any) -> str:
    if not isinstance(mac, str) or not _MAC.fullmatch(mac.strip()):
        raise _bad(where, f"mac {str(mac)[:64]!r} is not a MAC address (example: 02:42:ac:11:00:02)")
    text = str(mac).strip().lower()
    if int(text[:2], 16) & 1 or text == "00:00:00:00:00:00":
        raise _bad(where, f"mac {text} is multicast or all-zero; use a unicast one (e.g. 02:...)")
    return text


def _check_ips(where: str, ips: Any) -> tuple[str, ...]:
    if not isinstance(ips, list) or len(ips) > 2:
        raise _bad(where, "ips must be a list of at most two CIDRs (one IPv4, one IPv6)")
    families: set[int] = set()
    for item in ips:
        try:
            iface = ipaddress.ip_interface(item) if isinstance(item, str) else None
        except ValueError:
            iface = None
        if iface is None or iface.ip.is_unspecified or iface.ip.is_loopback or iface.ip.is_multicast \
                or iface.ip.is_link_local:
            raise _bad(where, f"ips entry {str(item)[:64]!r} is not a usable address (example: 10.1.2.3/24)")
        if iface.version in families:
            raise _bad(where, f"ips has more than one IPv{iface.version} address")
        families.add(iface.version)
    return tuple(ips)


def _from_text(item: str, position: int) -> Attachment:
    where = f"entry {position} ({item[:64]!r})"
    ref, _, ifname = item.partition("@")
    ns, _, name = ref.rpartition("/")
    return Attachment(name=_check_name(where, name.strip()),
                      namespace=_check_namespace(where, ns.strip()) if ns else "",
                      ifname=_check_ifname(where, ifname.strip()) if "@" in item else f"net{position}")


def _from_object(obj: Any, position: int) -> Attachment:
    where = f"entry {position}"
    if not isinstance(obj, dict):
        raise _bad(where, "each element of the JSON list must be an object with at least \"name\"")
    unknown = sorted(str(k)[:32] for k in obj if k not in KEYS)
    if unknown:
        raise _bad(where, f"key(s) {', '.join(unknown)} are not supported by virtletd (supported: "
                          f"{', '.join(KEYS)})")
    if "name" not in obj:
        raise _bad(where, "\"name\" is missing")
    where = f"entry {position} ({str(obj['name'])[:64]!r})"
    return Attachment(name=_check_name(where, obj["name"]),
                      namespace=_check_namespace(where, obj["namespace"]) if obj.get("namespace") else "",
                      ifname=_check_ifname(where, obj["interface"]) if obj.get("interface") else f"net{position}",
                      mac=_check_mac(where, obj["mac"]) if obj.get("mac") else "",
                      ips=_check_ips(where, obj["ips"]) if obj.get("ips") else ())


def parse(annotations: Mapping[str, str]) -> list[Attachment]:
    """The extra networks the pod's annotations ask for, in order (empty without the annotation)."""
    text = annotations.get(ANNOTATION)
    if text is None or not text.strip():
        return []
    if len(text) > MAX_VALUE:
        raise errors.InvalidArgument(f"annotation {ANNOTATION}: {len(text)} characters, at most {MAX_VALUE}")
    if text.lstrip().startswith("["):
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise errors.InvalidArgument(f"annotation {ANNOTATION}: not valid JSON: {exc}") from None
        if not isinstance(raw, list):
            raise errors.InvalidArgument(f"annotation {ANNOTATION}: the JSON form must be a list of objects")
        items: list[Any] = raw
    else:
        items = [part.strip() for part in text.split(",")]
    if len(items) > MAX_EXTRA:
        raise errors.InvalidArgument(
            f"annotation {ANNOTATION}: {len(items)} networks, a VM pod can join at most {MAX_EXTRA} extra networks")
    out = [(_from_text(item, i) if isinstance(item, str) else _from_object(item, i))
           for i, item in enumerate(items, start=1)]
    seen: set[str] = set()
    for a in out:
        if a.ifname in seen:
            raise errors.InvalidArgument(
                f"annotation {ANNOTATION}: interface {a.ifname!r} is named twice; give each network its own")
        seen.add(a.ifname)
    return out


def resolve_namespace(attachment: Attachment, pod_namespace: str) -> str:
    """The namespace an attachment resolves in: the pod's own.  Naming another namespace is refused: a node has no
    RBAC of its own, so a network kept under a namespace's directory is for that namespace's pods only."""
    if attachment.namespace and attachment.namespace != pod_namespace:
        raise errors.InvalidArgument(
            f"annotation {ANNOTATION}: network {attachment.label!r}: a pod of namespace {pod_namespace!r} can "
            f"only use networks of its own namespace or node-wide ones")
    return pod_namespace
