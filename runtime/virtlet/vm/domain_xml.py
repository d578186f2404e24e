"""Typed objects for the subset of libvirt domain XML virtlet uses, and their XML form.

Pure data <-> XML, no decisions (those live in ``designer``) and no libvirt import, so domain XML is never
assembled from string templates and is easy to compare in tests.  Every class has ``to_xml()`` returning an
``ElementTree.Element`` and ``from_xml(element)`` reading back what ``to_xml`` writes (and what libvirt
returns for it, which adds elements these classes ignore).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

DOMAIN_TYPES = ("kvm", "qemu")
DISK_FORMATS = ("qcow2", "raw")
DISK_BUSES = ("virtio", "scsi", "sata", "ide")


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    el = ET.SubElement(parent, tag, attrs)
    if text is not None:
        el.text = text
    return el


def _req(parent: ET.Element, path: str) -> ET.Element:
    el = parent.find(path)
    if el is None:
        raise ValueError(f"<{parent.tag}> has no <{path}>")
    return el


def _text(parent: ET.Element, path: str) -> str | None:
    el = parent.find(path)
    return None if el is None or el.text is None else el.text.strip()


def _int(parent: ET.Element, path: str) -> int | None:
    value = _text(parent, path)
    return None if value is None else int(value)


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
                _sub(el, tag, str(value))
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> CpuTune:
        return cls(**{tag: _int(el, tag) for tag in _CPUTUNE_TAGS})


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
        _sub(el, "type", "hvm", **attrs)
        for dev in self.boot_devices:
            _sub(el, "boot", dev=dev)
        if self.smbios_sysinfo:
            _sub(el, "smbios", mode="sysinfo")
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Os:
        typ = _req(el, "type")
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
            _sub(el, "model", self.model)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Cpu:
        return cls(mode=el.get("mode", "custom"), model=_text(el, "model"))


@dataclass
class SysInfo:
    """SMBIOS system entries (type 1) the guest reads from DMI; libvirt requires ``uuid`` == domain uuid."""

    uuid: str | None = None
    manufacturer: str | None = None
    product: str | None = None
    serial: str | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element("sysinfo", type="smbios")
        system = _sub(el, "system")
        for name in ("manufacturer", "product", "serial", "uuid"):
            value = getattr(self, name)
            if value is not None:
                _sub(system, "entry", value, name=name)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> SysInfo:
        entries = {e.get("name"): (e.text or "").strip() for e in el.findall("system/entry")}
        return cls(**{k: entries.get(k) for k in ("uuid", "manufacturer", "product", "serial")})


@dataclass
class Disk:
    """A file-backed ``<disk>``: a qcow2/raw disk or a read-only CD-ROM."""

    source: str
    target_dev: str
    target_bus: str = "virtio"
    format: str = "qcow2"
    device: str = "disk"  # "disk" | "cdrom"
    readonly: bool = False
    serial: str | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element("disk", type="file", device=self.device)
        _sub(el, "driver", name="qemu", type=self.format)
        _sub(el, "source", file=self.source)
        _sub(el, "target", dev=self.target_dev, bus=self.target_bus)
        if self.readonly:
            _sub(el, "readonly")
        if self.serial:
            _sub(el, "serial", self.serial)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Disk:
        target = _req(el, "target")
        driver = el.find("driver")
        return cls(source=_req(el, "source").get("file", ""), target_dev=target.get("dev", ""),
                   target_bus=target.get("bus", ""),
                   format=driver.get("type", "raw") if driver is not None else "raw",
                   device=el.get("device", "disk"), readonly=el.find("readonly") is not None,
                   serial=_text(el, "serial"))


@dataclass
class Controller:
    """``<controller>``; virtlet only needs the virtio-scsi one for ``VirtletDiskDriver: scsi``."""

    type: str = "scsi"
    model: str | None = "virtio-scsi"
    index: int = 0

    def to_xml(self) -> ET.Element:
        attrs = {"type": self.type, "index": str(self.index)} | ({"model": self.model} if self.model else {})
        return ET.Element("controller", attrs)

    @classmethod
    def from_xml(cls, el: ET.Element) -> Controller:
        return cls(type=el.get("type", ""), model=el.get("model"), index=int(el.get("index", "0")))


@dataclass
class EthernetInterface:
    """``<interface type='ethernet'>`` on a tap virtlet made (``managed='no'``: libvirt leaves it alone)."""

    target_dev: str
    mac: str
    mtu: int | None = None
    model: str = "virtio"

    def to_xml(self) -> ET.Element:
        el = ET.Element("interface", type="ethernet")
        _sub(el, "mac", address=self.mac)
        _sub(el, "target", dev=self.target_dev, managed="no")
        _sub(el, "model", type=self.model)
        if self.mtu:
            _sub(el, "mtu", size=str(self.mtu))
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> EthernetInterface:
        mtu = el.find("mtu")
        model = el.find("model")
        return cls(target_dev=_req(el, "target").get("dev", ""), mac=_req(el, "mac").get("address", ""),
                   mtu=int(mtu.get("size", "0")) if mtu is not None else None,
                   model=model.get("type", "") if model is not None else "")


@dataclass
class UnixSerial:
    """Serial port 0 on a listening unix socket, its output also appended to ``log_file`` (by virtlogd).

    ``to_xml`` returns the ``<serial>``; ``console_xml`` the matching ``<console>`` (target type serial).
    """

    path: str
    log_file: str | None = None
    log_append: bool = True
    port: int = 0

    def _chardev(self, tag: str) -> ET.Element:
        el = ET.Element(tag, type="unix")
        _sub(el, "source", mode="bind", path=self.path)
        if self.log_file:
            _sub(el, "log", file=self.log_file, append="on" if self.log_append else "off")
        return el

    def to_xml(self) -> ET.Element:
        el = self._chardev("serial")
        _sub(el, "target", port=str(self.port))
        return el

    def console_xml(self) -> ET.Element:
        el = self._chardev("console")
        _sub(el, "target", type="serial", port=str(self.port))
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> UnixSerial:
        log = el.find("log")
        target = el.find("target")
        return cls(path=_req(el, "source").get("path", ""),
                   log_file=log.get("file") if log is not None else None,
                   log_append=log is None or log.get("append", "off") == "on",
                   port=int(target.get("port", "0")) if target is not None else 0)


GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass
class GuestAgentChannel:
    """The virtio-serial port the QEMU guest agent listens on, named ``org.qemu.guest_agent.0``.

    The host side is a unix socket whose path libvirt picks (no ``path``): libvirt itself connects to it and
    relays ``virDomainQemuAgentCommand``, so virtletd never opens the socket and needs no name for it.
    """

    name: str = GUEST_AGENT_CHANNEL

    def to_xml(self) -> ET.Element:
        el = ET.Element("channel", type="unix")
        _sub(el, "source", mode="bind")
        _sub(el, "target", type="virtio", name=self.name)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> GuestAgentChannel:
        return cls(name=_req(el, "target").get("name", ""))


@dataclass
class VncGraphics:
    """VNC display.  ``listen_type`` ``socket`` (what virtletd asks for): a unix socket; with no ``socket`` path
    libvirt puts it in the domain's private directory (``/var/lib/libvirt/qemu/domain-N-<name>/vnc.sock``,
    reachable by root and QEMU's user only) and reports the path in the live XML.  ``address``: a TCP listen
    address (domains defined by older versions: VNC has no real authentication, any local process could
    connect)."""

    listen_type: str = "socket"
    socket: str = ""
    address: str = ""
    autoport: bool = False

    def to_xml(self) -> ET.Element:
        if self.listen_type == "socket":
            el = ET.Element("graphics", type="vnc")
            _sub(el, "listen", type="socket", **({"socket": self.socket} if self.socket else {}))
            return el
        el = ET.Element("graphics", type="vnc", autoport="yes" if self.autoport else "no", listen=self.address)
        _sub(el, "listen", type="address", address=self.address)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> VncGraphics:
        listen = el.find("listen")
        if listen is not None and listen.get("type") == "socket":
            return cls(listen_type="socket", socket=listen.get("socket", ""))
        address = el.get("listen") or (listen.get("address", "") if listen is not None else "")
        return cls(listen_type="address", address=address, autoport=el.get("autoport") == "yes")


@dataclass
class MemBalloon:
    model: str = "virtio"

    def to_xml(self) -> ET.Element:
        return ET.Element("memballoon", model=self.model)

    @classmethod
    def from_xml(cls, el: ET.Element) -> MemBalloon:
        return cls(model=el.get("model", ""))


@dataclass
class Rng:
    """virtio-rng fed from the host's ``/dev/urandom``, so guests do not stall waiting for entropy."""

    backend: str = "/dev/urandom"
    model: str = "virtio"

    def to_xml(self) -> ET.Element:
        el = ET.Element("rng", model=self.model)
        _sub(el, "backend", self.backend, model="random")
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Rng:
        return cls(backend=_text(el, "backend") or "", model=el.get("model", ""))


