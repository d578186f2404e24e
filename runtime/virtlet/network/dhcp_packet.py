"""DHCPv4 message codec (RFC 2131 / 2132): BOOTP header plus options, and the option encoders we serve.

Parsing is strict about lengths, so a malformed packet raises ``MalformedPacket`` (a ``ValueError``) and never
anything else; the server drops such packets.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

MAGIC_COOKIE = b"\x63\x82\x53\x63"
BOOTREQUEST, BOOTREPLY = 1, 2
HEADER = struct.Struct("!BBBBIHHIIII16s64s128s")  # 236 bytes
BROADCAST_FLAG = 0x8000

# message types (option 53)
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {DISCOVER: "DISCOVER", OFFER: "OFFER", REQUEST: "REQUEST", DECLINE: "DECLINE", ACK: "ACK",
                 NAK: "NAK", RELEASE: "RELEASE", INFORM: "INFORM"}

# option codes
OPT_PAD, OPT_END = 0, 255
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN_NAME = 15
OPT_MTU = 26
OPT_BROADCAST = 28
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST = 55
OPT_MESSAGE = 56
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_CLIENT_ID = 61
OPT_DOMAIN_SEARCH = 119
OPT_CLASSLESS_ROUTES = 121


class MalformedPacket(ValueError):
    pass


@dataclass
class DhcpPacket:
    op: int = BOOTREQUEST
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: str = "0.0.0.0"
    yiaddr: str = "0.0.0.0"
    siaddr: str = "0.0.0.0"
    giaddr: str = "0.0.0.0"
    chaddr: str = "00:00:00:00:00:00"  # Ethernet MAC (htype 1, hlen 6)
    hops: int = 0
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    @property
    def message_type(self) -> int | None:
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value and len(value) == 1 else None

    def ip_option(self, code: int) -> str | None:
        value = self.options.get(code)
        return str(ipaddress.IPv4Address(value)) if value and len(value) == 4 else None

    # -- wire format -------------------------------------------------------------------------------
    def encode(self) -> bytes:
        mac = bytes.fromhex(self.chaddr.replace(":", ""))
        head = HEADER.pack(self.op, 1, 6, self.hops, self.xid, self.secs, self.flags,
                           _ip(self.ciaddr), _ip(self.yiaddr), _ip(self.siaddr), _ip(self.giaddr),
                           mac.ljust(16, b"\0"), self.sname.ljust(64, b"\0"), self.file.ljust(128, b"\0"))
        opts = bytearray(MAGIC_COOKIE)
        for code, value in self.options.items():
            # long values are split over several instances of the option (RFC 3396)
            chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [b""]
            for chunk in chunks:
                opts += bytes((code, len(chunk))) + chunk
        opts.append(OPT_END)
        data = head + bytes(opts)
        return data.ljust(300, b"\0")  # BOOTP minimum size; some clients insist

    @classmethod
    def decode(cls, data: bytes) -> DhcpPacket:
        if len(data) < HEADER.size + len(MAGIC_COOKIE):
            raise MalformedPacket(f"too short ({len(data)} bytes)")
        (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
         bootfile) = HEADER.unpack_from(data)
        if op not in (BOOTREQUEST, BOOTREPLY):
            raise MalformedPacket(f"bad op {op}")
        if htype != 1 or hlen != 6:
            raise MalformedPacket(f"not Ethernet (htype {htype}, hlen {hlen})")
        if data[HEADER.size:HEADER.size + 4] != MAGIC_COOKIE:
            raise MalformedPacket("no DHCP magic cookie")
        options = _decode_options(data[HEADER.size + 4:])
        return cls(op=op, xid=xid, secs=secs, flags=flags, ciaddr=_str_ip(ciaddr), yiaddr=_str_ip(yiaddr),
                   siaddr=_str_ip(siaddr), giaddr=_str_ip(giaddr),
                   chaddr=":".join(f"{b:02x}" for b in chaddr[:6]),
                   hops=hops, sname=sname.rstrip(b"\0"), file=bootfile.rstrip(b"\0"), options=options)


def _ip(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def _str_ip(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def _decode_options(data: bytes) -> dict[int, bytes]:
    options: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return options
        if i + 1 >= len(data):
            raise MalformedPacket(f"option {code} has no length")
        length = data[i + 1]
        value = data[i + 2:i + 2 + length]
        if len(value) != length:
            raise MalformedPacket(f"option {code} runs past the end of the packet")
        options[code] = options.get(code, b"") + value  # repeated options concatenate (RFC 3396)
        i += 2 + length
    raise MalformedPacket("options are not terminated by END")


# -- option value encoders ---------------------------------------------------------------------------
def encode_ips(addresses: list[str]) -> bytes:
    return b"".join(ipaddress.IPv4Address(a).packed for a in addresses)


def encode_u32(value: int) -> bytes:
    return struct.pack("!I", value)


def encode_u16(value: int) -> bytes:
    return struct.pack("!H", value)


def encode_classless_routes(routes: list[tuple[str, str]]) -> bytes:
    """Option 121 (RFC 3442): (destination CIDR, router) pairs; router 0.0.0.0 means on-link."""
    out = bytearray()
    for dst, router in routes:
        net = ipaddress.IPv4Network(dst, strict=False)
        width = net.prefixlen
        out.append(width)
        out += net.network_address.packed[:(width + 7) // 8]
        out += ipaddress.IPv4Address(router).packed
    return bytes(out)


def decode_classless_routes(data: bytes) -> list[tuple[str, str]]:
    routes, i = [], 0
    while i < len(data):
        width = data[i]
        if width > 32:
            raise MalformedPacket(f"classless route width {width}")
        n = (width + 7) // 8
        if i + 1 + n + 4 > len(data):
            raise MalformedPacket("classless route truncated")
        dst = data[i + 1:i + 1 + n].ljust(4, b"\0")
        router = data[i + 1 + n:i + 5 + n]
        routes.append((f"{ipaddress.IPv4Address(dst)}/{width}", str(ipaddress.IPv4Address(router))))
        i += 5 + n
    return routes


def encode_domain_search(domains: list[str]) -> bytes:
    """Option 119 (RFC 3397): DNS wire-format names, without compression (allowed by the RFC)."""
    out = bytearray()
    for domain in domains:
        for label in domain.strip(".").split("."):
            raw = label.encode("idna") if label else b""
            if not raw or len(raw) > 63:
                raise ValueError(f"search domain {domain!r} has an invalid label")
            out.append(len(raw))
            out += raw
        out.append(0)
    return bytes(out)
