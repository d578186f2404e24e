"""Typed objects for the subset of libvirt domain XML virtlet uses, and their XML form.

Pure data <-> XML, no decisions (those live in ``designer``) and no libvirt import, so domain XML is never
assembled from string templates and is easy to compare in tests.  Every class has ``to_xml()`` returning an
``ElementTree.Element`` and ``from_xml(element)`` reading back what ``to_xml`` writes (and what libvirt
returns for it, which adds elements these classes ignore).

The ``<devices>`` objects live in ``domain_devices`` and are re-exported here, so ``dx.Disk`` etc. work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

from virtlet.vm.domain_devices import (
    Controller,
    Devices,
    Disk,
    EthernetInterface,
    FileChannel,
    Filesystem,
    GuestAgentChannel,
    MemBalloon,
    Rng,
    UnixSerial,
    VncGraphics,
)
from virtlet.vm.xml_fields import int_of, req, sub, text_of

__all__ = [
    "DOMAIN_TYPES", "Cpu", "CpuTune", "Domain", "Metadata", "Os", "SysInfo", "from_string", "to_string",
    "Controller", "Devices", "Disk", "EthernetInterface", "Filesystem", "MemoryBacking", "GuestAgentChannel",
    "FileChannel", "MemBalloon", "Rng",
    "UnixSerial", "VncGraphics",
]

DOMAIN_TYPES = ("kvm", "qemu")


_UNIT_BYTES = {"b": 1, "bytes": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3,
               "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3}


_CPUTUNE_TAGS = ("shares", "period", "quota", "global_period", "global_quota")


@dataclass
class CpuTune:
    """``<cputune>``: per-vCPU ``period``/``quota`` and whole-domain ``global_period``/``global_quota``."""

    shares: int | None = None
    period: int | None = None
    quota: int | None = None
    global_period: int | None = None
    global_quota: int | None = None

    def is_empty(self) -> bool:
        return all(getattr(self, tag) is None for tag in _CPUTUNE_TAGS)

    def to_xml(self) -> ET.Element:
        el = ET.Element("cputune")
        for tag in _CPUTUNE_TAGS:
            value = getattr(self, tag)
            if value is not None:
                sub(el, tag, str(value))
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> CpuTune:
        return cls(**{tag: int_of(el, tag) for tag in _CPUTUNE_TAGS})


@dataclass
class MemoryBacking:
    """``<memoryBacking>``: guest RAM from a memfd, shared with other processes (virtiofsd needs it)."""

    source: str = "memfd"
    access: str = "shared"

    def to_xml(self) -> ET.Element:
        el = ET.Element("memoryBacking")
        sub(el, "source", type=self.source)
        sub(el, "access", mode=self.access)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> MemoryBacking:
        source = el.find("source")
        access = el.find("access")
        return cls(source=source.get("type", "") if source is not None else "",
                   access=access.get("mode", "") if access is not None else "")


@dataclass
class Os:
    """``<os>``: HVM guest booting from its disk; ``smbios_sysinfo`` shows ``<sysinfo>`` to the guest."""

    arch: str = "x86_64"
    machine: str | None = None
    boot_devices: tuple[str, ...] = ("hd",)
    smbios_sysinfo: bool = False

    def to_xml(self) -> ET.Element:
        el = ET.Element("os")
        attrs = {"arch": self.arch} | ({"machine": self.machine} if self.machine else {})
        sub(el, "type", "hvm", **attrs)
        for dev in self.boot_devices:
            sub(el, "boot", dev=dev)
        if self.smbios_sysinfo:
            sub(el, "smbios", mode="sysinfo")
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Os:
        typ = req(el, "type")
        smbios = el.find("smbios")
        return cls(arch=typ.get("arch", "x86_64"), machine=typ.get("machine"),
                   boot_devices=tuple(b.get("dev", "") for b in el.findall("boot")),
                   smbios_sysinfo=smbios is not None and smbios.get("mode") == "sysinfo")


@dataclass
class Cpu:
    """``<cpu mode=...>``; ``model`` only for mode ``custom``."""

    mode: str = "host-model"
    model: str | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element("cpu", mode=self.mode)
        if self.model:
            sub(el, "model", self.model)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Cpu:
        return cls(mode=el.get("mode", "custom"), model=text_of(el, "model"))


@dataclass
class SysInfo:
    """SMBIOS system entries (type 1) the guest reads from DMI; libvirt requires ``uuid`` == domain uuid."""

    uuid: str | None = None
    manufacturer: str | None = None
    product: str | None = None
    serial: str | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element("sysinfo", type="smbios")
        system = sub(el, "system")
        for name in ("manufacturer", "product", "serial", "uuid"):
            value = getattr(self, name)
            if value is not None:
                sub(system, "entry", value, name=name)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> SysInfo:
        entries = {e.get("name"): (e.text or "").strip() for e in el.findall("system/entry")}
        return cls(**{k: entries.get(k) for k in ("uuid", "manufacturer", "product", "serial")})


@dataclass
class Metadata:
    """One element in the domain's ``<metadata>``: ``<prefix:root xmlns:prefix=uri>`` with text children.

    libvirt keeps foreign-namespace metadata as-is, so it is where virtlet marks a domain as its own.
    """

    uri: str
    prefix: str
    root: str
    fields: dict[str, str] = field(default_factory=dict)

    def to_xml(self) -> ET.Element:
        el = ET.Element("metadata")
        ET.register_namespace(self.prefix, self.uri)
        own = sub(el, f"{{{self.uri}}}{self.root}")
        for key, value in self.fields.items():
            sub(own, f"{{{self.uri}}}{key}", value)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element, uri: str, prefix: str = "") -> Metadata | None:
        """The element of namespace ``uri`` inside ``<metadata>`` (or that element itself), None if absent."""
        own = el if el.tag.startswith(f"{{{uri}}}") else next(
            (child for child in el if child.tag.startswith(f"{{{uri}}}")), None)
        if own is None:
            return None
        cut = len(uri) + 2
        return cls(uri=uri, prefix=prefix, root=own.tag[cut:],
                   fields={child.tag[cut:]: (child.text or "") for child in own
                           if child.tag.startswith(f"{{{uri}}}")})


@dataclass
class Domain:
    """``<domain>``: what virtlet defines in libvirt for one VM container."""

    name: str
    uuid: str
    memory_bytes: int
    vcpus: int  # the vCPUs the VM has (libvirt's ``current``)
    devices: Devices
    type: str = "qemu"
    title: str | None = None
    cpuset: str | None = None
    cputune: CpuTune = field(default_factory=CpuTune)
    os: Os = field(default_factory=Os)
    features: tuple[str, ...] = ("acpi", "apic")
    cpu: Cpu | None = None
    clock_offset: str = "utc"
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    sysinfo: SysInfo | None = None
    metadata: list[Metadata] = field(default_factory=list)
    memory_backing: MemoryBacking | None = None
    max_vcpus: int | None = None  # hot-plug room: ``<vcpu current="vcpus">max_vcpus</vcpu>`` when larger

    def to_xml(self) -> ET.Element:
        if self.type not in DOMAIN_TYPES:
            raise ValueError(f"domain type {self.type!r} is not one of {DOMAIN_TYPES}")
        el = ET.Element("domain", type=self.type)
        sub(el, "name", self.name)
        sub(el, "uuid", self.uuid)
        if self.title:
            sub(el, "title", self.title)
        if self.metadata:
            meta = sub(el, "metadata")
            for item in self.metadata:
                meta.extend(list(item.to_xml()))
        sub(el, "memory", str(-(-self.memory_bytes // 1024)), unit="KiB")
        if self.memory_backing:
            el.append(self.memory_backing.to_xml())
        cpuset = {"cpuset": self.cpuset} if self.cpuset else {}
        grow = {"current": str(self.vcpus)} if self.max_vcpus and self.max_vcpus > self.vcpus else {}
        sub(el, "vcpu", str(max(self.vcpus, self.max_vcpus or 0)), placement="static", **cpuset, **grow)
        if not self.cputune.is_empty():
            el.append(self.cputune.to_xml())
        if self.sysinfo:
            el.append(self.sysinfo.to_xml())
        el.append(self.os.to_xml())
        features = sub(el, "features")
        for name in self.features:
            sub(features, name)
        if self.cpu:
            el.append(self.cpu.to_xml())
        sub(el, "clock", offset=self.clock_offset)
        sub(el, "on_poweroff", self.on_poweroff)
        sub(el, "on_reboot", self.on_reboot)
        sub(el, "on_crash", self.on_crash)
        el.append(self.devices.to_xml())
        return el

    @classmethod
    def from_xml(cls, el: ET.Element, metadata_uris: Mapping[str, str] | None = None) -> Domain:
        """Read a domain; ``metadata_uris`` (uri -> prefix) selects the ``<metadata>`` elements to keep."""
        vcpu = req(el, "vcpu")
        memory = req(el, "memory")
        unit = memory.get("unit", "KiB").lower()
        if unit not in _UNIT_BYTES:
            raise ValueError(f"unknown memory unit {unit!r}")
        meta_el = el.find("metadata")
        metadata = []
        for uri, prefix in (metadata_uris or {}).items():
            found = Metadata.from_xml(meta_el, uri, prefix) if meta_el is not None else None
            if found is not None:
                metadata.append(found)
        cputune = el.find("cputune")
        cpu = el.find("cpu")
        sysinfo = el.find("sysinfo")
        features = el.find("features")
        clock = el.find("clock")
        backing = el.find("memoryBacking")
        return cls(
            name=text_of(el, "name") or "", uuid=text_of(el, "uuid") or "",
            memory_bytes=int((memory.text or "0").strip()) * _UNIT_BYTES[unit],
            vcpus=int(vcpu.get("current") or (vcpu.text or "0").strip()),
            max_vcpus=int((vcpu.text or "0").strip()) if vcpu.get("current") else None,
            devices=Devices.from_xml(req(el, "devices")),
            type=el.get("type", ""), title=text_of(el, "title"), cpuset=vcpu.get("cpuset"),
            cputune=CpuTune.from_xml(cputune) if cputune is not None else CpuTune(),
            os=Os.from_xml(req(el, "os")),
            features=tuple(f.tag for f in features) if features is not None else (),
            cpu=Cpu.from_xml(cpu) if cpu is not None else None,
            clock_offset=clock.get("offset", "utc") if clock is not None else "utc",
            on_poweroff=text_of(el, "on_poweroff") or "destroy", on_reboot=text_of(el, "on_reboot") or "restart",
            on_crash=text_of(el, "on_crash") or "destroy",
            sysinfo=SysInfo.from_xml(sysinfo) if sysinfo is not None else None,
            metadata=metadata,
            memory_backing=MemoryBacking.from_xml(backing) if backing is not None else None,
        )


def to_string(domain: Domain) -> str:
    """The domain's XML text, ready for ``virConnect.defineXML``."""
    el = domain.to_xml()
    ET.indent(el)
    return ET.tostring(el, encoding="unicode")


def from_string(xml: str, metadata_uris: Mapping[str, str] | None = None) -> Domain:
    """Parse domain XML (ours, or libvirt's ``XMLDesc`` of it); raises ``ValueError`` on malformed input."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ValueError(f"domain XML does not parse: {exc}") from exc
    if root.tag != "domain":
        raise ValueError(f"expected <domain>, got <{root.tag}>")
    return Domain.from_xml(root, metadata_uris)
