"""Extra networks of a VM pod (the ``k8s.v1.cni.cncf.io/networks`` annotation): resolve, CNI ADD/DEL, one VM NIC each.

Multus resolves a name to a NetworkAttachmentDefinition on the API server; virtletd has no API server access, so
a name resolves to a CNI network config in the node's **extra conf dir** (``cni_extra_conf_dir``, default
``/etc/cni/multus/net.d``): the config whose ``name`` field is the requested name, looked up first in
``<dir>/<pod namespace>/`` (networks for one namespace's pods only) and then in ``<dir>/`` (node-wide networks),
the first valid file by sorted name in each, as for the pod network.  The ``name`` field, not the file name,
because it is the name the CNI plugins use (host-local's ``/var/lib/cni/networks/<name>``, the CNI cache).

Each extra network gets its own CNI ADD into the pod netns with its own ``CNI_IFNAME`` (``net1``... unless the pod
names one), after the pod network's, and the ``mac``/``ips`` the pod asked for as capability args.  The config,
capability args, interface name and position are cached in ``<cni cache>/extra/<sandbox>.<NN>.<ifname>.json``
before the ADD, so the teardown (also after a crash, when nobody remembers the annotation) DELs every extra
network, in reverse order, with what it was added with.  A failed ADD DELs the ones already done.

The VM NIC of an extra network is plumbed like the pod network's (bridge ``vmbrN``, tap, the DHCP server answers
its MAC with its address) but never carries a default route: its IPv4 and IPv6 gateways are dropped (so DHCP sends
no router option for it) and only its non-default routes are kept, via its gateway.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from virtlet import errors
from virtlet.network import plumbing
from virtlet.network.attachments import ANNOTATION, Attachment, resolve_namespace
from virtlet.network.cni import CONF_EXTENSIONS, CniConfigStore, CniPluginError, CniResult, CniRunner, NetworkConfig
from virtlet.network.model import NicInfo, PodNetworkInfo, Route, SandboxNetSpec

log = logging.getLogger(__name__)

DEFAULT_CONF_DIR = Path("/etc/cni/multus/net.d")
_CACHE_NAME = re.compile(r"(?P<sid>[^.]+)\.(?P<idx>\d{2})\.(?P<ifname>[A-Za-z0-9_-]{1,15})\.json")


class _OneNetwork(CniConfigStore):
    """A config store that always answers with one network (the resolved extra network)."""

    def __init__(self, net: NetworkConfig | None, bin_dirs: Sequence[Path]) -> None:
        super().__init__(Path("/nonexistent"), bin_dirs)
        self.net = net

    def load(self) -> NetworkConfig:
        if self.net is None:
            raise errors.Internal("no extra network to add")
        return self.net


class _ExtraRunner(CniRunner):
    """The CNI runner of one extra network of one sandbox: its own ifname and cache file, no loopback."""

    def __init__(self, net: NetworkConfig | None, bin_dirs: Sequence[Path], cache_dir: Path, position: int,
                 ifname: str, timeout: float) -> None:
        super().__init__(_OneNetwork(net, bin_dirs), cache_dir, ifname=ifname, timeout=timeout, loopback=False)
        self.position = position

    def _cache_path(self, sandbox_id: str) -> Path:
        return self.cache_dir / f"{sandbox_id}.{self.position:02d}.{self.ifname}.json"


@dataclass
class Added:
    """One extra network after its ADD."""

    attachment: Attachment
    net: NetworkConfig
    result: CniResult


class ExtraNetworks:
    def __init__(self, conf_dir: Path | None, bin_dirs: Sequence[Path], cache_dir: Path,
                 timeout: float = 120.0) -> None:
        self.conf_dir = Path(conf_dir) if conf_dir is not None else None
        self.bin_dirs = tuple(Path(d) for d in bin_dirs)
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout

    # -- resolution ---------------------------------------------------------------------------------
    def resolve(self, spec: SandboxNetSpec) -> list[tuple[Attachment, NetworkConfig]]:
        """Each requested network's config; ``InvalidArgument`` naming the first one that is not there."""
        out = []
        for a in spec.extra_networks:
            namespace = resolve_namespace(a, spec.pod_namespace)
            net = self._find(a.name, namespace)
            if net is None:
                where = (f"{self.conf_dir / namespace} or {self.conf_dir}" if self.conf_dir is not None
                         else "nowhere (no extra network conf dir is configured)")
                raise errors.InvalidArgument(
                    f"annotation {ANNOTATION}: network {a.label!r} not found: no valid CNI network config named "
                    f"{a.name!r} in {where}")
            out.append((a, net))
        return out

    def _find(self, name: str, namespace: str) -> NetworkConfig | None:
        if self.conf_dir is None:
            return None
        for d in (self.conf_dir / namespace, self.conf_dir):
            if not d.is_dir():
                continue
            for path in sorted(p for p in d.iterdir() if p.suffix in CONF_EXTENSIONS and p.is_file()):
                try:
                    net = NetworkConfig.from_dict(json.loads(path.read_text()), str(path))
                except (OSError, ValueError) as exc:
                    log.warning("skipping extra CNI network config %s: %s", path, exc)
                    continue
                if net.name == name:
                    return net
        return None

    # -- ADD / DEL ----------------------------------------------------------------------------------
    def add(self, spec: SandboxNetSpec, nets: list[tuple[Attachment, NetworkConfig]],
            taken_ifnames: Sequence[str], max_nics: int) -> list[Added]:
        """CNI ADD of every extra network, in order; on any failure the ones done are DELed (in reverse)."""
        if not nets:
            return []
        if len(taken_ifnames) + len(nets) > max_nics:
            raise errors.InvalidArgument(
                f"annotation {ANNOTATION}: the pod network has {len(taken_ifnames)} interface(s) and the pod asks "
                f"for {len(nets)} extra network(s); a VM pod can have at most {max_nics} interfaces")
        for a, _ in nets:
            if a.ifname in taken_ifnames:
                raise errors.InvalidArgument(
                    f"annotation {ANNOTATION}: network {a.label!r}: interface {a.ifname!r} is the pod network's")
        done: list[Added] = []
        try:
            for position, (a, net) in enumerate(nets, start=1):
                runner = _ExtraRunner(net, self.bin_dirs, self.cache_dir, position, a.ifname, self.timeout)
                missing = runner.store.missing_plugins(net)
                if missing:
                    raise errors.FailedPrecondition(
                        f"extra network {a.label!r} ({net.source}) needs plugin(s) {', '.join(missing)}, not "
                        f"found in {', '.join(map(str, self.bin_dirs))}")
                caps: dict[str, Any] = {}
                if a.mac:
                    caps["mac"] = a.mac
                if a.ips:
                    caps["ips"] = list(a.ips)
                sub = replace(spec, port_mappings=[], dns={}, annotation_caps=caps, extra_networks=[])
                try:
                    result = runner.add(sub)  # DELs itself when it fails
                except CniPluginError as exc:
                    if caps:  # most likely the asked-for address or MAC: the pod's request, not the node's fault
                        raise errors.FailedPrecondition(f"extra network {a.label!r}: {exc} (asked for {caps})") \
                            from exc
                    raise
                done.append(Added(a, net, result))
        except BaseException:
            try:
                self.delete(spec)
            except Exception:
                log.exception("CNI DEL of the extra networks of sandbox %s failed", spec.sandbox_id)
            raise
        return done

    def delete(self, spec: SandboxNetSpec) -> None:
        """CNI DEL of every extra network the cache knows for the sandbox, the last added first (idempotent)."""
        if not self.cache_dir.is_dir():
            return
        entries = []
        for path in self.cache_dir.glob(f"{spec.sandbox_id}.*.json"):
            m = _CACHE_NAME.fullmatch(path.name)
            if m and m["sid"] == spec.sandbox_id:
                entries.append((int(m["idx"]), m["ifname"]))
        first: Exception | None = None
        for position, ifname in sorted(entries, reverse=True):
            sub = replace(spec, port_mappings=[], dns={}, annotation_caps={}, extra_networks=[])
            try:
                _ExtraRunner(None, self.bin_dirs, self.cache_dir, position, ifname, self.timeout).delete(sub)
            except Exception as exc:  # the others are still DELed; the failed one stays cached for the retry
                log.warning("CNI DEL of extra network interface %s of sandbox %s failed: %s", ifname,
                            spec.sandbox_id, exc)
                first = first or exc
        if first is not None:
            raise first


