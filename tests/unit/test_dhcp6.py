"""Router advertisements, DHCPv6 and the proxied router address of the per-pod server (``ipv6_ra``), on frames."""

from __future__ import annotations

import ipaddress
import random
import struct

from virtlet.network import ipv6_wire as w
from virtlet.network.dhcp_server import DhcpConfig, NicLease
from virtlet.network.ipv6_ra import BURST, ROUTER_LIFETIME, V6Server

VM_MAC = "02:aa:bb:cc:dd:01"
SERVER_MAC = "02:00:00:00:00:01"
GW_MAC = "0a:58:0a:00:00:01"
VM_LL = w.link_local(VM_MAC)


def config(**kw: object) -> DhcpConfig:
    nic = NicLease(mac=VM_MAC, tap="vt0", ip="10.1.0.2", prefix=24, gateway="10.1.0.1", server_mac=SERVER_MAC,
                   ipv6=["fd6a:60::2/64"], ipv6_gateway="fd6a:60::1", ipv6_routes=[("::/0", "fd6a:60::1")],
                   uplink="eth0", mtu=1450)
    for k, v in kw.items():
        setattr(nic, k, v)
    return DhcpConfig(nics=[nic], dns_searches=["ns.svc.cluster.local"], lease_time=3600)


def icmp(src: str, dst: str, msg: bytes, src_mac: str = VM_MAC, hop: int = 255) -> bytes:
    return w.build(src_mac, "33:33:00:00:00:02", src, dst, w.PROTO_ICMPV6, msg, hop_limit=hop)


def dhcp(msg: w.Dhcp6Message, src_mac: str = VM_MAC) -> bytes:
    return w.build(src_mac, "33:33:00:01:00:02", VM_LL, "ff02::1:2", w.PROTO_UDP, w.udp(546, 547, msg.encode()))


def rs() -> bytes:
    return icmp(VM_LL, "ff02::2", struct.pack("!BBHI", w.RS, 0, 0, 0))


def ra_fields(frame: bytes) -> dict[str, object]:
    pkt = w.parse(frame)
    assert pkt is not None and pkt.proto == w.PROTO_ICMPV6 and pkt.hop_limit == 255
    msg = pkt.payload
    assert msg[0] == w.RA
    out: dict[str, object] = {"src": pkt.src, "dst": pkt.dst, "flags": msg[5],
                              "lifetime": struct.unpack_from("!H", msg, 6)[0], "prefixes": []}
    pos = 16
    while pos < len(msg):
        kind, length = msg[pos], msg[pos + 1] * 8
        body = msg[pos + 2:pos + length]
        if kind == 1:
            out["slla"] = w.mac_str(body[:6])
        elif kind == 5:
            out["mtu"] = struct.unpack_from("!I", body, 2)[0]
        elif kind == 3:
            out["prefixes"].append((str(ipaddress.IPv6Address(body[14:30])), body[0], body[1]))  # type: ignore[union-attr]
        pos += length
    return out


def learn_gateway(srv: V6Server) -> None:
    na = w.neighbor_advert("fd6a:60::1", GW_MAC, True)
    srv.handle(w.build(GW_MAC, SERVER_MAC, "fd6a:60::1", w.link_local(SERVER_MAC), w.PROTO_ICMPV6, na), "eth0", 1.0)


def test_ra_before_and_after_the_gateway_mac_is_known() -> None:
    srv = V6Server(config(), 0.0)
    (frame, ifname), = srv.handle(rs(), "vt0", 0.5)
    ra = ra_fields(frame)
    assert ifname == "vt0" and ra["dst"] == "ff02::1"
    assert ra["flags"] == 0xC0  # M and O: the address comes from DHCPv6
    assert ra["lifetime"] == 0  # no router to announce yet
    assert ra["prefixes"] == [("fd6a:60::", 64, 0x80)]  # on-link, never autonomous (no SLAAC address)
    assert ra["mtu"] == 1450
    learn_gateway(srv)
    (frame, _), = srv.handle(rs(), "vt0", 2.0)
    ra = ra_fields(frame)
    assert ra["lifetime"] == ROUTER_LIFETIME and ra["slla"] == GW_MAC
    assert ra["src"] == w.link_local(GW_MAC)


def test_tick_solicits_the_gateway_on_the_uplink_and_advertises_on_the_tap() -> None:
    srv = V6Server(config(), 0.0)
    sent = srv.tick(0.0)
    assert [i for _, i in sent] == ["eth0", "vt0"]
    ns = w.parse(sent[0][0])
    assert ns is not None and ns.payload[0] == w.NS and w.nd_target(ns.payload) == "fd6a:60::1"
    assert ns.dst == w.solicited_node("fd6a:60::1")
    assert srv.tick(0.5) == [] and srv.next_due() > 0.5


def test_proxied_neighbour_advert_for_the_router_address() -> None:
    srv = V6Server(config(), 0.0)
    router = w.link_local(GW_MAC)
    assert srv.handle(icmp(VM_LL, w.solicited_node(router), w.neighbor_solicit(router, VM_MAC)), "vt0", 0.1) == []
    learn_gateway(srv)
    (frame, _), = srv.handle(icmp(VM_LL, w.solicited_node(router), w.neighbor_solicit(router, VM_MAC)), "vt0", 1)
    na = w.parse(frame)
    assert na is not None and na.dst == VM_LL and na.payload[0] == w.NA
    assert w.nd_target(na.payload) == router and w.mac_str(na.payload[26:32]) == GW_MAC
    # other targets are not ours to answer
    other = "fe80::1234"
    assert srv.handle(icmp(VM_LL, w.solicited_node(other), w.neighbor_solicit(other, VM_MAC)), "vt0", 1) == []


