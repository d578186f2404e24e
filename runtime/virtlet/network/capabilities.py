"""Pod annotations -> CNI capability arguments (``runtimeConfig``): bandwidth, fixed IPs and a fixed MAC.

Annotations read here (pod annotations of the sandbox; every error is ``errors.InvalidArgument`` naming the
annotation and the value):

- ``kubernetes.io/ingress-bandwidth`` / ``kubernetes.io/egress-bandwidth``: Kubernetes quantities in bits per
  second (``10M``, ``1G``), between 1k and 1P like the kubelet's own check.  They become the ``bandwidth``
  capability as containerd's CRI plugin passes it: ``ingressRate``/``egressRate`` in bits/s, the bursts fixed at
  ``2**32 - 1`` bits (the kubelet has no burst annotation).
- ``VirtletIPAddresses``: comma-separated addresses the pod wants (``10.1.2.3`` or ``10.1.2.3/24``; at most one
  IPv4 and one IPv6), the ``ips`` capability (host-local honours it when its plugin conf declares
  ``"capabilities": {"ips": true}``).
- ``VirtletMACAddress``: the MAC the pod's interface (and so the VM's NIC) gets, the ``mac`` capability (the
  ``tuning`` plugin, and others declaring it, honour it).  A unicast, non-zero MAC is required.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from virtlet import errors, quantity

INGRESS_BANDWIDTH = "kubernetes.io/ingress-bandwidth"
EGRESS_BANDWIDTH = "kubernetes.io/egress-bandwidth"
IP_ADDRESSES = "VirtletIPAddresses"
MAC_ADDRESS = "VirtletMACAddress"

#: The kubelet refuses rates below 1 kbit/s and above 1 Pbit/s (k8s.io/kubernetes/pkg/util/bandwidth).
MIN_RATE = 1000
MAX_RATE = 10**15
#: containerd's CRI plugin passes this burst (bits) with every rate: "no burst limit" for the bandwidth plugin.
BURST = 2**32 - 1
#: Longest value of the address annotations (two IPv6 CIDRs fit many times over).
MAX_VALUE = 256

_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}", re.ASCII)


def _rate(annotations: Mapping[str, str], key: str) -> int | None:
    text = annotations.get(key)
    if text is None:
        return None
    try:
        value = quantity.parse(text)
    except ValueError as exc:
        raise errors.InvalidArgument(f"annotation {key}: {exc}") from exc
    rate = -((-value.numerator) // value.denominator)  # rounded up, as resource.Quantity.Value() does
    if rate < MIN_RATE:
        raise errors.InvalidArgument(f"annotation {key}: {text!r} is below the smallest rate, 1k (bits/s)")
    if rate > MAX_RATE:
        raise errors.InvalidArgument(f"annotation {key}: {text!r} is above the largest rate, 1P (bits/s)")
    return rate


def bandwidth(annotations: Mapping[str, str]) -> dict[str, int]:
    """The ``bandwidth`` capability argument, empty when the pod asks for no shaping."""
    out: dict[str, int] = {}
    ingress = _rate(annotations, INGRESS_BANDWIDTH)
    egress = _rate(annotations, EGRESS_BANDWIDTH)
    if ingress is not None:
        out.update(ingressRate=ingress, ingressBurst=BURST)
    if egress is not None:
        out.update(egressRate=egress, egressBurst=BURST)
    return out


def fixed_ips(annotations: Mapping[str, str]) -> list[str]:
    """The ``ips`` capability argument: CIDRs (a bare address is passed as given; host-local takes both)."""
    text = annotations.get(IP_ADDRESSES)
    if text is None:
        return []
    if len(text) > MAX_VALUE:
        raise errors.InvalidArgument(f"annotation {IP_ADDRESSES}: {len(text)} characters, at most {MAX_VALUE}")
    out: list[str] = []
    families: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        try:
            iface = ipaddress.ip_interface(item)
        except ValueError:
            raise errors.InvalidArgument(
                f"annotation {IP_ADDRESSES}: {item!r} is not an IP address (examples: 10.1.2.3, "
                f"10.1.2.3/24, fd00::5/64; comma-separated, at most one per family)") from None
        ip = iface.ip
        if ip.is_unspecified or ip.is_loopback or ip.is_multicast or ip.is_link_local:
            raise errors.InvalidArgument(f"annotation {IP_ADDRESSES}: {item!r} cannot be a pod address")
        if "/" in item and iface.network.num_addresses > 1 and ip in (iface.network.network_address,
                                                                      iface.network.broadcast_address) \
                and iface.version == 4:
            raise errors.InvalidArgument(
                f"annotation {IP_ADDRESSES}: {item!r} is the network or broadcast address of its subnet")
        if iface.version in families:
            raise errors.InvalidArgument(
                f"annotation {IP_ADDRESSES}: at most one IPv{iface.version} address ({text!r})")
        families.add(iface.version)
        out.append(item)
    return out


def fixed_mac(annotations: Mapping[str, str]) -> str:
    """The ``mac`` capability argument (lower case), ``""`` when the pod asks for none."""
    text = annotations.get(MAC_ADDRESS)
    if text is None:
        return ""
    mac = text.strip()
    if not _MAC.fullmatch(mac):
        raise errors.InvalidArgument(
            f"annotation {MAC_ADDRESS}: {text[:64]!r} is not a MAC address (example: 02:42:ac:11:00:02)")
    mac = mac.lower()
    first = int(mac[:2], 16)
    if first & 1:
        raise errors.InvalidArgument(f"annotation {MAC_ADDRESS}: {mac} is a multicast MAC; use a unicast one "
                                     "(an even first octet, e.g. 02:...)")
    if mac == "00:00:00:00:00:00":
        raise errors.InvalidArgument(f"annotation {MAC_ADDRESS}: the all-zero MAC cannot be a NIC's")
    return mac


def from_annotations(annotations: Mapping[str, str]) -> dict[str, Any]:
    """Every capability argument the pod's annotations ask for (validated), keyed by CNI capability name."""
    out: dict[str, Any] = {}
    bw = bandwidth(annotations)
    if bw:
        out["bandwidth"] = bw
    ips = fixed_ips(annotations)
    if ips:
        out["ips"] = ips
    mac = fixed_mac(annotations)
    if mac:
        out["mac"] = mac
    return out