# -- plumbing ---------------------------------------------------------------------------------------------
def plumb(spec: SandboxNetSpec, info: PodNetworkInfo, added: list[Added]) -> None:
    """One VM NIC per extra network, after the pod network's NICs (appended to ``info.nics``)."""
    from virtlet.network.pod_network import _new_mac, bridge_name, tap_name  # pod_network imports this module

    ns = spec.netns_path
    for ex in added:
        a, result = ex.attachment, ex.result
        index = len(info.nics)
        ifaces = result.sandbox_interfaces()
        k, itf = next(((k, i) for k, i in ifaces if i.get("name") == a.ifname), (-1, {"name": a.ifname}))
        link = plumbing.link_info(a.ifname, ns)
        ips = result.ips_of(k) if k >= 0 and result.ips_of(k) else result.ips
        v4 = [ip for ip in ips if ipaddress.ip_interface(ip["address"]).version == 4]
        v6 = [ip for ip in ips if ipaddress.ip_interface(ip["address"]).version == 6]
        addr = ipaddress.IPv4Interface(v4[0]["address"]) if v4 else None
        nic = NicInfo(index=index, mac=str(itf.get("mac") or link["mac"]).lower(), mtu=int(link["mtu"]),
                      ip=str(addr.ip) if addr else "", prefix=addr.network.prefixlen if addr else 0,
                      gateway="", routes=_routes(result, v4, v6), veth=a.ifname, bridge=bridge_name(index),
                      tap=tap_name(spec.sandbox_id, index), ipv6=[ip["address"] for ip in v6], ipv6_gateway="",
                      network=ex.net.name)
        _check_asked(a, nic)
        info.nics.append(nic)
        plumbing.flush_ipv4(a.ifname, ns)
        plumbing.flush_ipv6_global(a.ifname, ns)
        plumbing.ensure_bridge(nic.bridge, ns, mtu=nic.mtu)
        plumbing.set_link(a.ifname, ns, mac=_new_mac(link["mac"], nic.mac), master=nic.bridge, up=True)


