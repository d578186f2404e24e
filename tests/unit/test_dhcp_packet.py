"""DHCP message codec and Ethernet/IPv4/UDP framing."""

from __future__ import annotations

import random

import pytest

from virtlet.network import dhcp_packet as dp
from virtlet.network import udp_frame


def _discover() -> dp.DhcpPacket:
    return dp.DhcpPacket(op=dp.BOOTREQUEST, xid=0x1234ABCD, flags=dp.BROADCAST_FLAG,
                         chaddr="52:54:00:12:34:56",
                         options={dp.OPT_MESSAGE_TYPE: bytes([dp.DISCOVER]),
                                  dp.OPT_PARAM_REQUEST: bytes([1, 3, 6, 12, 15, 26, 119, 121])})


def test_roundtrip_keeps_header_and_options() -> None:
    pkt = _discover()
    pkt.options[dp.OPT_HOSTNAME] = b"vm-one"
    data = pkt.encode()
    assert len(data) >= 300 and data[236:240] == dp.MAGIC_COOKIE
    back = dp.DhcpPacket.decode(data)
    assert back.xid == 0x1234ABCD and back.flags == dp.BROADCAST_FLAG
    assert back.chaddr == "52:54:00:12:34:56" and back.message_type == dp.DISCOVER
    assert back.options[dp.OPT_HOSTNAME] == b"vm-one"
    assert back.options[dp.OPT_PARAM_REQUEST] == bytes([1, 3, 6, 12, 15, 26, 119, 121])


def test_long_option_is_split_and_concatenated_again() -> None:
    pkt = _discover()
    pkt.options[dp.OPT_DOMAIN_SEARCH] = bytes(range(256)) * 2  # 512 bytes -> 3 instances (RFC 3396)
    back = dp.DhcpPacket.decode(pkt.encode())
    assert back.options[dp.OPT_DOMAIN_SEARCH] == bytes(range(256)) * 2


def test_ip_option_and_addresses() -> None:
    pkt = dp.DhcpPacket(ciaddr="10.1.2.3", yiaddr="10.1.2.4",
                        options={dp.OPT_REQUESTED_IP: dp.encode_ips(["10.9.8.7"])})
    back = dp.DhcpPacket.decode(pkt.encode())
    assert back.ciaddr == "10.1.2.3" and back.yiaddr == "10.1.2.4"
    assert back.ip_option(dp.OPT_REQUESTED_IP) == "10.9.8.7"
    assert back.ip_option(dp.OPT_SERVER_ID) is None


@pytest.mark.parametrize("mutate", [
    lambda d: d[:100],                                   # too short
    lambda d: d[:236] + b"\0\0\0\0" + d[240:],           # no magic cookie
    lambda d: bytes([7]) + d[1:],                        # bad op
    lambda d: d[:1] + bytes([6]) + d[2:],                # not Ethernet
    lambda d: d[:240] + bytes([12, 200, 1, 2]),          # option runs past the end
    lambda d: d[:240] + bytes([12, 1, 65]),              # not terminated by END
    lambda d: d[:240] + bytes([12]),                     # option without length
])
def test_malformed_packets_raise_malformed(mutate) -> None:
    with pytest.raises(dp.MalformedPacket):
        dp.DhcpPacket.decode(mutate(_discover().encode()))


def test_random_garbage_only_ever_raises_malformed() -> None:
    rng = random.Random(5)
    good = _discover().encode()
    for _ in range(500):
        data = bytearray(good)
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data[:rng.randint(0, len(data))])
        try:
            dp.DhcpPacket.decode(data)
        except dp.MalformedPacket:
            pass


def test_classless_routes_rfc3442_encoding() -> None:
    routes = [("10.0.0.0/8", "10.88.0.1"), ("192.168.5.0/24", "0.0.0.0"), ("0.0.0.0/0", "10.88.0.1")]
    raw = dp.encode_classless_routes(routes)
    assert raw == bytes([8, 10, 10, 88, 0, 1, 24, 192, 168, 5, 0, 0, 0, 0, 0, 10, 88, 0, 1])
    assert dp.decode_classless_routes(raw) == routes


def test_domain_search_rfc3397_encoding() -> None:
    assert dp.encode_domain_search(["svc.cluster.local", "example.org."]) == (
        b"\x03svc\x07cluster\x05local\x00\x07example\x03org\x00")
    with pytest.raises(ValueError):
        dp.encode_domain_search(["bad..name"])


def test_udp_frame_roundtrip_with_valid_checksums() -> None:
    frame = udp_frame.UdpFrame(src_mac="02:00:00:00:00:01", dst_mac="ff:ff:ff:ff:ff:ff", src_ip="10.88.0.1",
                               dst_ip="255.255.255.255", src_port=67, dst_port=68, payload=b"hello dhcp")
    raw = udp_frame.build(frame)
    assert udp_frame.checksum(raw[14:34]) == 0  # IPv4 header checksum verifies
    assert udp_frame.parse(raw) == frame


def test_udp_frame_ignores_other_traffic_and_rejects_broken_headers() -> None:
    raw = udp_frame.build(udp_frame.UdpFrame("02:00:00:00:00:01", "02:00:00:00:00:02", "1.2.3.4", "5.6.7.8",
                                             1000, 2000, b"x"))
    arp = raw[:12] + b"\x08\x06" + raw[14:]
    assert udp_frame.parse(arp) is None
    tcp = raw[:23] + bytes([6]) + raw[24:]
    assert udp_frame.parse(tcp) is None
    assert udp_frame.parse(raw[:20]) is None
    with pytest.raises(udp_frame.BadFrame):
        udp_frame.parse(raw[:14] + bytes([0x41]) + raw[15:])  # IHL 4 bytes
    with pytest.raises(udp_frame.BadFrame):
        udp_frame.parse(raw[:38] + b"\xff\xff" + raw[40:])  # UDP length past the end
