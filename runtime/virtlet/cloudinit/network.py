"""Guest network configuration from the CNI result: NoCloud network-config v1 or v2, ConfigDrive
network_data.json.

Both renderers share one plan built by ``plan_network``, so the two formats cannot disagree:

* NICs are matched by MAC and named ``eth<i>`` in the given order.
* A NIC without addresses (or every NIC, with VirtletForceDHCPNetworkConfig) uses DHCP; routes of a DHCP NIC
  are left to the DHCP server.
* Only the first NIC gets a default gateway (its ``gateway``, else a ``0.0.0.0/0``/``::/0`` route of its own);
  default routes on other NICs are dropped, since a guest with two default routes picks one at random.
* Other routes go to the NIC's subnet that contains their gateway, else to its first subnet of that family.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from virtlet import errors
from virtlet.cloudinit import yamlio
from virtlet.cloudinit.model import NicConfig

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


@dataclass
class PlannedRoute:
    network: IPNetwork
    gateway: IPAddress | None


@dataclass
class PlannedSubnet:
    address: IPInterface
    gateway: IPAddress | None = None
    routes: list[PlannedRoute] = field(default_factory=list)


@dataclass
class PlannedNic:
    name: str
    mac: str
    mtu: int | None
    dhcp: bool
    subnets: list[PlannedSubnet] = field(default_factory=list)


def plan_network(nics: Sequence[NicConfig], force_dhcp: bool) -> list[PlannedNic]:
    """Check the CNI-derived NIC list and decide addresses, the default gateway and routes per NIC."""
    planned = []
    for index, nic in enumerate(nics):
        where = f"network interface {index} (eth{index})"
        mac = nic.mac.strip().lower()
        if not _MAC.match(mac):
            raise errors.InvalidArgument(f"{where}: MAC address {nic.mac!r} is not six ':'-separated bytes")
        mtu = nic.mtu or None  # 0 means "not known", as in a CNI result without an MTU
        if mtu is not None and not 68 <= mtu <= 65535:
            raise errors.InvalidArgument(f"{where}: MTU {mtu} is outside 68-65535")
        addresses = [_interface(where, a) for a in nic.addresses]
        dhcp = force_dhcp or not addresses
        p = PlannedNic(name=f"eth{index}", mac=mac, mtu=mtu, dhcp=dhcp)
        planned.append(p)
        if dhcp:
            continue
        p.subnets = [PlannedSubnet(address=a) for a in addresses]
        gateways = [_address(where, nic.gateway)] if nic.gateway else []
        for dst, via in nic.routes:
            net = _network(where, dst)
            gw = _address(where, via) if via else (_address(where, nic.gateway) if nic.gateway else None)
            if net.prefixlen == 0:
                if gw is not None and gw not in gateways:
                    gateways.append(gw)
                continue
            subnet = _subnet_for(p.subnets, net.version, gw)
            if subnet is not None:
                subnet.routes.append(PlannedRoute(network=net, gateway=gw))
        if index == 0:
            for gw in gateways:
                subnet = _subnet_for(p.subnets, gw.version, gw)
                if subnet is not None and subnet.gateway is None:
                    subnet.gateway = gw
    return planned


def _subnet_for(subnets: list[PlannedSubnet], version: int, gw: IPAddress | None) -> PlannedSubnet | None:
    same_family = [s for s in subnets if s.address.version == version]
    for s in same_family:
        if gw is not None and gw in s.address.network:
            return s
    return same_family[0] if same_family else None


def _interface(where: str, text: str) -> IPInterface:
    try:
        return ipaddress.ip_interface(text.strip())
    except ValueError:
        raise errors.InvalidArgument(f"{where}: address {text!r} is not an IP address with prefix") from None


def _network(where: str, text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise errors.InvalidArgument(f"{where}: route destination {text!r} is not a CIDR") from None


def _address(where: str, text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise errors.InvalidArgument(f"{where}: gateway {text!r} is not an IP address") from None


def _dns_servers(servers: Sequence[str]) -> list[str]:
    return [str(_address("DNS configuration", s)) for s in servers]


# ---- NoCloud: network-config version 1 -------------------------------------------------------------------


def nocloud_network_config(
    plan: Sequence[PlannedNic], dns_servers: Sequence[str], dns_search: Sequence[str]
) -> bytes:
    config: list[dict[str, Any]] = []
    for nic in plan:
        entry: dict[str, Any] = {"type": "physical", "name": nic.name, "mac_address": nic.mac}
        if nic.mtu is not None:
            entry["mtu"] = nic.mtu
        entry["subnets"] = [{"type": "dhcp"}] if nic.dhcp else [_v1_subnet(s) for s in nic.subnets]
        config.append(entry)
    servers = _dns_servers(dns_servers)
    static = any(not nic.dhcp for nic in plan)
    if static and (servers or dns_search):
        ns: dict[str, Any] = {"type": "nameserver", "address": servers}
        if dns_search:
            ns["search"] = list(dns_search)
        config.append(ns)
    return yamlio.dump({"version": 1, "config": config}).encode()


def _v1_subnet(s: PlannedSubnet) -> dict[str, Any]:
    out: dict[str, Any]
    if s.address.version == 4:
        out = {"type": "static", "address": str(s.address.ip), "netmask": str(s.address.netmask)}
    else:
        out = {"type": "static6", "address": s.address.with_prefixlen}
    if s.gateway is not None:
        out["gateway"] = str(s.gateway)
    if s.routes:
        out["routes"] = [_v1_route(r) for r in s.routes]
    return out


def _v1_route(r: PlannedRoute) -> dict[str, Any]:
    out: dict[str, Any]
    if r.network.version == 4:
        out = {"network": str(r.network.network_address), "netmask": str(r.network.netmask)}
    else:
        out = {"network": r.network.with_prefixlen}
    if r.gateway is not None:
        out["gateway"] = str(r.gateway)
    return out


# ---- NoCloud: network-config version 2 (netplan style; annotation VirtletCloudInitNetworkConfigVersion: "2") --


def nocloud_network_config_v2(
    plan: Sequence[PlannedNic], dns_servers: Sequence[str], dns_search: Sequence[str]
) -> bytes:
    """The same content as version 1: each NIC matched by MAC and renamed, its MTU, DHCP or its addresses, the
    first NIC's default gateways as ``gateway4``/``gateway6`` and every NIC's other routes as ``routes``.
    Version 2 has no global name servers: they go on the first static NIC (cloud-init merges them into the
    guest's resolver configuration)."""
    ethernets: dict[str, Any] = {}
    servers = _dns_servers(dns_servers)
    dns_done = False
    for nic in plan:
        entry: dict[str, Any] = {"match": {"macaddress": nic.mac}, "set-name": nic.name}
        if nic.mtu is not None:
            entry["mtu"] = nic.mtu
        if nic.dhcp:
            entry["dhcp4"] = True
        else:
            entry["addresses"] = [s.address.with_prefixlen for s in nic.subnets]
            routes = []
            for s in nic.subnets:
                if s.gateway is not None:
                    # gateway4/6 (not a "to: ::/0" route): cloud-init maps them to the subnet's gateway exactly as
                    # v1's, which every renderer writes as the interface's gateway; its ENI renderer writes routes as
                    # net-tools "route add" lines, which fail on images without net-tools (seen on Debian 12)
                    entry[f"gateway{s.gateway.version}"] = str(s.gateway)
                routes += [_v2_route(r) for r in s.routes]
            if routes:
                entry["routes"] = routes
            if not dns_done and (servers or dns_search):
                ns: dict[str, Any] = {"addresses": servers}
                if dns_search:
                    ns["search"] = list(dns_search)
                entry["nameservers"] = ns
                dns_done = True
        ethernets[nic.name] = entry
    return yamlio.dump({"version": 2, "ethernets": ethernets}).encode()


def _v2_route(r: PlannedRoute) -> dict[str, Any]:
    out: dict[str, Any] = {"to": r.network.with_prefixlen}
    if r.gateway is not None:
        out["via"] = str(r.gateway)
    return out


# ---- ConfigDrive: OpenStack network_data.json ------------------------------------------------------------


def configdrive_network_data(plan: Sequence[PlannedNic], dns_servers: Sequence[str]) -> bytes:
    """links/networks/services as OpenStack writes them.  The format has no search-domain field."""
    links: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    for nic in plan:
        link: dict[str, Any] = {"id": nic.name, "type": "phy", "ethernet_mac_address": nic.mac}
        if nic.mtu is not None:
            link["mtu"] = nic.mtu
        links.append(link)
        if nic.dhcp:
            networks.append({"id": f"network{len(networks)}", "link": nic.name, "type": "ipv4_dhcp"})
            continue
        for s in nic.subnets:
            routes = [_od_route(r) for r in s.routes]
            if s.gateway is not None:
                default = ipaddress.ip_network("0.0.0.0/0" if s.gateway.version == 4 else "::/0")
                routes.insert(0, _od_route(PlannedRoute(network=default, gateway=s.gateway)))
            networks.append(
                {
                    "id": f"network{len(networks)}",
                    "link": nic.name,
                    "type": "ipv4" if s.address.version == 4 else "ipv6",
                    "ip_address": str(s.address.ip),
                    "netmask": str(s.address.netmask),
                    "routes": routes,
                }
            )
    static = any(not nic.dhcp for nic in plan)
    services = [{"type": "dns", "address": a} for a in _dns_servers(dns_servers)] if static else []
    doc = {"links": links, "networks": networks, "services": services}
    return (json.dumps(doc, indent=2) + "\n").encode()


def _od_route(r: PlannedRoute) -> dict[str, Any]:
    out: dict[str, Any] = {"network": str(r.network.network_address), "netmask": str(r.network.netmask)}
    if r.gateway is not None:
        out["gateway"] = str(r.gateway)
    return out
