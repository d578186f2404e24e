"""Adapts ``virtlet.network.PodNetwork`` to the sandbox manager: sandbox records in, the typed network result
out.  Every fact comes from the record (the host name included); the request's port mappings and DNS config and
the capability args of the pod's annotations are only needed by the set-up: the CNI runner caches them with the
network it ran, so the teardown (also after a crash) passes the same ones again."""

from __future__ import annotations

from virtlet.network import attachments, capabilities, plumbing
from virtlet.network.model import PodNetworkInfo, SandboxNetSpec
from virtlet.network.pod_network import PodNetwork
from virtlet.sandbox.manager import SandboxSpec
from virtlet.state import store as st


def _net_spec(rec: st.SandboxRecord, spec: SandboxSpec | None = None) -> SandboxNetSpec:
    return SandboxNetSpec(
        sandbox_id=rec.id, netns_path=rec.netns, pod_name=rec.name, pod_namespace=rec.namespace, pod_uid=rec.uid,
        hostname=rec.hostname, port_mappings=list(spec.port_mappings) if spec else [],
        dns=dict(spec.dns) if spec else {},
        annotation_caps=capabilities.from_annotations(spec.annotations) if spec else {},
        extra_networks=attachments.parse(spec.annotations) if spec else [])


class PodNetworkHook:
    def __init__(self, network: PodNetwork) -> None:
        self.network = network

    def setup(self, rec: st.SandboxRecord, spec: SandboxSpec) -> PodNetworkInfo:
        with plumbing.session():  # one netlink socket per namespace for the whole set-up
            return self.network.setup(_net_spec(rec, spec))

    def teardown(self, rec: st.SandboxRecord) -> None:
        with plumbing.session():
            self.network.teardown(_net_spec(rec))

    def reattach(self, rec: st.SandboxRecord) -> None:
        if rec.network is not None:
            self.network.reattach(rec.network, rec.hostname)
