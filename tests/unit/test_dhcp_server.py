"""DHCP server protocol logic: which packets get which answer, with which options, addressed how."""

from __future__ import annotations

import json
import random

from virtlet.network import dhcp_packet as dp
from virtlet.network import udp_frame
from virtlet.network.dhcp_server import DhcpConfig, NicLease, Responder, handle_frame

VM_MAC = "52:54:00:aa:bb:cc"
TAP = "vtabcdef012340"


def _config(routes: list[tuple[str, str]] | None = None) -> DhcpConfig:
    return DhcpConfig(nics=[NicLease(mac=VM_MAC, tap=TAP, ip="10.88.7.5", prefix=24, gateway="10.88.7.1",
                                     routes=routes if routes is not None else [("0.0.0.0/0", "")], mtu=1450,
                                     server_mac="02:11:22:33:44:55")],
                      dns_servers=["10.96.0.10"], dns_searches=["ns.svc.cluster.local", "svc.cluster.local"],
                      hostname="vm-one", lease_time=3600)


def _req(mtype: int, mac: str = VM_MAC, **kw) -> dp.DhcpPacket:
    opts = {dp.OPT_MESSAGE_TYPE: bytes([mtype])}
    opts.update(kw.pop("options", {}))
    return dp.DhcpPacket(op=dp.BOOTREQUEST, xid=42, chaddr=mac, options=opts, **kw)


def _answer(cfg: DhcpConfig, req: dp.DhcpPacket) -> dp.DhcpPacket | None:
    out = Responder(cfg).handle(req)
    return None if out is None else dp.DhcpPacket.decode(out[0].encode())


def test_discover_gets_offer_with_all_options() -> None:
    offer = _answer(_config(), _req(dp.DISCOVER))
    assert offer is not None and offer.message_type == dp.OFFER
    assert offer.op == dp.BOOTREPLY and offer.xid == 42 and offer.yiaddr == "10.88.7.5"
    o = offer.options
    assert o[dp.OPT_SUBNET_MASK] == bytes([255, 255, 255, 0])
    assert o[dp.OPT_ROUTER] == dp.encode_ips(["10.88.7.1"])
    assert offer.ip_option(dp.OPT_SERVER_ID) == "10.88.7.1"
    assert o[dp.OPT_DNS] == dp.encode_ips(["10.96.0.10"])
    assert o[dp.OPT_DOMAIN_NAME] == b"ns.svc.cluster.local"
    assert o[dp.OPT_DOMAIN_SEARCH] == dp.encode_domain_search(["ns.svc.cluster.local", "svc.cluster.local"])
    assert o[dp.OPT_HOSTNAME] == b"vm-one"
    assert o[dp.OPT_MTU] == dp.encode_u16(1450)
    assert o[dp.OPT_LEASE_TIME] == dp.encode_u32(3600)
    assert o[dp.OPT_RENEWAL_TIME] == dp.encode_u32(1800)
    assert o[dp.OPT_REBINDING_TIME] == dp.encode_u32(3150)
    assert dp.OPT_CLASSLESS_ROUTES not in o  # only a default route: option 3 says it all


def test_extra_routes_go_into_option_121_with_the_default_route() -> None:
    offer = _answer(_config([("0.0.0.0/0", ""), ("10.200.0.0/16", "10.88.7.254")]), _req(dp.DISCOVER))
    assert offer is not None
    assert dp.decode_classless_routes(offer.options[dp.OPT_CLASSLESS_ROUTES]) == [
        ("10.200.0.0/16", "10.88.7.254"), ("0.0.0.0/0", "10.88.7.1")]


def test_no_dns_means_no_dns_option() -> None:
    cfg = _config()
    cfg.dns_servers, cfg.dns_searches, cfg.hostname = [], [], ""
    offer = _answer(cfg, _req(dp.DISCOVER))
    assert offer is not None
    for code in (dp.OPT_DNS, dp.OPT_DOMAIN_NAME, dp.OPT_DOMAIN_SEARCH, dp.OPT_HOSTNAME):
        assert code not in offer.options


def test_request_for_pod_ip_gets_ack() -> None:
    req = _req(dp.REQUEST, options={dp.OPT_REQUESTED_IP: dp.encode_ips(["10.88.7.5"]),
                                    dp.OPT_SERVER_ID: dp.encode_ips(["10.88.7.1"])})
    ack = _answer(_config(), req)
    assert ack is not None and ack.message_type == dp.ACK and ack.yiaddr == "10.88.7.5"


def test_renewal_by_ciaddr_gets_ack() -> None:
    ack = _answer(_config(), _req(dp.REQUEST, ciaddr="10.88.7.5"))
    assert ack is not None and ack.message_type == dp.ACK and ack.ciaddr == "10.88.7.5"


