"""Designer policy, table-driven; and libvirt's own parser + RNG schema accept what it designs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from xml.etree import ElementTree as ET

import libvirt
import pytest

from virtlet.vm import designer
from virtlet.vm import domain_xml as dx
from virtlet.vm.annotations import CpuResources, parse_vm_options
from virtlet.vm.designer import DomainRequest, Nic, design_domain

CID = "5f2b6a1e-8c3d-4e7f-9a0b-1c2d3e4f5a6b"
POD_UID = "a1b2c3d4-0000-4000-8000-000000000001"


def request(annotations: dict[str, str] | None = None, memory: int = 0, cpu: CpuResources | None = None,
            **overrides: object) -> DomainRequest:
    options = parse_vm_options(annotations or {}, memory, cpu or CpuResources(), POD_UID, host_cpus=4)
    req = DomainRequest(
        container_id=CID, sandbox_id="sb1", pod_name="vm", pod_namespace="default", pod_uid=POD_UID,
        options=options, domain_type="qemu", overlay=Path("/var/lib/virtlet/overlays/c.qcow2"),
        console_socket=Path("/run/virtlet/c.sock"), console_log=Path("/var/log/virtlet/c.raw"),
        emulator="/usr/bin/qemu-system-x86_64", nics=[Nic("vt-tap0", "52:54:00:01:02:03", 1450)],
        config_drive=Path("/var/lib/virtlet/config/c.iso"))
    return dataclasses.replace(req, **overrides)


def disks(domain: dx.Domain) -> list[tuple[str, str, str, str, bool]]:
    return [(d.device, d.target_bus, d.target_dev, d.format, d.readonly) for d in domain.devices.disks]


CASES = [
    # (id, request, check)
    ("defaults", request(),
     lambda d: (d.vcpus, d.memory_bytes, d.type, d.cpu, d.cpuset) == (1, 1024**3, "qemu", None, None)),
    ("virtio root then ide cdrom last", request(),
     lambda d: disks(d) == [("disk", "virtio", "vda", "qcow2", False), ("cdrom", "ide", "hdc", "raw", True)]
     and d.devices.controllers == [dx.Controller(type="usb", model="none", index=0)]),
    ("scsi root and scsi cdrom with one virtio-scsi controller", request({"VirtletDiskDriver": "scsi"}),
     lambda d: disks(d) == [("disk", "scsi", "sda", "qcow2", False), ("cdrom", "scsi", "sdb", "raw", True)]
     and d.devices.controllers == [dx.Controller(type="usb", model="none", index=0),
                                   dx.Controller(type="scsi", model="virtio-scsi", index=0)]),
    ("no config drive", request(config_drive=None),
     lambda d: disks(d) == [("disk", "virtio", "vda", "qcow2", False)]),
    ("overlay is the root disk", request(),
     lambda d: d.devices.disks[0].source == "/var/lib/virtlet/overlays/c.qcow2"),
    ("kvm domain type", request(domain_type="kvm"), lambda d: d.type == "kvm"),
    ("vcpus and memory", request({"VirtletVCPUCount": "3"}, memory=256 * 1024**2),
     lambda d: (d.vcpus, d.memory_bytes) == (3, 256 * 1024**2)),
    ("host-model cpu", request({"VirtletCPUModel": "host-model"}),
     lambda d: d.cpu == dx.Cpu(mode="host-model")),
    ("no cputune when CRI sets nothing", request(), lambda d: d.cputune.is_empty()),
    ("cpu shares, quota and period are domain-wide",
     request(cpu=CpuResources(shares=512, quota=150000, period=50000, cpuset="1-2")),
     lambda d: d.cputune == dx.CpuTune(shares=512, global_period=50000, global_quota=150000)
     and d.cpuset == "1-2"),
    ("quota without period gets 100 ms", request(cpu=CpuResources(quota=20000)),
     lambda d: d.cputune == dx.CpuTune(global_period=100000, global_quota=20000)),
    ("uuid from annotation is domain and smbios uuid",
     request({"VirtletSystemUUID": "123e4567-e89b-12d3-a456-426614174000"}),
     lambda d: d.uuid == d.sysinfo.uuid == "123e4567-e89b-12d3-a456-426614174000" and d.os.smbios_sysinfo),
    ("derived uuid", request(), lambda d: d.uuid == d.sysinfo.uuid == request().options.system_uuid),
    ("name and title", request(), lambda d: d.name == f"virtlet-{CID}" and d.title == "default/vm (virtlet)"),
    ("nics", request(nics=[Nic("t0", "52:54:00:00:00:01"), Nic("t1", "52:54:00:00:00:02", 9000)]),
     lambda d: d.devices.interfaces == [dx.EthernetInterface("t0", "52:54:00:00:00:01"),
                                        dx.EthernetInterface("t1", "52:54:00:00:00:02", 9000)]),
    ("serial console on socket with raw log", request(),
     lambda d: d.devices.serials == [dx.UnixSerial("/run/virtlet/c.sock", "/var/log/virtlet/c.raw", True)]),
    ("guest agent channel, path left to libvirt; exec channel next to the console socket", request(),
     lambda d: d.devices.channels == [dx.GuestAgentChannel("org.qemu.guest_agent.0"),
                                      dx.GuestAgentChannel("cloud.virtlet.exec", "/run/virtlet/c.exec.sock")]),
    ("vnc on a unix socket only (no TCP port)", request(),
     lambda d: d.devices.graphics == [dx.VncGraphics(listen_type="socket", socket="")]),
    ("power policy", request(),
     lambda d: (d.on_poweroff, d.on_reboot, d.on_crash, d.features) == ("destroy", "restart", "destroy",
                                                                       ("acpi", "apic"))),
    ("machine pc booting from disk", request(),
     lambda d: (d.os.machine, d.os.boot_devices) == ("pc", ("hd",))),
]


@pytest.mark.parametrize(("req", "check"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_design(req: DomainRequest, check: Callable[[dx.Domain], bool]) -> None:
    assert check(design_domain(req))


def test_metadata_marks_the_domain_as_ours() -> None:
    xml = dx.to_string(design_domain(request(extra_metadata={"image": "virtlet.cloud/tiny", "pod-uid": "x"})))
    fields = designer.virtlet_metadata(xml)
    assert fields is not None
    assert fields["container-id"] == CID
    assert fields["sandbox-id"] == "sb1"
    assert fields["pod-uid"] == POD_UID  # extra metadata cannot override identity
    assert fields["image"] == "virtlet.cloud/tiny"
    assert fields["overlay"] == "/var/lib/virtlet/overlays/c.qcow2"
    assert fields["config-drive"] == "/var/lib/virtlet/config/c.iso"
    meta_el = ET.fromstring(xml).find("metadata")[0]
    assert designer.virtlet_metadata(ET.tostring(meta_el, encoding="unicode")) == fields
    assert designer.virtlet_metadata("<domain><name>other</name></domain>") is None


def test_domain_names() -> None:
    assert designer.domain_name(CID) == f"virtlet-{CID}"
    assert designer.container_id_of(f"virtlet-{CID}") == CID
    assert designer.container_id_of("virtlet-") is None
    assert designer.container_id_of("my-vm") is None


LIBVIRT_CASES = [request(), request({"VirtletDiskDriver": "scsi", "VirtletVCPUCount": "2",
                                     "VirtletCPUModel": "host-model"},
                                    cpu=CpuResources(shares=512, quota=20000, period=100000, cpuset="0-1")),
                 request(config_drive=None, nics=[])]


@pytest.mark.parametrize("req", LIBVIRT_CASES, ids=["defaults", "scsi-cputune", "bare"])
def test_libvirt_accepts_designed_domains(req: DomainRequest) -> None:
    """libvirt's real domain parser and its RNG schema (in-process test driver, no daemon) accept the XML."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    conn = libvirt.open("test:///default")
    try:
        dom = conn.defineXMLFlags(dx.to_string(design_domain(req)), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
        try:
            back = dx.from_string(dom.XMLDesc(0), {designer.VIRTLET_XMLNS: designer.VIRTLET_XMLNS_PREFIX})
            ours = design_domain(req)
            assert (back.name, back.uuid, back.vcpus, back.memory_bytes) == (ours.name, ours.uuid, ours.vcpus,
                                                                            ours.memory_bytes)
            assert back.devices.disks == ours.devices.disks
            assert back.metadata == ours.metadata
            element = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, designer.VIRTLET_XMLNS)
            assert designer.virtlet_metadata(element) == ours.metadata[0].fields
        finally:
            dom.undefine()
    finally:
        conn.close()
