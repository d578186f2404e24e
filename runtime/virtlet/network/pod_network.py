"""Pod networking for one VM pod: CNI ADD/DEL, the bridge + tap per NIC, and the DHCP server.

How the VM gets onto the pod network (see docs/networking.md):
1. The CNI plugin sets up the pod netns as for any pod (a veth ``eth0`` with the pod IP).
2. Per sandbox interface of the CNI result: the VM NIC takes the veth's MAC and MTU, the veth loses its IPv4
   address and gets a random MAC, a bridge in the pod netns joins the veth (and later the tap).
3. The tap is created in the *host* namespace before the VM starts (libvirt ``<interface type='ethernet'>``
   with ``<target dev=TAP managed='no'/>`` opens it there), then moved into the pod netns and enslaved to the
   bridge once QEMU holds it open.  QEMU keeps the fd across the move, so libvirt, QEMU and their security
   labels stay untouched (no emulator wrapper).
4. A DHCP server inside the pod netns answers only the VM MACs with the pod IP, routes, DNS and hostname.

Files per sandbox live in ``run_dir/<sandbox_id>/``: the DHCP config/pid/log.  Teardown needs no record of what
set-up made (a SIGKILL during set-up stores none): the DHCP server is found by its pid file or command line, the
host's taps by their name prefix, the CNI results in the CNI caches, and the bridges go with the netns.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from virtlet import errors, failpoints
from virtlet.network import extra_networks, plumbing
from virtlet.network.cni import CniPluginError, CniResult, CniRunner
from virtlet.network.dhcp_process import DhcpProcess
from virtlet.network.dhcp_server import DEFAULT_LEASE, DhcpConfig, NicLease
from virtlet.network.model import NicInfo, PodNetworkInfo, Route, SandboxNetSpec

log = logging.getLogger(__name__)

MAX_NICS = 16


def tap_name(sandbox_id: str, index: int) -> str:
    """Host-unique tap name: ``vt`` + 11 chars of the sandbox id + NIC index in hex (14 chars)."""
    if not 0 <= index < MAX_NICS:
        raise errors.InvalidArgument(f"a VM pod can have at most {MAX_NICS} interfaces")
    return plumbing.check_name(f"vt{sandbox_id[:11]}{index:x}")


def tap_prefix(sandbox_id: str) -> str:
    return f"vt{sandbox_id[:11]}"


def bridge_name(index: int) -> str:
    """Bridges live inside the pod netns, so a fixed name per NIC index cannot clash with other pods."""
    return f"vmbr{index}"


class PodNetwork:
    def __init__(self, cni: CniRunner, run_dir: Path, lease_time: int = DEFAULT_LEASE,
                 extra: extra_networks.ExtraNetworks | None = None) -> None:
        self.cni = cni
        # without an extra conf dir no extra network resolves, but the teardown still DELs cached ones
        self.extra = extra or extra_networks.ExtraNetworks(None, cni.store.bin_dirs, cni.cache_dir / "extra")
        self.run_dir = Path(run_dir)
        self.lease_time = lease_time

    # -- public API -----------------------------------------------------------------------------------
    def setup(self, spec: SandboxNetSpec) -> PodNetworkInfo:
        """CNI ADD, bridge per interface, DHCP server started; everything is undone when a step fails."""
        if not Path(spec.netns_path).exists():
            raise errors.FailedPrecondition(f"network namespace {spec.netns_path} does not exist")
        extra_nets = self.extra.resolve(spec)  # an unknown extra network fails before anything is made
        self._dir(spec.sandbox_id).mkdir(parents=True, exist_ok=True)
        try:
            result = self.cni.add(spec)  # undoes itself on failure
        except CniPluginError as exc:
            fixed = {k: v for k, v in spec.annotation_caps.items() if k in ("ips", "mac")}
            if not fixed:
                raise
            # most likely the IPAM cannot give the asked-for address (in use, outside its range): the pod's
            # request, not a fault of the node
            raise errors.FailedPrecondition(
                f"{exc} (the pod asks for fixed addresses, annotations VirtletIPAddresses/VirtletMACAddress: "
                f"{fixed}; an address must be free and inside the network's range)") from exc
        try:
            added = self.extra.add(spec, extra_nets, [str(i.get("name", "")) for _, i in result.sandbox_interfaces()],
                                   MAX_NICS)
            failpoints.hit("sandbox.network.after_cni_add")
            info = self._plumb(spec, result)
            extra_networks.plumb(spec, info, added)
            _check_fixed_addresses(spec, info)
            # not waited for: StartContainer waits (attach_after_start); its start-up overlaps Create and QEMU's start
            info.dhcp_pid = self._dhcp(info, spec.hostname).start(wait=False)
            return info
        except BaseException:
            try:
                self.teardown(spec)
            except Exception:
                log.exception("undoing the network of sandbox %s failed", spec.sandbox_id)
            raise

    def host_taps_for_start(self, info: PodNetworkInfo) -> list[str]:
        """Create the VM's taps in the host namespace (libvirt opens them there); return their names in NIC
        order.  A tap left in the pod netns by a previous run of the VM is removed first."""
        taps = []
        for nic in info.nics:
            plumbing.delete_link(nic.tap, info.netns_path)
            plumbing.ensure_tap(nic.tap)
            plumbing.set_link(nic.tap, mtu=nic.mtu)
            taps.append(nic.tap)
        return taps

    def attach_after_start(self, info: PodNetworkInfo) -> None:
        """Once QEMU holds the taps open: move them into the pod netns and enslave them to the bridges.  First the
        DHCP server RunPodSandbox spawned without waiting is waited for (or started again when it died): here,
        not before QEMU's start, so its start-up overlaps QEMU's; the guest can send no request before its tap
        is on the bridge, and StartContainer does not reply before the server answers."""
        DhcpProcess(self._dir(info.sandbox_id), info.netns_path).start()
        for nic in info.nics:
            plumbing.move_to_netns(nic.tap, info.netns_path)
            plumbing.set_link(nic.tap, info.netns_path, mtu=nic.mtu, master=nic.bridge, up=True)

    def release_taps(self, info: PodNetworkInfo) -> None:
        """After the VM is gone: delete its taps wherever they are (idempotent)."""
        for nic in info.nics:
            plumbing.delete_link(nic.tap)
            plumbing.delete_link(nic.tap, info.netns_path)

    def teardown(self, spec: SandboxNetSpec) -> None:
        """Stop the DHCP server, delete the host's taps, CNI DEL, forget the sandbox (idempotent).

        Also after an interrupted set-up: what was made is found through the files in run_dir, the CNI caches
        and the tap name prefix.  The caller deletes the netns afterwards, and with it the pod's bridges and the
        taps inside it."""
        # the DHCP server gets SIGTERM now and is awaited last: its exit overlaps the work below
        with DhcpProcess(self._dir(spec.sandbox_id), spec.netns_path).stopping():
            for tap in plumbing.list_links(tap_prefix(spec.sandbox_id)):
                plumbing.delete_link(tap)
            # Only the host side is deleted here.  The taps and bridges inside the pod netns go with the
            # namespace, which both callers delete right after: the kernel then destroys them in the background,
            # where deleting each one here waited about 20 ms for the kernel's RCU grace period.
            self.extra.delete(spec)  # the extra networks were added last: deleted first, in reverse
            self.cni.delete(spec)
        shutil.rmtree(self._dir(spec.sandbox_id), ignore_errors=True)

    def reattach(self, info: PodNetworkInfo, hostname: str) -> None:
        """At virtletd start-up: the DHCP server of a ready sandbox runs again (started when it died), and
        taps already in the pod netns are on their bridge.  ``hostname`` is the pod's (the sandbox record's)."""
        self._dir(info.sandbox_id).mkdir(parents=True, exist_ok=True)
        for nic in info.nics:
            if plumbing.link_exists(nic.tap, info.netns_path):
                plumbing.set_link(nic.tap, info.netns_path, master=nic.bridge, up=True)
        info.dhcp_pid = self._dhcp(info, hostname).start()

    def dhcp_pid(self, sandbox_id: str, netns_path: str) -> int | None:
        """The running DHCP server's pid for a sandbox (``None`` when it is not running)."""
        return DhcpProcess(self._dir(sandbox_id), netns_path).pid()

    # -- internals ------------------------------------------------------------------------------------
    def _dir(self, sandbox_id: str) -> Path:
        return self.run_dir / sandbox_id

    def _dhcp(self, info: PodNetworkInfo, hostname: str) -> DhcpProcess:
        """The DHCP process handle with its config file (re)written from ``info`` and the pod's host name."""
        proc = DhcpProcess(self._dir(info.sandbox_id), info.netns_path)
        # the default route on the first NIC only, as in cloud-init's network-config: a guest taking the router
        # of whichever lease came first would otherwise pick its default route at random (v4 and v6 alike)
        leases = [NicLease(mac=n.mac, tap=n.tap, ip=n.ip, prefix=n.prefix, gateway=n.gateway if i == 0 else "",
                           routes=[(r.dst, r.gw) for r in n.routes
                                   if ":" not in r.dst and (i == 0 or not r.dst.endswith("/0"))], mtu=n.mtu,
                           server_mac=self._server_mac(info, n), ipv6=list(n.ipv6),
                           ipv6_gateway=n.ipv6_gateway if i == 0 else "",
                           ipv6_routes=[(r.dst, r.gw) for r in n.routes
                                        if ":" in r.dst and (i == 0 or not r.dst.endswith("/0"))], uplink=n.veth)
                  for i, n in enumerate(info.nics) if n.ip or n.ipv6]
        cfg = DhcpConfig(nics=leases, dns_servers=info.dns_servers, dns_searches=info.dns_searches,
                         hostname=hostname, lease_time=self.lease_time)
        proc.config.write_text(json.dumps(cfg.to_dict()))
        return proc

    @staticmethod
    def _server_mac(info: PodNetworkInfo, nic: NicInfo) -> str:
        try:
            mac: str = plumbing.link_info(nic.bridge, info.netns_path)["mac"]
            return mac
        except errors.VirtletError:
            return "02:00:00:00:00:01"

    def _plumb(self, spec: SandboxNetSpec, result: CniResult) -> PodNetworkInfo:
        ns = spec.netns_path
        sandbox_ifaces = result.sandbox_interfaces()
        if not sandbox_ifaces:
            raise errors.FailedPrecondition(
                "the CNI result has no interface inside the pod network namespace; a VM pod needs one "
                "(a loopback-only network gives the VM no network)")
        if len(sandbox_ifaces) > MAX_NICS:
            raise errors.InvalidArgument(f"a VM pod can have at most {MAX_NICS} interfaces")
        nics: list[NicInfo] = []
        for i, (k, itf) in enumerate(sandbox_ifaces):
            veth = plumbing.check_name(str(itf.get("name", "")))
            link = plumbing.link_info(veth, ns)
            ips = result.ips_of(k) or (result.ips if len(sandbox_ifaces) == 1 else [])
            v4 = [ip for ip in ips if ipaddress.ip_interface(ip["address"]).version == 4]
            v6_ips = [ip for ip in ips if ipaddress.ip_interface(ip["address"]).version == 6]
            v6 = [ip["address"] for ip in v6_ips]
            addr = ipaddress.IPv4Interface(v4[0]["address"]) if v4 else None
            nic = NicInfo(index=i, mac=str(itf.get("mac") or link["mac"]).lower(), mtu=int(link["mtu"]),
                          ip=str(addr.ip) if addr else "", prefix=addr.network.prefixlen if addr else 0,
                          gateway=str(v4[0].get("gateway", "")) if v4 else "", routes=[], veth=veth,
                          bridge=bridge_name(i), tap=tap_name(spec.sandbox_id, i), ipv6=v6,
                          ipv6_gateway=str(v6_ips[0].get("gateway", "") or "") if v6_ips else "")
            nics.append(nic)
            # the addresses are the VM's now: left on the veth they would answer the guest's ARP/DAD probes
            plumbing.flush_ipv4(veth, ns)
            plumbing.flush_ipv6_global(veth, ns)
            plumbing.ensure_bridge(nic.bridge, ns, mtu=nic.mtu)
            plumbing.set_link(veth, ns, mac=_new_mac(link["mac"], nic.mac), master=nic.bridge, up=True)
        _assign_routes(nics, result.routes)
        servers, searches, options = _dns(spec, result)
        return PodNetworkInfo(sandbox_id=spec.sandbox_id, netns_path=ns, nics=nics, dns_servers=servers,
                              dns_searches=searches, dns_options=options)


