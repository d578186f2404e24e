"""virtletd: the composition root.  Reads the configuration, builds the parts, serves CRI until signalled.

A daemon stop never touches VMs: SIGTERM/SIGINT stop accepting calls, let in-flight calls finish and exit; the
VMs keep running under libvirt and are found again at the next start.

A call that still runs when the grace (``shutdown_grace``) is over is not cut off by closing the state database
under it (that left a StopPodSandbox half done): virtletd exits at once with code 1 instead, which for the state
is the same as a SIGKILL at that point.  Every change is committed before the next step, and the next start
recovers (as after any crash).
"""

from __future__ import annotations

import logging
import os
import signal
import stat
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from virtlet import config as cfgmod
from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.image_service import ImageServicer
from virtlet.cri.metrics import MetricsEndpoint
from virtlet.cri.runtime_service import RuntimeServicer
from virtlet.cri.server import CriServer
from virtlet.images.policy import SourcePolicy
from virtlet.images.registry_config import RegistryConfig
from virtlet.images.store import ImageStore
from virtlet.network.cni import CniConfigStore, CniRunner
from virtlet.network.extra_networks import ExtraNetworks
from virtlet.network.pod_network import PodNetwork
from virtlet.sandbox.manager import SandboxManager
from virtlet.sandbox.network_hook import PodNetworkHook
from virtlet.state.store import StateStore
from virtlet.stream.service import StreamingService
from virtlet.vm import kvm
from virtlet.vm.libvirt_host import LibvirtHost
from virtlet.vm.manager import VmManager
from virtlet.vm.parts import VmParts

log = logging.getLogger("virtletd")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr, force=True)


def qemu_ids_from_capabilities(caps_xml: str, domain_type: str) -> tuple[int, int] | None:
    """(uid, gid) QEMU runs as: libvirt's DAC base label for ``domain_type`` (``+64055:+64055``), or None when
    libvirt names none (the test driver; a ``dac`` model absent)."""
    try:
        root = ET.fromstring(caps_xml)
    except ET.ParseError:
        return None
    for model in root.iterfind("host/secmodel"):
        if (model.findtext("model") or "").strip() != "dac":
            continue
        for label in model.iterfind("baselabel"):
            if label.get("type") != domain_type:
                continue
            uid, _, gid = (label.text or "").strip().partition(":")
            try:
                return int(uid.lstrip("+")), int(gid.lstrip("+"))
            except ValueError:
                return None
    return None


