"""Policy: one VM container's request -> the ``domain_xml.Domain`` virtlet defines in libvirt.

All choices about the domain's shape live here (names, disk targets, where the config drive goes, what the
metadata holds); ``domain_xml`` only knows how to write them.  Choices and why:

- Domain name ``virtlet-<container id>``: unique (the id is a fresh UUID), and the prefix tells virtlet's
  domains apart from others on the host at a glance.
- Domain UUID = the SMBIOS system UUID (``VirtletSystemUUID`` or derived from the pod uid): libvirt refuses a
  ``<sysinfo>`` UUID that differs from the domain's, and QEMU shows the domain UUID to the guest anyway.  So a
  pod's next container (after a restart) has the same UUID: the manager must undefine the exited previous
  domain before defining the next one.
- Machine ``pc`` (i440fx): its IDE controller is what the config-drive CD-ROM uses with virtio disks (guests
  need only ``ata_piix``), and the default machine type cannot change under us.
- The config drive is the LAST disk, a read-only CD-ROM: IDE ``hdc`` for virtio root disks, the SCSI disk after
  the block volumes (``sdb`` without any) when ``VirtletDiskDriver`` is ``scsi`` (one virtio-scsi controller).
- Block volumes (CRI devices) follow the root disk in CRI order (``vdb``, ``vdc``, ... / ``sdb``, ...), then
  the scratch disks in mount order; a persistent root device replaces the overlay as ``vda``/``sda``
  (``virtlet.volumes``).
- CPU quota/period from CRI bound the whole container, so they become ``global_quota``/``global_period``
  (libvirt's ``quota`` is per vCPU).  A quota without a period gets the kernel's default period, 100 ms.
- ``<metadata>`` holds the container, sandbox and pod identity under ``VIRTLET_XMLNS`` so a restarted virtletd
  recognises its domains (see ``virtlet_metadata``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree as ET

from virtlet.vm import domain_xml as dx
from virtlet.vm import exec_channel, guest_exit
from virtlet.vm.annotations import VmOptions
from virtlet.volumes.devices import BlockVolume
from virtlet.volumes.scratch import ScratchFile

VIRTLET_XMLNS = "https://virtlet.cloud/xmlns/domain/1.0"
VIRTLET_XMLNS_PREFIX = "virtlet"
METADATA_ROOT = "container"
DOMAIN_NAME_PREFIX = "virtlet-"
DEFAULT_CFS_PERIOD_US = 100000
MACHINE = "pc"


@dataclass(frozen=True)
class Nic:
    """A tap device virtlet created for the VM (host side) and the MAC/MTU the guest NIC gets."""

    tap: str
    mac: str
    mtu: int | None = None


@dataclass(frozen=True)
class DomainRequest:
    container_id: str
    sandbox_id: str
    pod_name: str
    pod_namespace: str
    pod_uid: str
    options: VmOptions
    domain_type: str  # "kvm" | "qemu", from kvm.detect
    overlay: Path  # qcow2 root disk (an overlay on the stored image)
    console_socket: Path  # unix socket QEMU listens on for serial port 0
    console_log: Path  # raw console output, appended by virtlogd
    emulator: str  # path of qemu-system-x86_64 (kvm.find_emulator)
    nics: Sequence[Nic] = ()
    config_drive: Path | None = None  # cloud-init ISO, attached last and read-only
    extra_metadata: Mapping[str, str] = field(default_factory=dict)  # more <metadata> fields, e.g. image ref
    shares: Sequence[dx.Filesystem] = ()  # pod directory volumes (virtlet.volumes.shares)
    block_volumes: Sequence[BlockVolume] = ()  # CRI devices: raw disks after the root disk (vdb, vdc, ...)
    scratch_disks: Sequence[ScratchFile] = ()  # emptyDir scratch disks: raw files after the block volumes
    root_device: str | None = None  # persistent root: this block device is vda instead of ``overlay``
    exit_file: Path | None = None  # host side of the guest's exit-code port (virtlet.vm.guest_exit)


def domain_name(container_id: str) -> str:
    """The libvirt domain name of a container."""
    return f"{DOMAIN_NAME_PREFIX}{container_id}"


def container_id_of(name: str) -> str | None:
    """The container id in a virtlet domain name, None for a domain that is not virtlet's by name."""
    if not name.startswith(DOMAIN_NAME_PREFIX):
        return None
    return name[len(DOMAIN_NAME_PREFIX):] or None


