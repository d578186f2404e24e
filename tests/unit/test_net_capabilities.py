"""Pod annotations -> CNI capability args (bandwidth, fixed IPs, fixed MAC), with every bad value refused."""

from __future__ import annotations

import pytest

from virtlet import errors
from virtlet.cloudinit.model import NicConfig
from virtlet.cloudinit.network import plan_network
from virtlet.network import capabilities as caps
from virtlet.network.model import NicInfo, PodNetworkInfo, SandboxNetSpec
from virtlet.network.pod_network import _assign_routes, _check_fixed_addresses


def test_no_annotations_no_args() -> None:
    assert caps.from_annotations({"other": "x"}) == {}


def test_bandwidth_as_containerd_passes_it() -> None:
    got = caps.from_annotations({caps.INGRESS_BANDWIDTH: "10M", caps.EGRESS_BANDWIDTH: "1.5Mi"})
    assert got == {"bandwidth": {"ingressRate": 10_000_000, "ingressBurst": 2**32 - 1,
                                 "egressRate": 1_572_864, "egressBurst": 2**32 - 1}}
    assert caps.bandwidth({caps.EGRESS_BANDWIDTH: "1k"}) == {"egressRate": 1000, "egressBurst": 2**32 - 1}
    assert caps.bandwidth({caps.INGRESS_BANDWIDTH: "1000001m"}) == {"ingressRate": 1001, "ingressBurst": 2**32 - 1}


@pytest.mark.parametrize("value", ["fast", "", "10 M", "-1M", "999", "2P", "1e99999999", "1" * 100, "0"])
def test_bad_bandwidth_is_invalid_argument_naming_the_annotation(value: str) -> None:
    for key in (caps.INGRESS_BANDWIDTH, caps.EGRESS_BANDWIDTH):
        with pytest.raises(errors.InvalidArgument, match=key):
            caps.from_annotations({key: value})


def test_fixed_ips() -> None:
    assert caps.from_annotations({caps.IP_ADDRESSES: "10.1.2.3/24, fd00::5/64"}) == {
        "ips": ["10.1.2.3/24", "fd00::5/64"]}
    assert caps.fixed_ips({caps.IP_ADDRESSES: "10.1.2.3"}) == ["10.1.2.3"]


@pytest.mark.parametrize("value", ["", "10.1.2", "10.1.2.3,10.1.2.4", "127.0.0.1", "0.0.0.0", "224.0.0.1",
                                   "fe80::1", "10.1.2.0/24", "10.1.2.255/24", "10.1.2.3/33", "x" * 300,
                                   "10.1.2.3;rm -rf /"])
def test_bad_ips_are_invalid_argument(value: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=caps.IP_ADDRESSES):
        caps.from_annotations({caps.IP_ADDRESSES: value})


def test_fixed_mac() -> None:
    assert caps.from_annotations({caps.MAC_ADDRESS: "02:AB:cd:00:00:01"}) == {"mac": "02:ab:cd:00:00:01"}


@pytest.mark.parametrize("value", ["", "02:ab:cd:00:00", "01:00:5e:00:00:01", "00:00:00:00:00:00",
                                   "02-ab-cd-00-00-01", "02:ab:cd:00:00:01:02", "zz:ab:cd:00:00:01", "x" * 500])
def test_bad_mac_is_invalid_argument(value: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=caps.MAC_ADDRESS):
        caps.from_annotations({caps.MAC_ADDRESS: value})


def _info(mac: str, ip: str, v6: list[str]) -> PodNetworkInfo:
    nic = NicInfo(index=0, mac=mac, mtu=1500, ip=ip, prefix=24, gateway="10.1.2.1", routes=[], veth="eth0",
                  bridge="vmbr0", tap="vt0", ipv6=v6)
    return PodNetworkInfo(sandbox_id="s", netns_path="/run/netns/s", nics=[nic], dns_servers=[], dns_searches=[],
                          dns_options=[])


def _spec(**asked: object) -> SandboxNetSpec:
    return SandboxNetSpec(sandbox_id="s", netns_path="/run/netns/s", pod_name="p", pod_namespace="d", pod_uid="u",
                          annotation_caps=dict(asked))


def test_fixed_addresses_the_network_did_not_honour_fail_the_pod() -> None:
    info = _info("02:00:00:00:00:05", "10.1.2.3", ["fd00::5/64"])
    _check_fixed_addresses(_spec(mac="02:00:00:00:00:05", ips=["10.1.2.3/24", "fd00::5"]), info)
    _check_fixed_addresses(_spec(), info)
    with pytest.raises(errors.FailedPrecondition, match="VirtletMACAddress.*tuning"):
        _check_fixed_addresses(_spec(mac="02:00:00:00:00:06"), info)
    with pytest.raises(errors.FailedPrecondition, match="VirtletIPAddresses asks for 10.1.2.4"):
        _check_fixed_addresses(_spec(ips=["10.1.2.4"]), info)


def test_v6_routes_get_their_gateway_and_reach_the_guest_plan_but_not_dhcp() -> None:
    """IPv6 routes of the CNI result are kept with the v6 gateway filled in, so cloud-init's plan gives the guest
    a v6 default route; the DHCPv4 server never sees them."""
    nic = _info("02:00:00:00:00:05", "10.1.2.3", ["fd00::5/64"]).nics[0]
    nic.ipv6_gateway = "fd00::1"
    _assign_routes([nic], [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}, {"dst": "fd10::/64", "gw": "fd00::fe"},
                           {"dst": "::/0", "gw": "not-an-address"}])
    assert [(r.dst, r.gw) for r in nic.routes] == [("0.0.0.0/0", ""), ("::/0", "fd00::1"),
                                                   ("fd10::/64", "fd00::fe")]
    plan = plan_network([NicConfig(mac=nic.mac, addresses=[f"{nic.ip}/{nic.prefix}", *nic.ipv6],
                                   gateway=nic.gateway, routes=[(r.dst, r.gw) for r in nic.routes])], False)
    v6 = next(s for s in plan[0].subnets if s.address.version == 6)
    assert str(v6.gateway) == "fd00::1" and [str(r.network) for r in v6.routes] == ["fd10::/64"]
