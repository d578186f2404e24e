"""Ethernet + IPv4 + UDP framing for the DHCP server's packet socket.

The DHCP server has no IP address in the pod namespace (the address belongs to the VM), so it cannot use a
normal UDP socket to answer a client that has no address yet; it reads and writes whole Ethernet frames.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
ETH_HEADER = struct.Struct("!6s6sH")
IP_HEADER = struct.Struct("!BBHHHBBH4s4s")
UDP_HEADER = struct.Struct("!HHHH")


class BadFrame(ValueError):
    pass


@dataclass(frozen=True)
class UdpFrame:
    src_mac: str
    dst_mac: str
    src_ip: str
    dst_ip: str
    src_port: int
    dst_port: int
    payload: bytes


def mac_bytes(mac: str) -> bytes:
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC {mac!r}")
    return raw


def mac_str(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    words: tuple[int, ...] = struct.unpack(f"!{len(data) // 2}H", data)
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build(frame: UdpFrame) -> bytes:
    src = ipaddress.IPv4Address(frame.src_ip).packed
    dst = ipaddress.IPv4Address(frame.dst_ip).packed
    udp_len = UDP_HEADER.size + len(frame.payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp_wo_sum = UDP_HEADER.pack(frame.src_port, frame.dst_port, udp_len, 0) + frame.payload
    udp_sum = checksum(pseudo + udp_wo_sum) or 0xFFFF
    udp = UDP_HEADER.pack(frame.src_port, frame.dst_port, udp_len, udp_sum) + frame.payload
    ip_wo_sum = IP_HEADER.pack(0x45, 0x10, 20 + udp_len, 0, 0, 64, 17, 0, src, dst)
    ip = IP_HEADER.pack(0x45, 0x10, 20 + udp_len, 0, 0, 64, 17, checksum(ip_wo_sum), src, dst)
    eth = ETH_HEADER.pack(mac_bytes(frame.dst_mac), mac_bytes(frame.src_mac), ETH_P_IP)
    return eth + ip + udp


def parse(data: bytes) -> UdpFrame | None:
    """The UDP datagram in an Ethernet frame; ``None`` for other traffic, ``BadFrame`` for broken headers."""
    if len(data) < ETH_HEADER.size + IP_HEADER.size:
        return None
    dst_mac, src_mac, ethertype = ETH_HEADER.unpack_from(data)
    if ethertype != ETH_P_IP:
        return None
    ip = data[ETH_HEADER.size:]
    ver_ihl, _tos, total, _ident, frag, _ttl, proto, _sum, src, dst = IP_HEADER.unpack_from(ip)
    if ver_ihl >> 4 != 4:
        return None
    ihl = (ver_ihl & 0x0F) * 4
    if ihl < 20 or total < ihl or total > len(ip):
        raise BadFrame("bad IPv4 header lengths")
    if proto != 17:
        return None
    if frag & 0x3FFF:
        return None  # fragments: DHCP messages are never fragmented in practice
    udp = ip[ihl:total]
    if len(udp) < UDP_HEADER.size:
        raise BadFrame("truncated UDP header")
    sport, dport, ulen, _usum = UDP_HEADER.unpack_from(udp)
    if ulen < UDP_HEADER.size or ulen > len(udp):
        raise BadFrame("bad UDP length")
    return UdpFrame(src_mac=mac_str(src_mac), dst_mac=mac_str(dst_mac),
                    src_ip=str(ipaddress.IPv4Address(src)), dst_ip=str(ipaddress.IPv4Address(dst)),
                    src_port=sport, dst_port=dport,
                    payload=bytes(udp[UDP_HEADER.size:ulen]))