def _check_fixed_addresses(spec: SandboxNetSpec, info: PodNetworkInfo) -> None:
    """A pod that asked for a fixed MAC or fixed IPs (``VirtletMACAddress``/``VirtletIPAddresses``) gets them or
    does not start: a pet VM silently coming up on another address is worse than a clear error."""
    mac = str(spec.annotation_caps.get("mac", ""))
    if mac and info.nics[0].mac != mac:
        raise errors.FailedPrecondition(
            f"annotation VirtletMACAddress asks for MAC {mac}, but the CNI network gave the pod "
            f"{info.nics[0].mac}: a plugin of the network must declare \"capabilities\": {{\"mac\": true}} "
            f"(e.g. the tuning plugin)")
    got = set(info.pod_ips)
    for want in spec.annotation_caps.get("ips", []):
        addr = str(ipaddress.ip_interface(want).ip)
        if addr not in got:
            raise errors.FailedPrecondition(
                f"annotation VirtletIPAddresses asks for {addr}, but the CNI network gave the pod "
                f"{', '.join(sorted(got)) or 'no address'}: its IPAM must declare \"capabilities\": "
                f"{{\"ips\": true}} (host-local does) and the address must be free and in its range")


def _new_mac(current: str, vm_mac: str) -> str:
    """The veth keeps a MAC it already got from an earlier run; otherwise it gets a fresh random one."""
    return current if current.lower() != vm_mac.lower() else plumbing.random_mac()


