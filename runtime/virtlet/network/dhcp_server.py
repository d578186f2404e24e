"""The per-pod DHCP server: hands the VM exactly the address the CNI plugin gave the pod.

One process per pod runs inside the pod's network namespace (``python -m virtlet.network.dhcp_server --netns
NAME --config FILE``), in its own session so it keeps serving renewals while virtletd restarts.  It reads and
writes raw Ethernet frames on the VM's tap (the namespace has no address of its own to answer from), answers
only the MACs listed in its config, and never probes or allocates: the lease for each MAC is fixed.  IPv6
(router advertisements, DHCPv6) is served by ``ipv6_ra`` from the same socket.

Server identifier: the NIC's gateway (else the first host address of its subnet).  A client renewing by
unicast sends to that address through the tap, where this server sees and answers it.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtlet.network import dhcp_packet as dp
from virtlet.network import udp_frame
from virtlet.network.ipv6_ra import V6Server

log = logging.getLogger("virtlet.dhcp")

BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
PACKET_OUTGOING = 4
DEFAULT_LEASE = 86400


@dataclass
class NicLease:
    """The fixed lease of one VM NIC."""

    mac: str
    tap: str
    ip: str
    prefix: int
    gateway: str = ""
    routes: list[tuple[str, str]] = field(default_factory=list)  # (dst CIDR, router or "")
    mtu: int = 0
    server_mac: str = "02:00:00:00:00:01"
    # IPv6 (served by ``ipv6_ra``): the pod's v6 CIDRs, the gateway, v6 routes, the veth towards the gateway
    ipv6: list[str] = field(default_factory=list)
    ipv6_gateway: str = ""
    ipv6_routes: list[tuple[str, str]] = field(default_factory=list)
    uplink: str = ""

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"{self.ip}/{self.prefix}", strict=False)

    @property
    def server_id(self) -> str:
        if self.gateway:
            return self.gateway
        for host in self.network.hosts():
            if str(host) != self.ip:
                return str(host)
        return self.ip


@dataclass
class DhcpConfig:
    nics: list[NicLease]
    dns_servers: list[str] = field(default_factory=list)
    dns_searches: list[str] = field(default_factory=list)
    hostname: str = ""
    lease_time: int = DEFAULT_LEASE
    dns6_servers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"nics": [{**n.__dict__, "routes": [list(r) for r in n.routes],
                          "ipv6_routes": [list(r) for r in n.ipv6_routes]} for n in self.nics],
                "dns_servers": self.dns_servers, "dns_searches": self.dns_searches, "hostname": self.hostname,
                "lease_time": self.lease_time, "dns6_servers": self.dns6_servers}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DhcpConfig:
        nics = []
        for n in d["nics"]:
            n = dict(n)
            n["mac"] = n["mac"].lower()
            n["routes"] = [(r[0], r[1]) for r in n.get("routes", [])]
            n["ipv6_routes"] = [(r[0], r[1]) for r in n.get("ipv6_routes", [])]
            nics.append(NicLease(**n))
        return cls(nics=nics, dns_servers=list(d.get("dns_servers", [])),
                   dns_searches=list(d.get("dns_searches", [])), hostname=d.get("hostname", ""),
                   lease_time=int(d.get("lease_time", DEFAULT_LEASE)),
                   dns6_servers=list(d.get("dns6_servers", [])))

    def nic_for(self, mac: str) -> NicLease | None:
        mac = mac.lower()
        return next((n for n in self.nics if n.mac == mac), None)


class Responder:
    """Protocol logic without sockets: a request packet in, the reply packet (or nothing) out."""

    def __init__(self, config: DhcpConfig) -> None:
        self.config = config

    def handle(self, req: dp.DhcpPacket) -> tuple[dp.DhcpPacket, NicLease] | None:
        if req.op != dp.BOOTREQUEST:
            return None
        nic = self.config.nic_for(req.chaddr)
        if nic is None or not nic.ip:  # an IPv6-only NIC gets no DHCPv4 answer
            log.debug("ignoring %s from unknown MAC %s", dp.MESSAGE_NAMES.get(req.message_type or 0),
                      req.chaddr)
            return None
        mtype = req.message_type
        if mtype == dp.DISCOVER:
            return self._reply(req, nic, dp.OFFER), nic
        if mtype == dp.REQUEST:
            server_id = req.ip_option(dp.OPT_SERVER_ID)
            if server_id is not None and server_id != nic.server_id:
                return None  # the client chose another server's offer
            wanted = req.ip_option(dp.OPT_REQUESTED_IP) or (req.ciaddr if req.ciaddr != "0.0.0.0" else None)
            if wanted != nic.ip:
                log.info("NAK to %s: asked for %s, its address is %s", nic.mac, wanted, nic.ip)
                return self._nak(req, nic), nic
            log.info("ACK %s to %s", nic.ip, nic.mac)
            return self._reply(req, nic, dp.ACK), nic
        if mtype == dp.INFORM:
            return self._reply(req, nic, dp.ACK, inform=True), nic
        if mtype == dp.RELEASE:
            log.info("%s released %s (its address stays reserved for it)", nic.mac, req.ciaddr)
        elif mtype == dp.DECLINE:
            log.warning("%s declined %s: is something else using the pod IP?", nic.mac, nic.ip)
        return None

    def _base(self, req: dp.DhcpPacket, nic: NicLease, mtype: int) -> dp.DhcpPacket:
        return dp.DhcpPacket(op=dp.BOOTREPLY, xid=req.xid, flags=req.flags, giaddr=req.giaddr,
                             chaddr=req.chaddr,
                             options={dp.OPT_MESSAGE_TYPE: bytes([mtype]),
                                      dp.OPT_SERVER_ID: dp.encode_ips([nic.server_id])})

    def _nak(self, req: dp.DhcpPacket, nic: NicLease) -> dp.DhcpPacket:
        reply = self._base(req, nic, dp.NAK)
        reply.options[dp.OPT_MESSAGE] = b"requested address is not this client's pod IP"
        return reply

    def _reply(self, req: dp.DhcpPacket, nic: NicLease, mtype: int, inform: bool = False) -> dp.DhcpPacket:
        cfg = self.config
        reply = self._base(req, nic, mtype)
        reply.ciaddr = req.ciaddr
        o = reply.options
        if not inform:
            reply.yiaddr = nic.ip
            o[dp.OPT_LEASE_TIME] = dp.encode_u32(cfg.lease_time)
            o[dp.OPT_RENEWAL_TIME] = dp.encode_u32(cfg.lease_time // 2)
            o[dp.OPT_REBINDING_TIME] = dp.encode_u32(cfg.lease_time * 7 // 8)
        net = nic.network
        o[dp.OPT_SUBNET_MASK] = net.netmask.packed
        o[dp.OPT_BROADCAST] = net.broadcast_address.packed
        if nic.gateway:
            o[dp.OPT_ROUTER] = dp.encode_ips([nic.gateway])
        classless = self._classless_routes(nic)
        if classless:
            o[dp.OPT_CLASSLESS_ROUTES] = dp.encode_classless_routes(classless)
        if cfg.dns_servers:
            o[dp.OPT_DNS] = dp.encode_ips(cfg.dns_servers)
        if cfg.dns_searches:
            o[dp.OPT_DOMAIN_NAME] = cfg.dns_searches[0].encode()
            o[dp.OPT_DOMAIN_SEARCH] = dp.encode_domain_search(cfg.dns_searches)
        if cfg.hostname:
            o[dp.OPT_HOSTNAME] = cfg.hostname.encode()
        if nic.mtu:
            o[dp.OPT_MTU] = dp.encode_u16(nic.mtu)
        return reply

    @staticmethod
    def _classless_routes(nic: NicLease) -> list[tuple[str, str]]:
        """Option 121 when the NIC has routes beyond the default one; the default route is then included,
        because a client that accepts option 121 ignores option 3 (RFC 3442)."""
        extra = [(dst, gw or nic.gateway or "0.0.0.0") for dst, gw in nic.routes
                 if ipaddress.IPv4Network(dst, strict=False).prefixlen != 0]
        if not extra:
            return []
        default = [(dst, gw or nic.gateway) for dst, gw in nic.routes
                   if ipaddress.IPv4Network(dst, strict=False).prefixlen == 0 and (gw or nic.gateway)]
        if not default and nic.gateway:
            default = [("0.0.0.0/0", nic.gateway)]
        return extra + default[:1]


def reply_frame(req: dp.DhcpPacket, reply: dp.DhcpPacket, nic: NicLease) -> bytes:
    """Address the reply as RFC 2131 4.1 says: broadcast when asked (or NAK), else unicast to the client."""
    if reply.message_type == dp.NAK or req.flags & dp.BROADCAST_FLAG:
        dst_mac, dst_ip = BROADCAST_MAC, "255.255.255.255"
    elif req.ciaddr != "0.0.0.0":
        dst_mac, dst_ip = req.chaddr, req.ciaddr
    else:
        dst_mac, dst_ip = req.chaddr, reply.yiaddr
    return udp_frame.build(udp_frame.UdpFrame(src_mac=nic.server_mac, dst_mac=dst_mac, src_ip=nic.server_id,
                                              dst_ip=dst_ip, src_port=67, dst_port=68,
                                              payload=reply.encode()))


def handle_frame(responder: Responder, data: bytes, ifname: str) -> tuple[bytes, str] | None:
    """A received frame in, (reply frame, interface to send it on) out; anything odd yields ``None``."""
    try:
        frame = udp_frame.parse(data)
        if frame is None or frame.dst_port != 67:
            return None
        req = dp.DhcpPacket.decode(frame.payload)
    except ValueError as exc:
        log.info("dropping malformed packet on %s: %s", ifname, exc)
        return None
    nic = responder.config.nic_for(req.chaddr)
    if nic is None or nic.tap != ifname or frame.src_mac != nic.mac:
        return None
    try:
        result = responder.handle(req)
    except ValueError as exc:
        log.info("dropping packet from %s: %s", req.chaddr, exc)
        return None
    if result is None:
        return None
    reply, nic = result
    return reply_frame(req, reply, nic), nic.tap


# -- process ------------------------------------------------------------------------------------------
def enter_netns(netns: str) -> None:
    """Join a named (``/var/run/netns/NAME``) or path-given network namespace (Python 3.11 lacks os.setns)."""
    path = netns if "/" in netns else f"/var/run/netns/{netns}"
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


ETH_P_ALL = 0x0003
SO_ATTACH_FILTER = 26
# classic BPF: accept unfragmented IPv4/UDP to port 67, IPv6/UDP to port 547 and the ICMPv6 RS/NS/NA that
# ``ipv6_ra`` answers; drop everything else in the kernel, so the VM's normal traffic never wakes this process.
# (code, jt, jf, k) per instruction; jumps are relative to the next instruction.
_DHCP_FILTER = (
    (0x28, 0, 0, 12),        # 0  ldh [12]            ethertype
    (0x15, 0, 7, 0x0800),    # 1  jeq IPv4 ? next : 9
    (0x30, 0, 0, 23),        # 2  ldb [23]            IP protocol
    (0x15, 0, 16, 17),       # 3  jeq UDP ? next : drop
    (0x28, 0, 0, 20),        # 4  ldh [20]            flags + fragment offset
    (0x45, 14, 0, 0x1FFF),   # 5  jset fragment ? drop : next
    (0xB1, 0, 0, 14),        # 6  ldxb 4*([14]&0xf)   IP header length
    (0x48, 0, 0, 16),        # 7  ldh [x+16]          UDP destination port
    (0x15, 10, 11, 67),      # 8  jeq 67 ? accept : drop
    (0x15, 0, 10, 0x86DD),   # 9  jeq IPv6 ? next : drop
    (0x30, 0, 0, 20),        # 10 ldb [20]            next header
    (0x15, 0, 2, 17),        # 11 jeq UDP ? next : 14
    (0x28, 0, 0, 56),        # 12 ldh [56]            UDP destination port
    (0x15, 5, 6, 547),       # 13 jeq 547 ? accept : drop
    (0x15, 0, 5, 58),        # 14 jeq ICMPv6 ? next : drop
    (0x30, 0, 0, 54),        # 15 ldb [54]            ICMPv6 type
    (0x15, 2, 0, 133),       # 16 jeq RS ? accept : next
    (0x15, 1, 0, 135),       # 17 jeq NS ? accept : next
    (0x15, 0, 1, 136),       # 18 jeq NA ? accept : drop
    (0x06, 0, 0, 0x40000),   # 19 ret accept
    (0x06, 0, 0, 0),         # 20 ret drop
)


def open_socket() -> socket.socket:
    """A packet socket seeing DHCP requests on every interface of the current namespace.

    ETH_P_ALL is needed: a socket for ETH_P_IP only sees frames the bridge delivers to itself, not what
    arrives on a bridge port such as the VM's tap, and the server tells NICs apart by that port."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    program = b"".join(struct.pack("HBBI", *insn) for insn in _DHCP_FILTER)
    buf = ctypes.create_string_buffer(program)
    fprog = struct.pack("HL", len(_DHCP_FILTER), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    return sock


def serve(config: DhcpConfig, sock: socket.socket, stop_fd: int | None = None) -> None:
    """Answer DHCP until SIGTERM/SIGINT (or until ``stop_fd`` becomes readable); closes ``sock``."""
    responder = Responder(config)
    v6 = V6Server(config, time.monotonic())
    stopping = False

    def _stop(_sig: int, _frm: Any) -> None:
        nonlocal stopping
        stopping = True

    wake_r = wake_w = -1
    if stop_fd is None:
        # Python restarts a select() that a signal interrupted (PEP 475), so the handler alone would be seen only
        # when select's timeout runs out: StopPodSandbox waited up to 5 s on every pod.  The signal's wake-up fd
        # makes select return at once.
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        stop_fd = wake_r
    watch: list[socket.socket | int] = [sock, stop_fd]
    try:
        while not stopping:
            for frame, ifname in v6.tick(time.monotonic()) if v6.active else []:
                _send(sock, frame, ifname, logging.DEBUG)  # timed RAs reach a tap not attached yet: no news
            wait = min(5.0, max(0.0, v6.next_due() - time.monotonic()))
            try:
                ready, _, _ = select.select(watch, [], [], wait)
            except InterruptedError:
                continue
            if stop_fd in ready and wake_r < 0:
                return
            if stop_fd in ready:
                os.read(wake_r, 64)
                continue  # the loop condition sees ``stopping``
            if sock not in ready:
                continue
            data, addr = sock.recvfrom(65535)
            ifname, pkttype = addr[0], addr[2]
            if pkttype == PACKET_OUTGOING:
                continue
            if data[12:14] == b"\x86\xdd":
                for frame, out_if in v6.handle(data, ifname, time.monotonic()) if v6.active else []:
                    _send(sock, frame, out_if)
                continue
            out = handle_frame(responder, data, ifname)
            if out is not None:
                _send(sock, out[0], out[1])
    finally:
        sock.close()
        if wake_r >= 0:
            signal.set_wakeup_fd(-1)
            os.close(wake_r)
            os.close(wake_w)


def _send(sock: socket.socket, frame: bytes, ifname: str, level: int = logging.WARNING) -> None:
    try:
        sock.sendto(frame, (ifname, int.from_bytes(frame[12:14], "big")))
    except OSError as exc:
        log.log(level, "cannot send on %s: %s", ifname, exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="virtlet per-pod DHCP server")
    parser.add_argument("--netns", required=True, help="network namespace name or path to serve in")
    parser.add_argument("--config", required=True, type=Path, help="JSON config written by virtletd")
    parser.add_argument("--pid-file", type=Path,
                        help="written once the socket is open (default: next to config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s dhcp[%(process)d] %(levelname)s %(message)s")
    config = DhcpConfig.from_dict(json.loads(args.config.read_text()))
    enter_netns(args.netns)
    pid_file = args.pid_file or args.config.with_name("dhcp.pid")
    sock = open_socket()  # before announcing readiness through the pid file
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, pid_file)
    log.info("serving %s in %s", ", ".join(f"{n.mac}->{' '.join(filter(None, [n.ip, *n.ipv6]))}"
                                           for n in config.nics), args.netns)
    try:
        serve(config, sock)
    finally:
        try:
            if pid_file.read_text().strip() == str(os.getpid()):
                pid_file.unlink()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
