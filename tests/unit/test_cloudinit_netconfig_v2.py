"""network-config version 2 says the same as version 1: both renderings of one plan, read back and normalised
(MACs, names, MTUs, DHCP, addresses, default gateways and routes, DNS), must be equal."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
import yaml

from virtlet import errors
from virtlet.cloudinit import network
from virtlet.cloudinit.model import NicConfig
from virtlet.cloudinit.options import NETWORK_CONFIG_VERSION, parse_cloudinit_options

DNS = ["10.96.0.10", "fd00:96::a"]
SEARCH = ["default.svc.cluster.local", "svc.cluster.local"]

CASES = {
    "dual-stack with routes": [
        NicConfig(mac="02:42:0A:F4:01:05", mtu=1450, addresses=["10.244.1.5/24", "fd00:244:1::5/64"],
                  gateway="10.244.1.1",
                  routes=[("0.0.0.0/0", ""), ("10.96.0.0/12", ""), ("::/0", "fd00:244:1::1"),
                          ("fd00:96::/108", "fd00:244:1::1")])],
    "two NICs, the second with its own default route (dropped) and a DHCP third": [
        NicConfig(mac="02:00:00:00:00:01", addresses=["10.1.0.2/24"], gateway="10.1.0.1"),
        NicConfig(mac="02:00:00:00:00:02", addresses=["10.2.0.2/24"], gateway="10.2.0.1",
                  routes=[("0.0.0.0/0", "10.2.0.1"), ("172.16.0.0/16", "10.2.0.254")]),
        NicConfig(mac="02:00:00:00:00:03")],
    "IPv6 only": [NicConfig(mac="02:00:00:00:00:04", addresses=["fd00::4/64"], routes=[("::/0", "fd00::1")])],
}


def _cidr(network: str, netmask: str | None = None) -> str:
    return str(ipaddress.ip_network(f"{network}/{netmask}" if netmask else network, strict=False))


def from_v1(doc: dict[str, Any]) -> dict[str, Any]:
    assert doc["version"] == 1
    nics: dict[str, Any] = {}
    dns: tuple[list[str], list[str]] = ([], [])
    for entry in doc["config"]:
        if entry["type"] == "nameserver":
            dns = (entry["address"], entry.get("search", []))
            continue
        addrs, routes, dhcp = [], [], False
        for s in entry["subnets"]:
            if s["type"] == "dhcp":
                dhcp = True
                continue
            addr = s["address"] if s["type"] == "static6" else str(
                ipaddress.ip_interface(f"{s['address']}/{s['netmask']}"))
            addrs.append(addr)
            if "gateway" in s:
                routes.append(("0.0.0.0/0" if s["type"] == "static" else "::/0", s["gateway"]))
            routes += [(_cidr(r["network"], r.get("netmask")), r.get("gateway")) for r in s.get("routes", [])]
        nics[entry["mac_address"]] = {"name": entry["name"], "mtu": entry.get("mtu"), "dhcp": dhcp,
                                      "addresses": addrs, "routes": sorted(routes, key=str)}
    return {"nics": nics, "dns": dns}


def from_v2(doc: dict[str, Any]) -> dict[str, Any]:
    assert doc["version"] == 2 and set(doc) == {"version", "ethernets"}
    nics: dict[str, Any] = {}
    dns: tuple[list[str], list[str]] = ([], [])
    for name, e in doc["ethernets"].items():
        assert e["set-name"] == name
        if "nameservers" in e:
            assert dns == ([], []), "name servers on more than one NIC"
            dns = (e["nameservers"]["addresses"], e["nameservers"].get("search", []))
        routes = [(_cidr(r["to"]), r.get("via")) for r in e.get("routes", [])]
        routes += [(default, e[key]) for key, default in (("gateway4", "0.0.0.0/0"), ("gateway6", "::/0")) if key in e]
        nics[e["match"]["macaddress"]] = {
            "name": name, "mtu": e.get("mtu"), "dhcp": bool(e.get("dhcp4")), "addresses": e.get("addresses", []),
            "routes": sorted(routes, key=str)}
    return {"nics": nics, "dns": dns}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("force_dhcp", [False, True])
def test_v2_has_the_same_content_as_v1(case: str, force_dhcp: bool) -> None:
    plan = network.plan_network(CASES[case], force_dhcp)
    v1 = yaml.safe_load(network.nocloud_network_config(plan, DNS, SEARCH))
    v2 = yaml.safe_load(network.nocloud_network_config_v2(plan, DNS, SEARCH))
    assert from_v2(v2) == from_v1(v1)


def test_v2_rendering_of_a_dual_stack_nic() -> None:
    plan = network.plan_network(CASES["dual-stack with routes"], False)
    doc = yaml.safe_load(network.nocloud_network_config_v2(plan, DNS, SEARCH))
    assert doc == {"version": 2, "ethernets": {"eth0": {
        "match": {"macaddress": "02:42:0a:f4:01:05"}, "set-name": "eth0", "mtu": 1450,
        "addresses": ["10.244.1.5/24", "fd00:244:1::5/64"], "gateway4": "10.244.1.1", "gateway6": "fd00:244:1::1",
        "routes": [{"to": "10.96.0.0/12", "via": "10.244.1.1"}, {"to": "fd00:96::/108", "via": "fd00:244:1::1"}],
        "nameservers": {"addresses": DNS, "search": SEARCH}}}}


def test_the_annotation_selects_the_version() -> None:
    assert parse_cloudinit_options({}).network_config_version == 1
    assert parse_cloudinit_options({NETWORK_CONFIG_VERSION: "2"}).network_config_version == 2
    assert parse_cloudinit_options({NETWORK_CONFIG_VERSION: " 1 "}).network_config_version == 1
    for bad in ("3", "v2", "two", "2.0", "x" * 300):
        with pytest.raises(errors.InvalidArgument, match=NETWORK_CONFIG_VERSION):
            parse_cloudinit_options({NETWORK_CONFIG_VERSION: bad})