def _assign_routes(nics: list[NicInfo], routes: list[dict[str, Any]]) -> None:
    """CNI results list routes globally: give each route to the NIC whose subnet (of the route's family) holds
    its gateway, routes without a gateway to the first NIC of that family that has one.  An IPv6 route always
    gets its gateway filled in (the owner's IPv6 gateway; without one the route is dropped): the guest learns
    IPv6 routes from cloud-init, which has no "the interface's gateway" to fall back on."""
    for r in routes:
        try:
            dst = ipaddress.ip_network(r["dst"], strict=False)
        except (KeyError, ValueError, TypeError):
            continue
        gw = str(r.get("gw", "") or "")
        try:
            if gw:
                ipaddress.ip_address(gw)
            (_assign_v4 if dst.version == 4 else _assign_v6)(nics, dst, gw)
        except ValueError:
            log.warning("ignoring CNI route %s with an unusable gateway %r", dst, gw)


def _assign_v4(nics: list[NicInfo], dst: ipaddress.IPv4Network | ipaddress.IPv6Network, gw: str) -> None:
    with_v4 = [n for n in nics if n.ip]
    if not with_v4:
        return
    owner = next((n for n in with_v4 if n.gateway), with_v4[0])
    if gw:
        owner = next((n for n in with_v4 if ipaddress.ip_address(gw) in
                      ipaddress.IPv4Network(f"{n.ip}/{n.prefix}", strict=False)), owner)
    owner.routes.append(Route(dst=str(dst), gw=gw))


