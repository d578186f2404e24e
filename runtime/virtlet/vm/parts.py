"""The parts of a VM container, composed: image -> overlay -> config drive -> domain XML, and the network
hooks around a VM's start and exit.  ``VmManager`` calls these; each call does one thing and can be undone by
deleting the container directory."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from virtlet import cloudinit, errors
from virtlet.console import writer as console_writer
from virtlet.console.writer import ConsoleLogWriter
from virtlet.network import plumbing
from virtlet.state import store as st
from virtlet.vm import designer, guest_exit, overlay
from virtlet.vm import domain_xml as dx
from virtlet.vm.annotations import (
    DEFAULT_MAX_ROOT_VOLUME_SIZE,
    CpuResources,
    VmOptions,
    check_annotation_sizes,
    parse_vm_options,
)
from virtlet.vm.manager import ContainerSpec
from virtlet.volumes import binds, persistent_root, scratch, shares
from virtlet.volumes import devices as vdev
from virtlet.volumes import mounts as vmounts

if TYPE_CHECKING:  # types only: no import of the image store or pod network at run time here
    from virtlet.images.store import ImageRecord, ImageStore
    from virtlet.network.pod_network import PodNetwork


@dataclass(frozen=True)
class _Volumes:
    plan: vmounts.MountPlan
    driver: str
    user_data: dict[str, Any]
    seed_files: dict[str, bytes]


class _Validated(NamedTuple):
    """What a CreateContainer asks for, checked (``VmParts._validated``)."""

    pod_annotations: dict[str, str]
    options: VmOptions
    devices: vdev.DevicePlan
    reimage: bool
    volumes: _Volumes


class VmParts:
    """Default parts of virtletd.  ``images`` is the image store, ``network`` the PodNetwork (or None);
    ``max_root_volume_size`` is the largest ``VirtletRootVolumeSize`` a pod may ask for (config key)."""

    def __init__(self, images: ImageStore, network: PodNetwork | None, domain_type: str, emulator: str,
                 host_cpus: int | None = None, max_root_volume_size: int = DEFAULT_MAX_ROOT_VOLUME_SIZE,
                 share_driver: str = "virtiofs", virtiofsd: str = shares.DEFAULT_VIRTIOFSD) -> None:
        self.images = images
        self.network = network
        self.domain_type = domain_type
        self.emulator = emulator
        self.host_cpus = host_cpus or os.cpu_count() or 1
        self.max_root_volume_size = max_root_volume_size
        self.share_driver = share_driver
        self.virtiofsd = virtiofsd

    def image_status(self, name: str) -> ImageRecord | None:
        return self.images.status(name)

    def validate(self, spec: ContainerSpec, sandbox: st.SandboxRecord) -> None:
        """Refuse (``InvalidArgument``) what ``prepare`` would refuse about the request itself, making nothing: the
        manager asks before it replaces a never-started container of the pod, so a refused CreateContainer
        leaves the pod as it was."""
        self._validated(spec, sandbox)

    def _validated(self, spec: ContainerSpec, sandbox: st.SandboxRecord) -> _Validated:
        check_annotation_sizes(sandbox.annotations, "pod")
        check_annotation_sizes(spec.annotations, "container")
        pod_annotations = {**spec.annotations, **sandbox.annotations}
        options = parse_vm_options(pod_annotations, spec.memory_limit_bytes, spec.cpu or CpuResources(),
                                   sandbox.uid, self.host_cpus, self.max_root_volume_size)
        cloudinit.parse_cloudinit_options(pod_annotations)
        plan = vdev.plan_devices(spec.devices)
        reimage = _reimage_requested(pod_annotations)
        vols = self._plan_volumes(spec, pod_annotations)
        if len(plan.volumes) + len(vols.plan.scratch) > vdev.MAX_BLOCK_VOLUMES:
            raise errors.InvalidArgument(
                f"the container has {len(plan.volumes)} block volumes and {len(vols.plan.scratch)} scratch disks; "
                f"a VM takes at most {vdev.MAX_BLOCK_VOLUMES} disks besides its root disk")
        for disk in vols.plan.scratch:
            scratch.check_existing(disk)
        return _Validated(pod_annotations, options, plan, reimage, vols)

    def prepare(self, cid: str, spec: ContainerSpec, sandbox: st.SandboxRecord, image: ImageRecord, cdir: Path,
                console_sock: Path, define: Callable[[str], None]) -> dict[str, Any]:
        """``image`` is the store's record of ``spec.image`` (the manager looked it up already).  ``qemu-img``
        makes the root overlay while the config drive is built and the domain is defined (``define``), the
        longest steps of a CreateContainer; it returns once all three are done."""
        # validate everything first, whoever called validate before: a bad annotation must leave nothing behind
        pod_annotations, options, plan, reimage, vols = self._validated(spec, sandbox)
        sources = {s.tag: binds.bind_readonly(s.host_path, cdir, i) for i, s in enumerate(vols.plan.shares)
                   if shares.needs_ro_bind(s, vols.driver)}  # undone by VmManager._destroy_everything
        (cdir / console_writer.RAW_DIR).mkdir(mode=0o700, exist_ok=True)  # virtlogd (root) writes RAW there
        raw = console_writer.raw_path(cdir)
        root = cdir / "root.qcow2"
        root_header = None
        pending: overlay.PendingOverlay | None = None
        if plan.root is not None:  # the device is the root disk: no overlay, VirtletRootVolumeSize ignored
            root_header = persistent_root.prepare_root(
                plan.root.host_path, Path(image.path), image.format, image.digest, reimage,
                what=f"persistent root device {plan.root.host_path!r}")
        else:  # qemu-img runs while the config drive and the domain are built below
            pending = overlay.start_overlay(Path(image.path), image.format, root, options.root_volume_size,
                                            base_size=image.virtual_size)
        try:
            info = sandbox.network
            nics = info.nics if info is not None else []
            seed = cdir / "config.iso"
            cloudinit.build_seed_iso(cloudinit.CloudInitRequest(
                pod_name=sandbox.name, pod_namespace=sandbox.namespace, pod_uid=sandbox.uid, hostname=sandbox.hostname,
                annotations=pod_annotations, env=list(spec.envs),
                nics=[cloudinit.NicConfig(
                    mac=n.mac, mtu=n.mtu or None, addresses=([f"{n.ip}/{n.prefix}"] if n.ip else []) + list(n.ipv6),
                    gateway=n.gateway or None, routes=[(r.dst, r.gw) for r in n.routes]) for n in nics],
                dns_servers=list(info.dns_servers) if info else [],
                dns_search=list(info.dns_searches) if info else [],
                extra_user_data=_with_block_links(vols.user_data, plan.volumes),
                extra_files={**vols.seed_files, **({vdev.GUEST_MAP_FILE: vdev.guest_map(plan.volumes)}
                                                   if plan.volumes else {})},
                instance_id=root_header.instance_id if root_header is not None else None), seed)
            scratch_files = [scratch.prepare(d) for d in vols.plan.scratch]  # in the emptyDir: the kubelet removes it
            domain = designer.design_domain(designer.DomainRequest(
                container_id=cid, sandbox_id=sandbox.id, pod_name=sandbox.name, pod_namespace=sandbox.namespace,
                pod_uid=sandbox.uid, options=options, domain_type=self.domain_type, overlay=root,
                console_socket=console_sock, console_log=raw, emulator=self.emulator,
                nics=[designer.Nic(tap=n.tap, mac=n.mac, mtu=n.mtu or None) for n in nics], config_drive=seed,
                extra_metadata={"image": spec.image, "image-ref": image.digest},
                shares=shares.filesystem_devices(vols.plan, vols.driver, self.virtiofsd, sources),
                block_volumes=plan.volumes, scratch_disks=scratch_files,
                root_device=plan.root.host_path if plan.root is not None else None,
                exit_file=guest_exit.exit_file(cdir)))
            extra: dict[str, Any] = {"config_drive": str(seed), "vcpus": options.vcpus,
                                     "max_vcpus": max(options.max_vcpus, options.vcpus),
                                     "memory_bytes": options.memory_bytes, "domain_type": self.domain_type,
                                     "cpuset": options.cpuset}
            if plan.root is not None:
                extra["root_device"] = plan.root.host_path
            else:
                extra["root"] = str(root)
            if plan.volumes:
                extra["block_devices"] = [v.host_path for v in plan.volumes]
            if scratch_files:
                extra["scratch_disks"] = [f.path for f in scratch_files]
            term = next((f for f in vols.plan.files if f.kind == "termination-log"), None)
            if term is not None:  # copied back from the guest at StopContainer (virtlet.vm.termination)
                extra["termination_log"] = {"guest": term.guest_path, "host": term.host_path}
            define(dx.to_string(domain))  # libvirt does not open the disks until the start
        except BaseException:
            if pending is not None:
                pending.abandon()
            raise
        if pending is not None:
            pending.wait()
        return extra

    def _plan_volumes(self, spec: ContainerSpec, annotations: dict[str, str]) -> _Volumes:
        """The container's CRI mounts, validated and turned into shares, scratch disks + guest instructions
        (nothing made).  Scratch disks are bounded by the node's ``max_root_volume_size``."""
        sizes = scratch.parse_annotation(annotations.get(scratch.ANNOTATION), self.max_root_volume_size)
        plan = vmounts.plan_mounts(list(spec.mounts), sizes)
        driver = shares.pick_driver(self.share_driver, self.virtiofsd)
        guest = shares.guest_shares(plan, driver) + scratch.guest_entries(plan.scratch)
        files = shares.read_file_copies(plan)
        return _Volumes(plan=plan, driver=driver, user_data=shares.cloud_config(guest, files),
                        seed_files={shares.MOUNTS_FILE: shares.mounts_file(guest)} if guest else {})

    def taps_before_start(self, sandbox: st.SandboxRecord) -> None:
        info = sandbox.network
        if self.network is not None and info is not None and info.nics:
            with plumbing.session():  # one netlink socket per namespace for all the steps
                self.network.host_taps_for_start(info)

    def after_start(self, sandbox: st.SandboxRecord) -> None:
        info = sandbox.network
        if self.network is not None and info is not None and info.nics:
            with plumbing.session():  # one netlink socket per namespace for all the steps
                self.network.attach_after_start(info)

    def after_exit(self, sandbox: st.SandboxRecord) -> None:
        info = sandbox.network
        if self.network is not None and info is not None and info.nics:
            with plumbing.session():  # one netlink socket per namespace for all the steps
                self.network.release_taps(info)

    def log_writer(self, raw: Path, cri_log: Path, state: Path) -> ConsoleLogWriter:
        return ConsoleLogWriter(raw, cri_log, state)



def _with_block_links(user_data: dict[str, Any], volumes: tuple[vdev.BlockVolume, ...]) -> dict[str, Any]:
    """virtlet's cloud-config for the pod's volumes plus the per-boot ``bootcmd`` linking block volumes."""
    if not volumes:
        return user_data
    return {**user_data, "bootcmd": [*user_data.get("bootcmd", []), vdev.link_script(volumes)]}


def _reimage_requested(annotations: dict[str, str]) -> bool:
    value = annotations.get(persistent_root.REIMAGE_ANNOTATION, "false").strip().lower()
    if value not in ("true", "false"):
        raise errors.InvalidArgument(f"annotation {persistent_root.REIMAGE_ANNOTATION}: expected \"true\" or "
                                     f"\"false\", got {value[:40]!r}")
    return value == "true"
