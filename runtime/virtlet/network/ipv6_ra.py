"""IPv6 for the VM from the per-pod server: router advertisements, DHCPv6 and a proxied router address.

The pod's IPv6 address from the CNI IPAM is a fixed one (host-local's ``::2``, not a SLAAC address), so:

* RAs carry the M and O flags (use DHCPv6), the pod subnet as an on-link prefix with the autonomous flag
  clear (no SLAAC address next to the pod one), the MTU, and a router lifetime when the NIC has an IPv6
  default route: the guest's default route then goes via the RA's source address.
* DHCPv6 (IA_NA) hands out exactly the pod's IPv6 address(es), with the DNS search list.
* The RA's source, the guest's next hop, is the *gateway's* link-local address: the network's v6 gateway itself
  when it is link-local (Calico style), else the EUI-64 link-local of the gateway's MAC.  The server learns that
  MAC by a neighbour solicitation for the gateway on the pod's uplink veth, and answers the guest's neighbour
  solicitations for the router address with it, so the guest's frames go straight to the real gateway even when
  the gateway's own link-local address is a different (stable-privacy) one.

Like the DHCPv4 part, it answers only frames arriving on a configured NIC's tap with that NIC's MAC as source,
drops anything malformed, and sends at most ``RATE`` replies per second per NIC (``BURST`` at once).
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from virtlet.network import ipv6_wire as w

if TYPE_CHECKING:
    from virtlet.network.dhcp_server import DhcpConfig, NicLease

log = logging.getLogger("virtlet.dhcp6")

ALL_NODES = "ff02::1"
RA_INTERVAL = 60.0  # unsolicited RAs (RFC 4861 allows 4-1800 s); the guest's RS is answered at once
ROUTER_LIFETIME = 1800
RESOLVE_RETRY = 2.0  # gateway MAC unknown: solicit again this often
RESOLVE_REFRESH = 600.0
RATE, BURST = 10.0, 20.0


@dataclass
class _NicState:
    nic: NicLease
    gw_mac: str = ""
    next_resolve: float = 0.0
    next_ra: float = 0.0
    tokens: float = BURST
    last: float = 0.0

    def allow(self, now: float) -> bool:
        self.tokens = min(BURST, self.tokens + (now - self.last) * RATE)
        self.last = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _gateway(nic: NicLease) -> str:
    return nic.ipv6_gateway if nic.ipv6_gateway and nic.ipv6 else ""


class V6Server:
    """Protocol logic over frames: ``handle`` a received frame, ``tick`` for the timed sends; both return
    ``(frame, interface)`` pairs to send."""

    def __init__(self, config: DhcpConfig, now: float) -> None:
        self.config = config
        self.nics = [_NicState(n, last=now) for n in config.nics if n.ipv6]

    @property
    def active(self) -> bool:
        return bool(self.nics)

    def next_due(self) -> float:
        due = [s.next_ra for s in self.nics]
        due += [s.next_resolve for s in self.nics if _gateway(s.nic)]
        return min(due, default=float("inf"))

    # -- timed --------------------------------------------------------------------------------------------
    def tick(self, now: float) -> list[tuple[bytes, str]]:
        out = []
        for s in self.nics:
            gw = _gateway(s.nic)
            if gw and s.nic.uplink and now >= s.next_resolve:
                target = w.solicited_node(gw)
                out.append((w.build(s.nic.server_mac, w.multicast_mac(target), self._server_ll(s), target,
                                    w.PROTO_ICMPV6, w.neighbor_solicit(gw, s.nic.server_mac)), s.nic.uplink))
                s.next_resolve = now + (RESOLVE_REFRESH if s.gw_mac else RESOLVE_RETRY)
            if now >= s.next_ra:
                out.append((self._ra(s), s.nic.tap))
                s.next_ra = now + RA_INTERVAL
        return out

    # -- received -----------------------------------------------------------------------------------------
    def handle(self, data: bytes, ifname: str, now: float) -> list[tuple[bytes, str]]:
        try:
            pkt = w.parse(data)
        except ValueError as exc:
            log.info("dropping malformed IPv6 frame on %s: %s", ifname, exc)
            return []
        if pkt is None:
            return []
        for s in self.nics:
            if ifname == s.nic.uplink and pkt.proto == w.PROTO_ICMPV6:
                self._maybe_gateway_na(s, pkt, now)
        s_from = next((s for s in self.nics if s.nic.tap == ifname and s.nic.mac == pkt.src_mac), None)
        if s_from is None or not s_from.allow(now):
            return []
        try:
            reply = self._answer(s_from, pkt)
        except (ValueError, struct.error) as exc:
            log.info("dropping IPv6 packet from %s: %s", pkt.src_mac, exc)
            return []
        return [(reply, s_from.nic.tap)] if reply is not None else []

    def _answer(self, s: _NicState, pkt: w.Ip6Packet) -> bytes | None:
        if pkt.proto == w.PROTO_ICMPV6 and pkt.payload:
            kind = pkt.payload[0]
            if kind == w.RS and pkt.hop_limit == 255:
                return self._ra(s)
            if kind == w.NS and pkt.hop_limit == 255 and s.gw_mac:
                if w.nd_target(pkt.payload) != self._router_ll(s):
                    return None
                dst = pkt.src if pkt.src != "::" else ALL_NODES
                dst_mac = pkt.src_mac if pkt.src != "::" else w.multicast_mac(ALL_NODES)
                return w.build(s.nic.server_mac, dst_mac, self._router_ll(s), dst, w.PROTO_ICMPV6,
                               w.neighbor_advert(self._router_ll(s), s.gw_mac, pkt.src != "::"))
            return None
        if pkt.proto == w.PROTO_UDP:
            sport, dport, body = w.parse_udp(pkt.payload)
            if dport != 547:
                return None
            reply = self.dhcp6(s.nic, w.Dhcp6Message.decode(body))
            if reply is None:
                return None
            return w.build(s.nic.server_mac, pkt.src_mac, self._server_ll(s), pkt.src, w.PROTO_UDP,
                           w.udp(547, sport, reply.encode()), hop_limit=64)
        return None

    def _maybe_gateway_na(self, s: _NicState, pkt: w.Ip6Packet, now: float) -> None:
        msg = pkt.payload
        if not msg or msg[0] != w.NA or pkt.hop_limit != 255 or len(msg) < 24:
            return
        if w.nd_target(msg) != str(ipaddress.IPv6Address(_gateway(s.nic))):
            return
        pos = 24
        while pos + 8 <= len(msg) and msg[pos + 1]:
            if msg[pos] == 2:
                mac = w.mac_str(msg[pos + 2:pos + 8])
                if mac != s.gw_mac:
                    log.info("IPv6 gateway %s of %s is at %s", _gateway(s.nic), s.nic.mac, mac)
                    s.gw_mac = mac
                    s.next_ra = now  # a router lifetime can be announced now
                s.next_resolve = now + RESOLVE_REFRESH
                return
            pos += msg[pos + 1] * 8

    # -- messages -----------------------------------------------------------------------------------------
    @staticmethod
    def _server_ll(s: _NicState) -> str:
        return w.link_local(s.nic.server_mac)

    @staticmethod
    def _router_ll(s: _NicState) -> str:
        gw = ipaddress.IPv6Address(_gateway(s.nic))
        return str(gw) if gw.is_link_local else w.link_local(s.gw_mac)

    def _ra(self, s: _NicState) -> bytes:
        nic, lifetime = s.nic, self.config.lease_time
        router = bool(s.gw_mac)
        src = self._router_ll(s) if router else self._server_ll(s)
        default = any(ipaddress.IPv6Network(d).prefixlen == 0 for d, _ in nic.ipv6_routes)
        prefixes = list(dict.fromkeys(ipaddress.IPv6Interface(a).network for a in nic.ipv6))
        routes = [(ipaddress.IPv6Network(d), lifetime) for d, gw in nic.ipv6_routes
                  if router and ipaddress.IPv6Network(d).prefixlen and gw == nic.ipv6_gateway]
        msg = w.router_advert(ROUTER_LIFETIME if router and default else 0, True,
                              s.gw_mac or nic.server_mac, nic.mtu, [(p, lifetime) for p in prefixes], routes)
        return w.build(nic.server_mac, w.multicast_mac(ALL_NODES), src, ALL_NODES, w.PROTO_ICMPV6, msg)

    def dhcp6(self, nic: NicLease, req: w.Dhcp6Message) -> w.Dhcp6Message | None:
        """A DHCPv6 request in, the reply (or nothing) out."""
        server_id = struct.pack("!HH", 3, 1) + w.mac_bytes(nic.server_mac)  # DUID-LL
        client_id = req.get(w.OPT_CLIENTID)
        asked_server = req.get(w.OPT_SERVERID)
        mtype = req.msg_type
        if client_id is None and mtype != w.INFORMATION_REQUEST:
            return None
        if mtype in (w.REQUEST, w.RENEW, w.RELEASE, w.DECLINE) and asked_server != server_id:
            return None
        if mtype in (w.SOLICIT, w.REBIND, w.CONFIRM, w.INFORMATION_REQUEST) and asked_server is not None:
            return None  # RFC 8415 16: these never name a server
        ours = [str(ipaddress.IPv6Interface(a).ip) for a in nic.ipv6]
        opts: list[tuple[int, bytes]] = [(w.OPT_SERVERID, server_id)]
        if client_id is not None:
            opts.insert(0, (w.OPT_CLIENTID, client_id))
        rtype = w.REPLY
        if mtype == w.SOLICIT:
            if req.get(w.OPT_RAPID_COMMIT) is not None:
                opts.append((w.OPT_RAPID_COMMIT, b""))
            else:
                rtype = w.ADVERTISE
                opts.append((w.OPT_PREFERENCE, b"\xff"))
        if mtype in (w.SOLICIT, w.REQUEST, w.RENEW, w.REBIND):
            lease = self.config.lease_time
            for value in req.all(w.OPT_IA_NA)[:4]:
                iaid, _ = w.ia_addresses(value)
                opts.append((w.OPT_IA_NA, w.ia_na(iaid, lease // 2, lease * 4 // 5, ours, lease)))
            log.info("DHCPv6 %s: %s to %s", "ADVERTISE" if rtype == w.ADVERTISE else "REPLY", ours, nic.mac)
        elif mtype == w.CONFIRM:
            asked = [a for v in req.all(w.OPT_IA_NA)[:4] for a in w.ia_addresses(v)[1]]
            ok = all(a in ours for a in asked)
            opts.append((w.OPT_STATUS_CODE, w.status(w.STATUS_SUCCESS if ok else w.STATUS_NOT_ON_LINK,
                                                     "" if ok else "not this client's pod address")))
        elif mtype in (w.RELEASE, w.DECLINE):
            log.log(logging.WARNING if mtype == w.DECLINE else logging.INFO, "%s %s %s", nic.mac,
                    "declined (is something else using it?)" if mtype == w.DECLINE else "released", ours)
            opts.append((w.OPT_STATUS_CODE, w.status(w.STATUS_SUCCESS, "")))
        elif mtype != w.INFORMATION_REQUEST:
            return None
        if self.config.dns6_servers:
            opts.append((w.OPT_DNS_SERVERS, b"".join(ipaddress.IPv6Address(a).packed
                                                     for a in self.config.dns6_servers)))
        if self.config.dns_searches:
            opts.append((w.OPT_DOMAIN_LIST, w.domain_list(self.config.dns_searches)))
        return w.Dhcp6Message(msg_type=rtype, xid=req.xid, options=opts)
