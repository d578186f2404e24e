"""Sandbox operations: RunPodSandbox/StopPodSandbox/RemovePodSandbox as domain operations.

Crash-safety invariant: a network namespace of ours exists only while its record exists.  The record is written
(state CREATING) *before* the namespace is made and deleted *after* it is gone, so after a SIGKILL anywhere the
start-up recovery either finishes the teardown or finds both.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from virtlet import errors, failpoints
from virtlet.locks import KeyedLocks
from virtlet.network import netns
from virtlet.network.model import PodNetworkInfo
from virtlet.state import store as st

log = logging.getLogger(__name__)

SUPPORTED_HANDLERS = ("", "virtlet")


@dataclass(frozen=True)
class SandboxSpec:
    """A RunPodSandbox request as typed facts: the CRI servicer converts the PodSandboxConfig into this once.
    ``hostname`` is resolved already (the kubelet's, or the pod name); ``port_mappings`` and ``dns`` are only
    for the network set-up and are not stored."""

    name: str
    namespace: str
    uid: str
    attempt: int
    hostname: str
    runtime_handler: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    log_directory: str = ""
    port_mappings: list[dict[str, Any]] = field(default_factory=list)
    dns: dict[str, list[str]] = field(default_factory=dict)  # servers, searches, options


class NetworkHook(Protocol):
    """What the sandbox manager needs from pod networking (``virtlet.network``)."""

    def setup(self, rec: st.SandboxRecord, spec: SandboxSpec) -> PodNetworkInfo: ...

    def teardown(self, rec: st.SandboxRecord) -> None: ...

    def reattach(self, rec: st.SandboxRecord) -> None: ...


class PodContainers(Protocol):
    """What the sandbox manager needs from the containers of a pod (``virtlet.vm.manager.VmManager``)."""

    def stop_all_in_sandbox(self, sandbox_id: str) -> None: ...

    def remove_all_in_sandbox(self, sandbox_id: str) -> None: ...


class SandboxManager:
    """The one owner of a pod's order: StopPodSandbox stops its VMs, then tears down the network, then the
    namespace; RemovePodSandbox does all that, then removes the VMs, then the record.  ``containers`` may be
    None only where no VM runs (tests of the sandbox alone)."""

    def __init__(self, store: st.StateStore, network: NetworkHook | None = None,
                 containers: PodContainers | None = None) -> None:
        self.store = store
        self.network = network
        self.containers = containers
        self.lock = KeyedLocks()

    # -- RunPodSandbox --------------------------------------------------------------------------------
    def run(self, spec: SandboxSpec) -> st.SandboxRecord:
        if spec.runtime_handler not in SUPPORTED_HANDLERS:
            raise errors.InvalidArgument(
                f"runtime handler {spec.runtime_handler!r} is not served by virtletd "
                f"(use \"virtlet\" or leave it empty)")
        for what, value in (("metadata.name", spec.name), ("metadata.namespace", spec.namespace),
                            ("metadata.uid", spec.uid)):
            if not value:
                raise errors.InvalidArgument(f"pod sandbox config: {what} is required")
        sandbox_id = uuid.uuid4().hex
        rec = st.SandboxRecord(
            id=sandbox_id, name=spec.name, namespace=spec.namespace, uid=spec.uid, attempt=spec.attempt,
            state=st.SANDBOX_CREATING, created_at=st.now_ns(), runtime_handler=spec.runtime_handler,
            netns=str(netns.path(sandbox_id)), labels=dict(spec.labels), annotations=dict(spec.annotations),
            hostname=spec.hostname, log_directory=spec.log_directory)
        with self.lock(sandbox_id):
            self.store.add_sandbox(rec)  # committed before anything exists on the host; refuses a reserved name
            log.info("creating sandbox %s for pod %s/%s", sandbox_id, spec.namespace, spec.name)
            try:
                failpoints.hit("sandbox.run.after_record")
                netns.create(sandbox_id)
                failpoints.hit("sandbox.after_netns")
                network: PodNetworkInfo | None = None
                if self.network is not None:
                    network = self.network.setup(rec, spec)
                failpoints.hit("sandbox.after_network")
                rec = self.store.update_sandbox(sandbox_id, state=st.SANDBOX_READY, network=network)
            except BaseException:
                self._rollback(rec)
                raise
        log.info("sandbox %s ready for pod %s/%s", sandbox_id, spec.namespace, spec.name)
        return rec

    def _rollback(self, rec: st.SandboxRecord) -> None:
        """Undo a half-made sandbox.  When the network teardown fails the record stays CREATING, so start-up
        recovery (or the next rollback) retries it; the namespace goes in any case."""
        network_ok = True
        if self.network is not None:
            try:
                self.network.teardown(rec)
            except Exception:  # the original error matters more
                network_ok = False
                log.exception("network teardown of half-made sandbox %s failed; retried at start-up", rec.id)
        netns.delete(rec.id)
        if network_ok:
            self.store.delete_sandbox(rec.id)

    # -- StopPodSandbox -------------------------------------------------------------------------------
    def stop(self, sandbox_id: str) -> None:
        with self.lock(sandbox_id):
            rec = self.store.get_sandbox(sandbox_id)
            if rec is None:
                return  # the kubelet expects success for an unknown id
            if self.containers is not None:
                self.containers.stop_all_in_sandbox(sandbox_id)
            failpoints.hit("sandbox.stop.after_containers")
            if not rec.network_torn_down:
                if self.network is not None:
                    self.network.teardown(rec)  # raises -> Stop fails, kubelet retries, teardown retried
                rec = self.store.update_sandbox(sandbox_id, network_torn_down=True)
                failpoints.hit("sandbox.stop.after_network")
            netns.delete(sandbox_id)
            failpoints.hit("sandbox.stop.after_netns")
            if rec.state != st.SANDBOX_NOTREADY:
                self.store.update_sandbox(sandbox_id, state=st.SANDBOX_NOTREADY)

    # -- RemovePodSandbox -----------------------------------------------------------------------------
    def remove(self, sandbox_id: str) -> None:
        with self.lock(sandbox_id):
            if self.store.get_sandbox(sandbox_id) is None:
                return
            self.stop(sandbox_id)
            failpoints.hit("sandbox.remove.after_stop")
            if self.containers is not None:
                self.containers.remove_all_in_sandbox(sandbox_id)
            failpoints.hit("sandbox.remove.after_containers")
            self.store.delete_sandbox(sandbox_id)

    # -- start-up recovery ----------------------------------------------------------------------------
    def recover(self) -> None:
        """Finish what a killed virtletd left: roll back half-created sandboxes, re-attach network services."""
        for rec in self.store.list_sandboxes():
            if rec.state == st.SANDBOX_CREATING:
                log.warning("rolling back sandbox %s left half-created by an earlier virtletd", rec.id)
                self._rollback(rec)
            elif rec.state == st.SANDBOX_READY and rec.network_torn_down:
                # a StopPodSandbox was killed after its CNI DEL: finish it (the kubelet's retry finds it done)
                log.warning("finishing the stop of sandbox %s left half-stopped by an earlier virtletd", rec.id)
                netns.delete(rec.id)
                self.store.update_sandbox(rec.id, state=st.SANDBOX_NOTREADY)
            elif rec.state == st.SANDBOX_READY:
                if not netns.exists(rec.id):
                    log.warning("sandbox %s lost its network namespace (host reboot?); marking NOTREADY", rec.id)
                    self.store.update_sandbox(rec.id, state=st.SANDBOX_NOTREADY)
                elif self.network is not None and rec.network is not None:
                    try:
                        self.network.reattach(rec)
                    except Exception:
                        log.exception("cannot re-attach network services of sandbox %s", rec.id)