def test_link_local_gateway_is_the_router_address() -> None:
    srv = V6Server(config(ipv6_gateway="fe80::1", ipv6_routes=[("::/0", "fe80::1")]), 0.0)
    na = w.neighbor_advert("fe80::1", GW_MAC, True)
    srv.handle(w.build(GW_MAC, SERVER_MAC, "fe80::1", w.link_local(SERVER_MAC), w.PROTO_ICMPV6, na), "eth0", 1.0)
    (frame, _), = srv.handle(rs(), "vt0", 2.0)
    assert ra_fields(frame)["src"] == "fe80::1"


def client_id() -> bytes:
    return struct.pack("!HH", 3, 1) + w.mac_bytes(VM_MAC)


def solicit(*extra: tuple[int, bytes]) -> w.Dhcp6Message:
    ia = b"\0\0\0\x07" + b"\0" * 8
    return w.Dhcp6Message(w.SOLICIT, b"\x01\x02\x03", [(w.OPT_CLIENTID, client_id()), (w.OPT_IA_NA, ia), *extra])


def reply_of(srv: V6Server, msg: w.Dhcp6Message) -> w.Dhcp6Message:
    (frame, _), = srv.handle(dhcp(msg), "vt0", 1.0)
    pkt = w.parse(frame)
    assert pkt is not None and pkt.dst == VM_LL
    sport, dport, body = w.parse_udp(pkt.payload)
    assert (sport, dport) == (547, 546)
    return w.Dhcp6Message.decode(body)


def test_dhcpv6_solicit_request_renew_give_exactly_the_pod_address() -> None:
    srv = V6Server(config(), 0.0)
    adv = reply_of(srv, solicit())
    assert adv.msg_type == w.ADVERTISE and adv.xid == b"\x01\x02\x03"
    assert adv.get(w.OPT_CLIENTID) == client_id() and adv.get(w.OPT_PREFERENCE) == b"\xff"
    ia = adv.get(w.OPT_IA_NA)
    assert ia is not None and w.ia_addresses(ia) == (b"\0\0\0\x07", ["fd6a:60::2"])
    assert adv.get(w.OPT_DOMAIN_LIST) == b"\x02ns\x03svc\x07cluster\x05local\x00"
    server_id = adv.get(w.OPT_SERVERID)
    assert server_id is not None
    for mtype in (w.REQUEST, w.RENEW):
        req = w.Dhcp6Message(mtype, b"\x09\x09\x09", [(w.OPT_CLIENTID, client_id()), (w.OPT_SERVERID, server_id),
                                                       (w.OPT_IA_NA, ia)])
        rep = reply_of(srv, req)
        assert rep.msg_type == w.REPLY and w.ia_addresses(rep.get(w.OPT_IA_NA) or b"")[1] == ["fd6a:60::2"]
    # a request for another server is not ours
    other = w.Dhcp6Message(w.REQUEST, b"\x09\x09\x09", [(w.OPT_CLIENTID, client_id()),
                                                         (w.OPT_SERVERID, b"\0\3\0\1" + b"\1" * 6)])
    assert srv.handle(dhcp(other), "vt0", 1.0) == []
    rapid = reply_of(srv, solicit((w.OPT_RAPID_COMMIT, b"")))
    assert rapid.msg_type == w.REPLY and rapid.get(w.OPT_RAPID_COMMIT) == b""


def test_confirm_of_another_address_is_not_on_link() -> None:
    srv = V6Server(config(), 0.0)
    ia = w.ia_na(b"\0\0\0\1", 0, 0, ["fd00::99"], 0)
    rep = reply_of(srv, w.Dhcp6Message(w.CONFIRM, b"abc", [(w.OPT_CLIENTID, client_id()), (w.OPT_IA_NA, ia)]))
    assert struct.unpack("!H", (rep.get(w.OPT_STATUS_CODE) or b"")[:2])[0] == w.STATUS_NOT_ON_LINK


def test_only_the_vm_mac_on_its_tap_is_answered() -> None:
    srv = V6Server(config(), 0.0)
    assert srv.handle(dhcp(solicit(), src_mac="02:aa:bb:cc:dd:99"), "vt0", 1.0) == []
    assert srv.handle(dhcp(solicit()), "eth0", 1.0) == []
    assert srv.handle(icmp(VM_LL, "ff02::2", struct.pack("!BBHI", w.RS, 0, 0, 0), hop=64), "vt0", 1.0) == []
    assert not V6Server(config(ipv6=[]), 0.0).active  # no IPv6 on the NIC: nothing is served


def test_replies_are_rate_limited() -> None:
    srv = V6Server(config(), 0.0)
    answered = sum(len(srv.handle(rs(), "vt0", 1.0)) for _ in range(200))
    assert answered <= BURST + 10


def test_malformed_and_random_frames_are_dropped() -> None:
    srv = V6Server(config(), 0.0)
    good = dhcp(solicit())
    rng = random.Random(6)
    for i in range(2000):
        frame = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            frame[rng.randrange(14, len(frame))] = rng.randrange(256)
        srv.handle(bytes(frame[:rng.randint(0, len(frame))]), "vt0", float(i))
    bad_opts = w.Dhcp6Message(w.SOLICIT, b"abc").encode() + b"\0\1\xff\xff"
    frame = w.build(VM_MAC, "33:33:00:01:00:02", VM_LL, "ff02::1:2", w.PROTO_UDP, w.udp(546, 547, bad_opts))
    assert srv.handle(frame, "vt0", 9999.0) == []
