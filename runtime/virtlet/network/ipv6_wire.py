"""Ethernet + IPv6 framing, ICMPv6 neighbour discovery messages and the DHCPv6 message codec for the per-pod
server (``ipv6_ra``).  Pure functions over bytes: every parser bounds its reads by the lengths it was given and
raises ``ValueError`` on anything malformed, which the server treats as "drop without a reply"."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

# the MAC codec and the ones'-complement checksum are the same as the IPv4 frames'
from virtlet.network.udp_frame import ETH_HEADER as ETH_HEADER
from virtlet.network.udp_frame import checksum
from virtlet.network.udp_frame import mac_bytes as mac_bytes
from virtlet.network.udp_frame import mac_str as mac_str

ETH_P_IPV6 = 0x86DD
IP6_HEADER = struct.Struct("!IHBB16s16s")
PROTO_UDP = 17
PROTO_ICMPV6 = 58

# ICMPv6 types (RFC 4861)
RS, RA, NS, NA = 133, 134, 135, 136
# DHCPv6 (RFC 8415) message types and options
SOLICIT, ADVERTISE, REQUEST, CONFIRM, RENEW, REBIND, REPLY, RELEASE, DECLINE = 1, 2, 3, 4, 5, 6, 7, 8, 9
INFORMATION_REQUEST = 11
OPT_CLIENTID, OPT_SERVERID, OPT_IA_NA, OPT_IAADDR = 1, 2, 3, 5
OPT_PREFERENCE, OPT_STATUS_CODE, OPT_RAPID_COMMIT = 7, 13, 14
OPT_DNS_SERVERS, OPT_DOMAIN_LIST = 23, 24
STATUS_SUCCESS, STATUS_NOT_ON_LINK = 0, 4
MAX_OPTIONS = 64  # more options than any real client sends: the rest is refused as malformed


@dataclass(frozen=True)
class Ip6Packet:
    src_mac: str
    dst_mac: str
    src: str
    dst: str
    proto: int
    hop_limit: int
    payload: bytes


def link_local(mac: str) -> str:
    """The modified EUI-64 link-local address of a MAC (RFC 4291 appendix A)."""
    m = bytearray(mac_bytes(mac))
    m[0] ^= 0x02
    return str(ipaddress.IPv6Address(b"\xfe\x80" + b"\0" * 6 + bytes(m[:3]) + b"\xff\xfe" + bytes(m[3:])))


def multicast_mac(addr: str) -> str:
    return mac_str(b"\x33\x33" + ipaddress.IPv6Address(addr).packed[12:])


def solicited_node(addr: str) -> str:
    return str(ipaddress.IPv6Address(b"\xff\x02" + b"\0" * 9 + b"\x01\xff" + ipaddress.IPv6Address(addr).packed[13:]))



def _l4_checksum(src: bytes, dst: bytes, proto: int, segment: bytes) -> int:
    return checksum(src + dst + struct.pack("!IxxxB", len(segment), proto) + segment)


def build(src_mac: str, dst_mac: str, src: str, dst: str, proto: int, payload: bytes, hop_limit: int = 255) -> bytes:
    """An Ethernet frame carrying ``payload`` (an ICMPv6 message or a UDP segment, checksum field zero): the
    checksum is filled in here."""
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    offset = 2 if proto == PROTO_ICMPV6 else 6
    csum = _l4_checksum(s, d, proto, payload)
    if proto == PROTO_UDP and csum == 0:
        csum = 0xFFFF
    payload = payload[:offset] + struct.pack("!H", csum) + payload[offset + 2:]
    ip = IP6_HEADER.pack(0x60000000, len(payload), proto, hop_limit, s, d)
    return ETH_HEADER.pack(mac_bytes(dst_mac), mac_bytes(src_mac), ETH_P_IPV6) + ip + payload


def parse(data: bytes) -> Ip6Packet | None:
    """The IPv6 packet in an Ethernet frame (no extension headers); ``None`` for other traffic."""
    if len(data) < ETH_HEADER.size + IP6_HEADER.size:
        return None
    dst_mac, src_mac, ethertype = ETH_HEADER.unpack_from(data)
    if ethertype != ETH_P_IPV6:
        return None
    vtf, plen, nh, hlim, src, dst = IP6_HEADER.unpack_from(data, ETH_HEADER.size)
    body = data[ETH_HEADER.size + IP6_HEADER.size:]
    if vtf >> 28 != 6 or plen > len(body):
        raise ValueError("bad IPv6 header")
    payload = bytes(body[:plen])
    if nh not in (PROTO_UDP, PROTO_ICMPV6):
        return None
    if _l4_checksum(src, dst, nh, payload) != 0:
        raise ValueError("bad checksum")
    return Ip6Packet(src_mac=mac_str(src_mac), dst_mac=mac_str(dst_mac), src=str(ipaddress.IPv6Address(src)),
                     dst=str(ipaddress.IPv6Address(dst)), proto=nh, hop_limit=hlim, payload=payload)


def udp(src_port: int, dst_port: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", src_port, dst_port, 8 + len(data), 0) + data


def parse_udp(payload: bytes) -> tuple[int, int, bytes]:
    if len(payload) < 8:
        raise ValueError("truncated UDP header")
    sport, dport, ulen, _ = struct.unpack_from("!HHHH", payload)
    if ulen < 8 or ulen > len(payload):
        raise ValueError("bad UDP length")
    return sport, dport, payload[8:ulen]


# -- neighbour discovery -----------------------------------------------------------------------------------
def _nd_option(kind: int, body: bytes) -> bytes:
    total = 2 + len(body)
    pad = (-total) % 8
    return struct.pack("!BB", kind, (total + pad) // 8) + body + b"\0" * pad


def router_advert(router_lifetime: int, managed: bool, src_mac: str, mtu: int,
                  prefixes: list[tuple[ipaddress.IPv6Network, int]],
                  routes: list[tuple[ipaddress.IPv6Network, int]]) -> bytes:
    """An RA: M and O flags when ``managed``; each prefix on-link (L) but never for SLAAC (A clear, the pod
    address is a fixed one given by DHCPv6); ``routes`` as Route Information options (RFC 4191)."""
    flags = 0xC0 if managed else 0
    msg = struct.pack("!BBHBBHII", RA, 0, 0, 64, flags, router_lifetime, 0, 0)
    msg += _nd_option(1, mac_bytes(src_mac))
    if mtu:
        msg += _nd_option(5, struct.pack("!HI", 0, mtu))
    for net, lifetime in prefixes:
        msg += _nd_option(3, struct.pack("!BBIII", net.prefixlen, 0x80, lifetime, lifetime, 0)
                          + net.network_address.packed)
    for net, lifetime in routes:
        msg += _nd_option(24, struct.pack("!BBI", net.prefixlen, 0, lifetime) + net.network_address.packed)
    return msg


def neighbor_solicit(target: str, src_mac: str) -> bytes:
    return (struct.pack("!BBHI", NS, 0, 0, 0) + ipaddress.IPv6Address(target).packed
            + _nd_option(1, mac_bytes(src_mac)))


def neighbor_advert(target: str, target_mac: str, solicited: bool) -> bytes:
    flags = 0x80000000 | (0x40000000 if solicited else 0) | 0x20000000  # Router, Solicited, Override
    return (struct.pack("!BBHI", NA, 0, 0, flags) + ipaddress.IPv6Address(target).packed
            + _nd_option(2, mac_bytes(target_mac)))


def nd_target(msg: bytes) -> str:
    """The target address of an NS or NA."""
    if len(msg) < 24:
        raise ValueError("truncated neighbour discovery message")
    return str(ipaddress.IPv6Address(msg[8:24]))


# -- DHCPv6 ------------------------------------------------------------------------------------------------
@dataclass
class Dhcp6Message:
    msg_type: int
    xid: bytes
    options: list[tuple[int, bytes]] = field(default_factory=list)

    def get(self, code: int) -> bytes | None:
        return next((v for c, v in self.options if c == code), None)

    def all(self, code: int) -> list[bytes]:
        return [v for c, v in self.options if c == code]

    def encode(self) -> bytes:
        return bytes([self.msg_type]) + self.xid + encode_options(self.options)

    @classmethod
    def decode(cls, data: bytes) -> Dhcp6Message:
        if len(data) < 4:
            raise ValueError("truncated DHCPv6 message")
        return cls(msg_type=data[0], xid=bytes(data[1:4]), options=decode_options(data[4:]))


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    return b"".join(struct.pack("!HH", c, len(v)) + v for c, v in options)


def decode_options(data: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        if pos + 4 > len(data) or len(out) >= MAX_OPTIONS:
            raise ValueError("malformed DHCPv6 options")
        code, length = struct.unpack_from("!HH", data, pos)
        if pos + 4 + length > len(data):
            raise ValueError(f"DHCPv6 option {code} overruns the message")
        out.append((code, bytes(data[pos + 4:pos + 4 + length])))
        pos += 4 + length
    return out


def ia_na(iaid: bytes, t1: int, t2: int, addresses: list[str], lifetime: int) -> bytes:
    sub = [(OPT_IAADDR, ipaddress.IPv6Address(a).packed + struct.pack("!II", lifetime, lifetime))
           for a in addresses]
    return iaid + struct.pack("!II", t1, t2) + encode_options(sub)


def ia_addresses(value: bytes) -> tuple[bytes, list[str]]:
    """The IAID and the addresses a client's IA_NA asks about."""
    if len(value) < 12:
        raise ValueError("truncated IA_NA")
    addrs = [str(ipaddress.IPv6Address(v[:16])) for c, v in decode_options(value[12:])
             if c == OPT_IAADDR and len(v) >= 24]
    return value[:4], addrs


def status(code: int, text: str) -> bytes:
    return struct.pack("!H", code) + text.encode()


def domain_list(names: list[str]) -> bytes:
    """Uncompressed DNS wire names (RFC 8415 10); labels over 63 bytes are dropped with their name."""
    out = b""
    for name in names:
        labels = [p.encode() for p in name.strip(".").split(".") if p]
        if labels and all(len(lab) <= 63 for lab in labels):
            out += b"".join(bytes([len(lab)]) + lab for lab in labels) + b"\0"
    return out