def _assign_v6(nics: list[NicInfo], dst: ipaddress.IPv4Network | ipaddress.IPv6Network, gw: str) -> None:
    with_v6 = [n for n in nics if n.ipv6]
    if not with_v6:
        return
    owner = next((n for n in with_v6 if n.ipv6_gateway), with_v6[0])
    if gw:
        owner = next((n for n in with_v6 if any(ipaddress.ip_address(gw) in ipaddress.ip_interface(a).network
                                                for a in n.ipv6)), owner)
    gw = gw or owner.ipv6_gateway
    if gw:
        owner.routes.append(Route(dst=str(dst), gw=gw))


def _dns(spec: SandboxNetSpec, result: CniResult) -> tuple[list[str], list[str], list[str]]:
    """The sandbox's DNSConfig wins; else the CNI result's DNS; never a made-up resolver."""
    servers = list(spec.dns.get("servers", [])) or list(result.dns.get("nameservers", []) or [])
    searches = list(spec.dns.get("searches", [])) or list(result.dns.get("search", []) or [])
    options = list(spec.dns.get("options", [])) or list(result.dns.get("options", []) or [])
    servers = [s for s in servers if _is_ipv4(s)]  # DHCPv4 option 6 carries IPv4 only
    return servers, searches, options


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
        return True
    except ValueError:
        return False