# libvirt gives every i440fx domain a USB controller (QEMU's piix3-usb-uhci) unless told otherwise.  Nothing in a VM
# pod uses USB (no input devices, no passthrough), the guest kernel probes it at every boot (about 80 ms of the
# tiny image's 5.9 s boot under TCG, bench/vm_boot's hand-made domain with and without it) and its emulation
# is attack surface: none.
NO_USB = dx.Controller(type="usb", model="none", index=0)


def design_domain(req: DomainRequest) -> dx.Domain:
    """Build the domain objects for ``req``; pure, no libvirt or file access."""
    opts = req.options
    scsi = opts.disk_driver == "scsi"
    disks = _block_disks(req, scsi)
    if req.config_drive is not None:
        disks.append(dx.Disk(source=str(req.config_drive), format="raw", device="cdrom", readonly=True,
                             target_dev=_disk_name("sd", len(disks)) if scsi else "hdc",
                             target_bus="scsi" if scsi else "ide"))
    devices = dx.Devices(
        emulator=req.emulator,
        disks=disks,
        filesystems=list(req.shares),
        controllers=[NO_USB, *([dx.Controller(type="scsi", model="virtio-scsi", index=0)] if scsi else [])],
        interfaces=[dx.EthernetInterface(target_dev=n.tap, mac=n.mac, mtu=n.mtu) for n in req.nics],
        serials=[dx.UnixSerial(path=str(req.console_socket), log_file=str(req.console_log), log_append=True)],
        channels=[dx.GuestAgentChannel(), exec_channel_device(req)],  # exec probes; exec (virtlet.vm.exec_channel)
        file_channels=exit_code_channels(req),
        graphics=[dx.VncGraphics()],  # unix socket in libvirt's per-domain dir: root only (virtletctl vnc)
        memballoon=dx.MemBalloon(model="virtio"),
        rng=dx.Rng(),
    )
    period = opts.cpu_period or (DEFAULT_CFS_PERIOD_US if opts.cpu_quota else None)
    return dx.Domain(
        type=req.domain_type,
        name=domain_name(req.container_id),
        uuid=opts.system_uuid,
        title=f"{req.pod_namespace}/{req.pod_name} (virtlet)",
        memory_bytes=opts.memory_bytes,
        vcpus=opts.vcpus,
        max_vcpus=opts.max_vcpus or None,
        cpuset=opts.cpuset or None,
        cputune=dx.CpuTune(shares=opts.cpu_shares, global_period=period, global_quota=opts.cpu_quota),
        os=dx.Os(machine=MACHINE, boot_devices=("hd",), smbios_sysinfo=True),
        features=("acpi", "apic"),
        cpu=dx.Cpu(mode=opts.cpu_model) if opts.cpu_model else None,
        sysinfo=dx.SysInfo(uuid=opts.system_uuid, manufacturer="virtlet", product="virtlet VM",
                           serial=req.container_id),
        devices=devices,
        metadata=[dx.Metadata(uri=VIRTLET_XMLNS, prefix=VIRTLET_XMLNS_PREFIX, root=METADATA_ROOT,
                              fields=_metadata_fields(req))],
        memory_backing=_share_memory_backing(req),
    )


def exit_code_channels(req: DomainRequest) -> list[dx.FileChannel]:
    """The virtio-serial port ``cloud.virtlet.exit`` the guest reports its own exit code on, file-backed."""
    if req.exit_file is None:
        return []
    return [dx.FileChannel(path=str(req.exit_file), name=guest_exit.CHANNEL_NAME)]


