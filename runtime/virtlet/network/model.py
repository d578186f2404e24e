"""Plain data shared by the CNI runner, the plumbing and the DHCP server.

Everything here is JSON-serialisable because it is stored in the sandbox record (``PodNetworkInfo``) or
written to the DHCP server's config file, and must survive a virtletd restart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from virtlet.network.attachments import Attachment


@dataclass(frozen=True)
class SandboxNetSpec:
    """What pod networking needs to know about one sandbox (filled from the CRI PodSandboxConfig)."""

    sandbox_id: str
    netns_path: str
    pod_name: str
    pod_namespace: str
    pod_uid: str
    hostname: str = ""
    # CRI PortMapping as dicts: protocol ("TCP"/"UDP"/"SCTP", absent means TCP), container_port, host_port,
    # host_ip (proto field names, as json_format.MessageToDict(preserving_proto_field_name=True) gives them)
    port_mappings: list[dict[str, Any]] = field(default_factory=list)
    # CRI DNSConfig: {"servers": [...], "searches": [...], "options": [...]}
    dns: dict[str, list[str]] = field(default_factory=dict)
    # CNI capability args the pod's annotations ask for ("bandwidth", "ips", "mac"), validated
    # (``virtlet.network.capabilities.from_annotations``)
    annotation_caps: dict[str, Any] = field(default_factory=dict)
    # extra networks of the k8s.v1.cni.cncf.io/networks annotation, validated
    # (``virtlet.network.attachments.parse``); only set-up needs them, teardown finds them in the CNI cache
    extra_networks: list[Attachment] = field(default_factory=list)

    @property
    def netns_name(self) -> str:
        return Path(self.netns_path).name


@dataclass(frozen=True)
class Route:
    dst: str  # CIDR, "0.0.0.0/0" (or "::/0") for the default route
    gw: str = ""  # empty: via the interface's gateway (or on-link when there is none); IPv6 routes always have one


@dataclass
class NicInfo:
    """One VM NIC, built from one sandbox interface of the CNI result."""

    index: int
    mac: str  # the VM's MAC: the one the CNI plugin gave the pod's veth
    mtu: int
    ip: str  # IPv4 address without prefix ("" when the CNI result gave this interface no IPv4)
    prefix: int
    gateway: str
    routes: list[Route]
    veth: str  # name of the CNI interface inside the pod netns (eth0, ...)
    bridge: str  # bridge inside the pod netns joining veth + tap
    tap: str  # tap name (host netns until the VM starts, then moved into the pod netns)
    # CIDRs: pod IPs, given to the guest by RA + DHCPv6 (``ipv6_ra``) and cloud-init network-config; removed from
    # the veth
    ipv6: list[str] = field(default_factory=list)
    ipv6_gateway: str = ""  # the CNI result's gateway of the first IPv6 address ("" when it has none)
    # "" for an interface of the pod network; the CNI network name of an extra network (its addresses are
    # not pod IPs, and it never carries the default route)
    network: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NicInfo:
        d = dict(d)
        d["routes"] = [Route(**r) for r in d.get("routes", [])]
        return cls(**d)


@dataclass
class PodNetworkInfo:
    """The network of one sandbox as virtletd needs to remember it: the typed ``network`` of the sandbox record
    (``virtlet.state.store.SandboxRecord``).

    It holds only what the network set-up found (NICs with their MACs, taps, bridges, addresses and routes; the
    DNS the VM is given; the DHCP server's pid).  The pod's host name is a fact of the sandbox record
    (``SandboxRecord.hostname``), not of this result; the pod IPs are derived from the NICs (``pod_ips``)."""

    sandbox_id: str
    netns_path: str
    nics: list[NicInfo]
    dns_servers: list[str]
    dns_searches: list[str]
    dns_options: list[str]
    dhcp_pid: int = 0

    @property
    def pod_ips(self) -> list[str]:
        """IPv4 addresses first (in NIC order), then IPv6: the CRI's ip + additional_ips."""
        pod = [n for n in self.nics if not n.network]  # extra networks' addresses are not the pod's IPs
        v4 = [n.ip for n in pod if n.ip]
        v6 = [a.split("/")[0] for n in pod for a in n.ipv6]
        return v4 + v6

    @property
    def default_veth(self) -> str:
        """The CNI interface of the first NIC inside the pod netns (the one the CRI reports stats for)."""
        return self.nics[0].veth if self.nics else ""

    def to_dict(self) -> dict[str, Any]:
        return {"sandbox_id": self.sandbox_id, "netns_path": self.netns_path,
                "nics": [n.to_dict() for n in self.nics], "dns_servers": list(self.dns_servers),
                "dns_searches": list(self.dns_searches), "dns_options": list(self.dns_options),
                "dhcp_pid": self.dhcp_pid}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PodNetworkInfo:
        """Reads what ``to_dict`` wrote, and what earlier virtletd versions wrote (their ``hostname`` and
        ``pod_ips`` keys are ignored: the host name lives in the sandbox record, the IPs come from the NICs)."""
        return cls(sandbox_id=d["sandbox_id"], netns_path=d["netns_path"],
                   nics=[NicInfo.from_dict(n) for n in d.get("nics", [])],
                   dns_servers=list(d.get("dns_servers", [])), dns_searches=list(d.get("dns_searches", [])),
                   dns_options=list(d.get("dns_options", [])), dhcp_pid=int(d.get("dhcp_pid", 0)))
