"""virtletd: the composition root.  Reads the configuration, builds the parts, serves CRI until signalled.

A daemon stop never touches VMs: SIGTERM/SIGINT stop accepting calls, let in-flight calls finish and exit; the
VMs keep running under libvirt and are found again at the next start.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from virtlet import config as cfgmod
from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.image_service import ImageServicer
from virtlet.cri.runtime_service import RuntimeServicer
from virtlet.cri.server import CriServer
from virtlet.images.store import ImageStore
from virtlet.network.cni import CniConfigStore, CniRunner
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


def _condition(kind: str, ok: bool, reason: str = "", message: str = "") -> api.RuntimeCondition:
    return api.RuntimeCondition(type=kind, status=ok, reason="" if ok else reason, message=message)


class Virtletd:
    """All parts of one running virtletd."""

    def __init__(self, cfg: cfgmod.Config) -> None:
        self.cfg = cfg
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        self.kvm = kvm.detect(cfg.kvm)  # `kvm: on` without working KVM stops the start here
        (log.info if self.kvm.domain_type == "kvm" else log.warning)("%s", self.kvm.reason)
        self.kvm_message = self.kvm.reason
        self.store = StateStore(cfg.state_dir / "virtlet.db")
        self.libvirt = LibvirtHost(cfg.libvirt_uri)
        self.image_store = ImageStore(cfg.image_dir, cfg.image_translations_dir, cfg.image_default_scheme,
                                      in_use=self._images_in_use)
        self.cni_config = CniConfigStore(cfg.cni_conf_dir, cfg.cni_bin_dir)
        self.pod_network = PodNetwork(CniRunner(self.cni_config, cfg.state_dir / "cni"), cfg.run_dir / "net")
        self.sandboxes = SandboxManager(self.store, PodNetworkHook(self.pod_network))
        self.vms = VmManager(self.store, self.libvirt,
                             VmParts(self.image_store, self.pod_network, self.kvm.domain_type, kvm.find_emulator(),
                                     max_root_volume_size=cfg.max_root_volume_size),
                             cfg.state_dir, cfg.run_dir)
        self.sandboxes.before_stop.append(self.vms.stop_all_in_sandbox)
        self.runtime = RuntimeServicer(self.sandboxes, self.status_conditions, self.status_info)
        self.runtime.containers = self.vms
        self.streaming = StreamingService(cfg.stream_address, self.store, self.vms.console_dir,  # issue 9
                                          agents=self.vms.guest_agent)
        self.runtime.streaming = self.streaming
        self.images = ImageServicer(self.image_store)
        self.server = CriServer(cfg.listen, self.runtime, self.images)
        self._stopping = threading.Event()

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
                    self.vms.recover()
                    log.info("VM recovery done after libvirt came up")
                    return
                except errors.Unavailable:
                    continue

        threading.Thread(target=retry, name="vm-recovery", daemon=True).start()

    def stop(self, grace: float = 30.0) -> None:
        log.info("stopping: no new calls; waiting up to %.0fs for calls in flight (VMs keep running)", grace)
        self._stopping.set()
        self.server.stop(grace)
        self.streaming.stop()
        self.vms.shutdown()
        self.image_store.close()
        self.libvirt.close()
        self.store.close()

    def serve_until_signalled(self) -> None:
        def handle(signum: int, _frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self._stopping.set()

        signal.signal(signal.SIGTERM, handle)
        signal.signal(signal.SIGINT, handle)
        self._stopping.wait()
        self.stop()


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
    daemon.serve_until_signalled()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