def test_request_for_wrong_address_gets_nak() -> None:
    nak = _answer(_config(), _req(dp.REQUEST, options={dp.OPT_REQUESTED_IP: dp.encode_ips(["10.88.7.99"])}))
    assert nak is not None and nak.message_type == dp.NAK and nak.yiaddr == "0.0.0.0"
    assert dp.OPT_LEASE_TIME not in nak.options


def test_request_to_another_server_is_ignored() -> None:
    req = _req(dp.REQUEST, options={dp.OPT_REQUESTED_IP: dp.encode_ips(["10.88.7.5"]),
                                    dp.OPT_SERVER_ID: dp.encode_ips(["192.0.2.1"])})
    assert _answer(_config(), req) is None


def test_release_decline_and_unknown_mac_get_no_answer() -> None:
    assert _answer(_config(), _req(dp.RELEASE, ciaddr="10.88.7.5")) is None
    assert _answer(_config(), _req(dp.DECLINE)) is None
    assert _answer(_config(), _req(dp.DISCOVER, mac="52:54:00:00:00:01")) is None
    assert _answer(_config(), dp.DhcpPacket(op=dp.BOOTREPLY, chaddr=VM_MAC,
                                            options={dp.OPT_MESSAGE_TYPE: bytes([dp.DISCOVER])})) is None


def test_inform_gets_options_without_a_lease() -> None:
    ack = _answer(_config(), _req(dp.INFORM, ciaddr="10.88.7.5"))
    assert ack is not None and ack.message_type == dp.ACK and ack.yiaddr == "0.0.0.0"
    assert dp.OPT_LEASE_TIME not in ack.options and ack.options[dp.OPT_HOSTNAME] == b"vm-one"


def _client_frame(req: dp.DhcpPacket, src_mac: str = VM_MAC) -> bytes:
    return udp_frame.build(udp_frame.UdpFrame(src_mac=src_mac, dst_mac="ff:ff:ff:ff:ff:ff", src_ip="0.0.0.0",
                                              dst_ip="255.255.255.255", src_port=68, dst_port=67,
                                              payload=req.encode()))


def test_frame_path_broadcast_reply_when_asked() -> None:
    req = _req(dp.DISCOVER, flags=dp.BROADCAST_FLAG)
    out = handle_frame(Responder(_config()), _client_frame(req), TAP)
    assert out is not None and out[1] == TAP
    frame = udp_frame.parse(out[0])
    assert frame is not None
    assert (frame.dst_mac, frame.dst_ip) == ("ff:ff:ff:ff:ff:ff", "255.255.255.255")
    assert frame.src_ip == "10.88.7.1"
    assert (frame.src_mac, frame.src_port, frame.dst_port) == ("02:11:22:33:44:55", 67, 68)
    assert dp.DhcpPacket.decode(frame.payload).message_type == dp.OFFER


def test_frame_path_unicast_reply_to_client_mac() -> None:
    out = handle_frame(Responder(_config()), _client_frame(_req(dp.DISCOVER)), TAP)
    assert out is not None
    frame = udp_frame.parse(out[0])
    assert frame is not None and (frame.dst_mac, frame.dst_ip) == (VM_MAC, "10.88.7.5")


def test_frame_path_ignores_wrong_port_interface_and_spoofed_mac() -> None:
    responder = Responder(_config())
    frame = _client_frame(_req(dp.DISCOVER))
    assert handle_frame(responder, frame, "eth0") is None  # not the VM's tap
    assert handle_frame(responder, _client_frame(_req(dp.DISCOVER), src_mac="02:00:00:00:00:09"), TAP) is None


def test_frame_path_survives_garbage() -> None:
    responder = Responder(_config())
    good = _client_frame(_req(dp.DISCOVER))
    rng = random.Random(7)
    assert handle_frame(responder, b"", TAP) is None
    assert handle_frame(responder, b"\xff" * 400, TAP) is None
    for _ in range(500):
        data = bytearray(good)
        for _ in range(rng.randint(1, 10)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        handle_frame(responder, bytes(data[:rng.randint(0, len(data))]), TAP)  # must not raise


def test_config_roundtrip_through_json() -> None:
    cfg = _config([("0.0.0.0/0", ""), ("10.1.0.0/16", "10.88.7.2")])
    back = DhcpConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg


def test_server_id_without_gateway_is_a_subnet_address_not_the_vm() -> None:
    lease = NicLease(mac=VM_MAC, tap=TAP, ip="10.0.0.1", prefix=24)
    assert lease.server_id == "10.0.0.2"
