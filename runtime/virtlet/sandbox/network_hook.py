"""Adapts ``virtlet.network.PodNetwork`` to the sandbox manager: sandbox records in, JSON network info out."""

from __future__ import annotations

from typing import Any

from virtlet.network.model import PodNetworkInfo, SandboxNetSpec
from virtlet.network.pod_network import PodNetwork
from virtlet.sandbox.manager import SandboxSpec
from virtlet.state import store as st


def _net_spec(rec: st.SandboxRecord, spec: SandboxSpec | None = None) -> SandboxNetSpec:
    hostname = spec.hostname if spec is not None else rec.network.get("hostname", "") or rec.name
    return SandboxNetSpec(
        sandbox_id=rec.id, netns_path=rec.netns, pod_name=rec.name, pod_namespace=rec.namespace, pod_uid=rec.uid,
        hostname=hostname, port_mappings=list(spec.port_mappings) if spec else [],
        dns=dict(spec.dns) if spec else {})


class PodNetworkHook:
    def __init__(self, network: PodNetwork) -> None:
        self.network = network

    def setup(self, rec: st.SandboxRecord, spec: SandboxSpec) -> dict[str, Any]:
        return self.network.setup(_net_spec(rec, spec)).to_dict()

    def teardown(self, rec: st.SandboxRecord) -> None:
        info = PodNetworkInfo.from_dict(rec.network) if rec.network.get("nics") is not None else None
        self.network.teardown(_net_spec(rec), info)

    def reattach(self, rec: st.SandboxRecord) -> None:
        self.network.reattach(PodNetworkInfo.from_dict(rec.network))