def secure_dir(path: Path, qemu: tuple[int, int] | None) -> None:
    """Make (or tighten) one of virtletd's own directories: ``0700`` root, or ``0710`` root:<QEMU's group> when
    QEMU runs as another user, who must reach overlays, ISOs and base images inside (traverse only, no
    listing; libvirt gives QEMU the files themselves).  Everything below inherits this gate, so per-container
    directories may stay 0755.  Tightened at every start: an older virtletd left them 0755."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st_ = path.stat()
    if st_.st_mode & stat.S_ISVTX:  # /tmp, /var/tmp: a shared directory is not ours to lock
        raise errors.FailedPrecondition(
            f"{path} is a shared sticky directory (like /tmp); give virtletd a directory of its own")
    if qemu is None or qemu[0] == 0:
        os.chmod(path, 0o700)
    else:
        if st_.st_gid != qemu[1]:
            os.chown(path, -1, qemu[1])
        os.chmod(path, 0o710)


def _condition(kind: str, ok: bool, reason: str = "", message: str = "") -> api.RuntimeCondition:
    return api.RuntimeCondition(type=kind, status=ok, reason="" if ok else reason, message=message)


class Virtletd:
    """All parts of one running virtletd."""

    def __init__(self, cfg: cfgmod.Config) -> None:
        self.cfg = cfg
        self._secure_dirs(None)  # 0700 until libvirt says which user QEMU runs as (below)
        self.kvm = kvm.detect(cfg.kvm)  # `kvm: on` without working KVM stops the start here
        (log.info if self.kvm.domain_type == "kvm" else log.warning)("%s", self.kvm.reason)
        self.kvm_message = self.kvm.reason
        self.store = StateStore(cfg.state_dir / "virtlet.db")
        self.libvirt = LibvirtHost(cfg.libvirt_uri)
        self._secure_dirs_for_qemu()
        self.image_store = ImageStore(cfg.image_dir, cfg.image_translations_dir, cfg.image_default_scheme,
                                      in_use=self._images_in_use, policy=SourcePolicy.build(
                                          cfg.image_source_allow, cfg.image_max_size, cfg.image_name_fallback),
                                      registries=RegistryConfig(cfg.image_registries_config))
        self.cni_config = CniConfigStore(cfg.cni_conf_dir, cfg.cni_bin_dir)
        self.pod_network = PodNetwork(CniRunner(self.cni_config, cfg.state_dir / "cni"), cfg.run_dir / "net",
                                      extra=ExtraNetworks(cfg.cni_extra_conf_dir, cfg.cni_bin_dir,
                                                          cfg.state_dir / "cni" / "extra"))
        self.vms = VmManager(self.store, self.libvirt,
                             VmParts(self.image_store, self.pod_network, self.kvm.domain_type, kvm.find_emulator(),
                                     max_root_volume_size=cfg.max_root_volume_size,
                                     share_driver=cfg.share_driver, virtiofsd=str(cfg.virtiofsd)),
                             cfg.state_dir, cfg.run_dir)
        # the sandbox manager owns a pod's order: stop its VMs, tear down its network, remove
        self.sandboxes = SandboxManager(self.store, PodNetworkHook(self.pod_network), containers=self.vms)
        self.streaming = StreamingService(cfg.stream_address, self.store, self.vms.console_dir,  # issue 9
                                          vms=self.vms)
        self.runtime = RuntimeServicer(self.sandboxes, self.status_conditions, self.status_info,
                                       containers=self.vms, streaming=self.streaming)
        self.images = ImageServicer(self.image_store)
        self.metrics = MetricsEndpoint(cfg.metrics_address, self.store, self.vms)
        self.server = CriServer(cfg.listen, self.runtime, self.images, observe=self.metrics.observe)
        self._stopping = threading.Event()

    def _secure_dirs(self, qemu: tuple[int, int] | None) -> None:
        for d in (self.cfg.state_dir, self.cfg.run_dir, self.cfg.image_dir):
            secure_dir(d, qemu)

    def _secure_dirs_for_qemu(self) -> bool:
        """Open the directories to QEMU's group when QEMU does not run as root; False when libvirt is down."""
        import libvirt

        try:
            caps = self.libvirt.connect().getCapabilities()
        except (errors.Unavailable, libvirt.libvirtError) as exc:
            log.warning("cannot ask libvirt which user QEMU runs as (%s); directories stay 0700 for now", exc)
            return False
        qemu = qemu_ids_from_capabilities(caps, self.kvm.domain_type)
        self._secure_dirs(qemu)
        if qemu is not None and qemu[0] != 0:
            log.info("QEMU runs as uid %d gid %d: state, run and image directories are 0710 with group %d",
                     *qemu, qemu[1])
        return True

    def _images_in_use(self) -> set[str]:
        return {c.image_ref for c in self.store.list_containers()}

    def cni_status(self) -> tuple[bool, str]:
        return self.cni_config.status()

    def status_conditions(self) -> list[api.RuntimeCondition]:
        ok, message = self.libvirt.alive()
        runtime = _condition("RuntimeReady", ok, "LibvirtUnavailable", message or self.kvm_message)
        net_ok, net_message = self.cni_status()
        network = _condition("NetworkReady", net_ok, "NetworkPluginNotReady", net_message)
        return [runtime, network]

    def status_info(self) -> dict[str, str]:
        import json

        return {"config": json.dumps(self.cfg.as_dict(), sort_keys=True), "kvm": self.kvm_message}

    # -- life -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.sandboxes.recover()
        self.image_store.cleanup_at_start()
        self._recover_vms()
        self.streaming.start()
        self.metrics.start()
        self.server.start()

    def _recover_vms(self) -> None:
        """Find running VMs again; when libvirt is not up yet, keep trying in the background."""
        try:
            self.vms.recover()
            return
        except errors.Unavailable as exc:
            log.error("libvirt unavailable at start-up (%s); VM recovery retried every 5 s", exc)

        def retry() -> None:
            while not self._stopping.wait(5):
                try:
                    self._secure_dirs_for_qemu()
                    self.vms.recover()
                    log.info("VM recovery done after libvirt came up")
                    return
                except errors.Unavailable:
                    continue

        threading.Thread(target=retry, name="vm-recovery", daemon=True).start()

    def stop(self, grace: float | None = None) -> bool:
        """Stop serving; True when every call finished in time and everything was closed, False when calls
        still run after the grace (nothing is closed under them then: the caller must exit the process)."""
        grace = float(self.cfg.shutdown_grace) if grace is None else grace
        log.info("stopping: no new calls; waiting up to %.0fs for calls in flight (VMs keep running)", grace)
        self._stopping.set()
        self.runtime.events.close()  # GetContainerEvents streams end now, not at the end of the grace
        left = self.server.stop(grace)
        if left:
            log.error("%d CRI call(s) still running after %.0fs; exiting without waiting for them (the next "
                      "start recovers what they left, as after a crash)", left, grace)
            return False
        self.streaming.stop()
        self.metrics.stop()
        self.vms.shutdown()
        self.image_store.close()
        self.libvirt.close()
        self.store.close()
        return True

    def serve_until_signalled(self) -> bool:
        def handle(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self._stopping.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        self._stopping.wait()
        return self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = cfgmod.load(argv)
    except errors.VirtletError as exc:
        print(f"virtletd: invalid configuration: {exc}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    try:
        daemon = Virtletd(cfg)
        daemon.start()
    except errors.VirtletError as exc:
        log.error("cannot start: %s", exc)
        return 1
    if not daemon.serve_until_signalled():
        # handler threads still run: a normal interpreter exit would join them (and close nothing under them
        # either); leave now, like a crash, with every committed change on disk
        logging.shutdown()
        os._exit(1)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