def exec_channel_device(req: DomainRequest) -> dx.GuestAgentChannel:
    """The virtio-serial port of interactive exec (``virtlet.vm.exec_channel``): QEMU listens on a unix socket
    next to the console socket; virtletd connects to it, the guest's virtlet-exec-agent serves it."""
    return dx.GuestAgentChannel(name=exec_channel.CHANNEL_NAME, path=str(exec_channel.socket_path(req.console_socket)))


def _share_memory_backing(req: DomainRequest) -> dx.MemoryBacking | None:
    """virtiofs needs the guest's RAM shared with virtiofsd (a memfd mapped by both); 9p does not."""
    if any(fs.driver == "virtiofs" for fs in req.shares):
        return dx.MemoryBacking(source="memfd", access="shared")
    return None


def _disk_name(prefix: str, index: int) -> str:
    """``vda``, ``vdb``, ... ``vdz``, ``vdaa``, ... (the kernel's and libvirt's naming) for index 0, 1, ..."""
    letters = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return prefix + letters


def _block_disks(req: DomainRequest, scsi: bool) -> list[dx.Disk]:
    """The root disk (the overlay, or the persistent root device) then the block volumes, in CRI order: raw,
    no host cache (``cache='none' io='native'``: the guest's flushes reach the device), each with its serial."""
    prefix, bus = ("sd", "scsi") if scsi else ("vd", "virtio")
    if req.root_device is not None:
        disks = [dx.Disk(source=req.root_device, type="block", format="raw", cache="none", io="native",
                         target_dev=_disk_name(prefix, 0), target_bus=bus)]
    else:
        disks = [dx.Disk(source=str(req.overlay), format="qcow2", target_dev=_disk_name(prefix, 0), target_bus=bus)]
    for vol in req.block_volumes:
        disks.append(dx.Disk(source=vol.host_path, type="block", format="raw", cache="none", io="native",
                             readonly=vol.readonly, serial=vol.serial, target_dev=_disk_name(prefix, len(disks)),
                             target_bus=bus))
    for disk in req.scratch_disks:  # a file in the emptyDir: the host page cache is fine (tmpfs has no O_DIRECT)
        disks.append(dx.Disk(source=disk.path, format="raw", serial=disk.serial,
                             target_dev=_disk_name(prefix, len(disks)), target_bus=bus))
    return disks


def _metadata_fields(req: DomainRequest) -> dict[str, str]:
    fields = {"container-id": req.container_id, "sandbox-id": req.sandbox_id, "pod-uid": req.pod_uid,
              "pod-name": req.pod_name, "pod-namespace": req.pod_namespace, "overlay": str(req.overlay),
              "console-socket": str(req.console_socket), "console-log": str(req.console_log)}
    if req.config_drive is not None:
        fields["config-drive"] = str(req.config_drive)
    if req.root_device is not None:
        fields["root-device"] = req.root_device
    for key, value in req.extra_metadata.items():
        fields.setdefault(key, value)
    return fields


def virtlet_metadata(xml: str) -> dict[str, str] | None:
    """The virtlet metadata fields of a domain's XML (as libvirt returns it), None if it is not virtlet's.

    Accepts the whole domain XML, or the element ``virDomain.metadata(ELEMENT, VIRTLET_XMLNS)`` returns
    (libvirt hands that back without its namespace).
    """
    root = ET.fromstring(xml)
    if root.tag == "domain":
        meta = root.find("metadata")
        found = dx.Metadata.from_xml(meta, VIRTLET_XMLNS) if meta is not None else None
        return dict(found.fields) if found is not None else None
    if root.tag == METADATA_ROOT:
        return {child.tag: child.text or "" for child in root}
    found = dx.Metadata.from_xml(root, VIRTLET_XMLNS)
    return dict(found.fields) if found is not None else None