def _routes(result: CniResult, v4: list[dict[str, Any]], v6: list[dict[str, Any]]) -> list[Route]:
    """The extra network's own routes, each with its gateway filled in; default routes dropped (the pod network
    has the default route)."""
    gw4 = str(v4[0].get("gateway", "") or "") if v4 else ""
    gw6 = str(v6[0].get("gateway", "") or "") if v6 else ""
    out = []
    for r in result.routes:
        try:
            dst = ipaddress.ip_network(r["dst"], strict=False)
            gw = str(r.get("gw", "") or "") or (gw4 if dst.version == 4 else gw6)
            if gw:
                ipaddress.ip_address(gw)
        except (KeyError, ValueError, TypeError):
            continue
        if dst.prefixlen == 0 or (dst.version == 4 and not v4) or (dst.version == 6 and not (v6 and gw)):
            continue
        out.append(Route(dst=str(dst), gw=gw))
    return out


def _check_asked(a: Attachment, nic: NicInfo) -> None:
    """A pod that asked for a MAC or addresses on an extra network gets them or does not start."""
    if a.mac and nic.mac != a.mac:
        raise errors.FailedPrecondition(
            f"annotation {ANNOTATION}: network {a.label!r} asks for MAC {a.mac}, but the network gave {nic.mac}: "
            "a plugin of the network must declare \"capabilities\": {\"mac\": true} (e.g. the tuning plugin)")
    got = {nic.ip, *(x.split("/")[0] for x in nic.ipv6)}
    for want in a.ips:
        addr = str(ipaddress.ip_interface(want).ip)
        if addr not in got:
            raise errors.FailedPrecondition(
                f"annotation {ANNOTATION}: network {a.label!r} asks for {addr}, but the network gave "
                f"{', '.join(sorted(g for g in got if g)) or 'no address'}: its IPAM must declare "
                "\"capabilities\": {\"ips\": true} (host-local does)")