@dataclass
class Devices:
    emulator: str
    disks: list[Disk] = field(default_factory=list)
    controllers: list[Controller] = field(default_factory=list)
    interfaces: list[EthernetInterface] = field(default_factory=list)
    serials: list[UnixSerial] = field(default_factory=list)
    channels: list[GuestAgentChannel] = field(default_factory=list)
    graphics: list[VncGraphics] = field(default_factory=list)
    memballoon: MemBalloon | None = None
    rng: Rng | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element("devices")
        _sub(el, "emulator", self.emulator)
        for item in [*self.disks, *self.controllers, *self.interfaces, *self.serials]:
            el.append(item.to_xml())
        if self.serials:
            el.append(self.serials[0].console_xml())
        for item in [*self.channels, *self.graphics]:
            el.append(item.to_xml())
        if self.memballoon:
            el.append(self.memballoon.to_xml())
        if self.rng:
            el.append(self.rng.to_xml())
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Devices:
        balloon = el.find("memballoon")
        rng = el.find("rng")
        return cls(
            emulator=_text(el, "emulator") or "",
            disks=[Disk.from_xml(d) for d in el.findall("disk") if d.get("type") == "file"],
            controllers=[Controller.from_xml(c) for c in el.findall("controller") if c.get("type") == "scsi"],
            interfaces=[EthernetInterface.from_xml(i) for i in el.findall("interface")
                        if i.get("type") == "ethernet"],
            serials=[UnixSerial.from_xml(s) for s in el.findall("serial") if s.get("type") == "unix"],
            channels=[GuestAgentChannel.from_xml(c) for c in el.findall("channel")
                      if c.get("type") == "unix" and c.find("target[@type='virtio']") is not None],
            graphics=[VncGraphics.from_xml(g) for g in el.findall("graphics") if g.get("type") == "vnc"],
            memballoon=MemBalloon.from_xml(balloon) if balloon is not None else None,
            rng=Rng.from_xml(rng) if rng is not None else None,
        )


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
        own = _sub(el, f"{{{self.uri}}}{self.root}")
        for key, value in self.fields.items():
            _sub(own, f"{{{self.uri}}}{key}", value)
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
    vcpus: int
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

    def to_xml(self) -> ET.Element:
        if self.type not in DOMAIN_TYPES:
            raise ValueError(f"domain type {self.type!r} is not one of {DOMAIN_TYPES}")
        el = ET.Element("domain", type=self.type)
        _sub(el, "name", self.name)
        _sub(el, "uuid", self.uuid)
        if self.title:
            _sub(el, "title", self.title)
        if self.metadata:
            meta = _sub(el, "metadata")
            for item in self.metadata:
                meta.extend(list(item.to_xml()))
        _sub(el, "memory", str(-(-self.memory_bytes // 1024)), unit="KiB")
        cpuset = {"cpuset": self.cpuset} if self.cpuset else {}
        _sub(el, "vcpu", str(self.vcpus), placement="static", **cpuset)
        if not self.cputune.is_empty():
            el.append(self.cputune.to_xml())
        if self.sysinfo:
            el.append(self.sysinfo.to_xml())
        el.append(self.os.to_xml())
        features = _sub(el, "features")
        for name in self.features:
            _sub(features, name)
        if self.cpu:
            el.append(self.cpu.to_xml())
        _sub(el, "clock", offset=self.clock_offset)
        _sub(el, "on_poweroff", self.on_poweroff)
        _sub(el, "on_reboot", self.on_reboot)
        _sub(el, "on_crash", self.on_crash)
        el.append(self.devices.to_xml())
        return el

    @classmethod
    def from_xml(cls, el: ET.Element, metadata_uris: Mapping[str, str] | None = None) -> Domain:
        """Read a domain; ``metadata_uris`` (uri -> prefix) selects the ``<metadata>`` elements to keep."""
        vcpu = _req(el, "vcpu")
        memory = _req(el, "memory")
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
        return cls(
            name=_text(el, "name") or "", uuid=_text(el, "uuid") or "",
            memory_bytes=int((memory.text or "0").strip()) * _UNIT_BYTES[unit],
            vcpus=int((vcpu.text or "0").strip()), devices=Devices.from_xml(_req(el, "devices")),
            type=el.get("type", ""), title=_text(el, "title"), cpuset=vcpu.get("cpuset"),
            cputune=CpuTune.from_xml(cputune) if cputune is not None else CpuTune(),
            os=Os.from_xml(_req(el, "os")),
            features=tuple(f.tag for f in features) if features is not None else (),
            cpu=Cpu.from_xml(cpu) if cpu is not None else None,
            clock_offset=clock.get("offset", "utc") if clock is not None else "utc",
            on_poweroff=_text(el, "on_poweroff") or "destroy", on_reboot=_text(el, "on_reboot") or "restart",
            on_crash=_text(el, "on_crash") or "destroy",
            sysinfo=SysInfo.from_xml(sysinfo) if sysinfo is not None else None,
            metadata=metadata,
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
