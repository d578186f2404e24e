"""Typed objects for the ``<devices>`` of the libvirt domain XML virtlet uses: disks, shared directories,
controllers, the
network interface, the serial console, the guest agent channel, VNC, balloon, RNG.

Pure data <-> XML like ``domain_xml`` (which holds the domain itself and re-exports these classes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from xml.etree import ElementTree as ET

from virtlet.vm.xml_fields import req, sub, text_of

DISK_FORMATS = ("qcow2", "raw")
DISK_BUSES = ("virtio", "scsi", "sata", "ide")


@dataclass
class Disk:
    """A ``<disk>``: a file-backed qcow2/raw disk or read-only CD-ROM (``type`` ``file``), or a host block device
    (``type`` ``block``: ``source`` is the device node, raw, usually ``cache='none' io='native'``)."""

    source: str
    target_dev: str
    target_bus: str = "virtio"
    format: str = "qcow2"
    device: str = "disk"  # "disk" | "cdrom"
    readonly: bool = False
    serial: str | None = None
    type: str = "file"  # "file" | "block"
    cache: str | None = None
    io: str | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element("disk", type=self.type, device=self.device)
        driver = {"name": "qemu", "type": self.format} | ({"cache": self.cache} if self.cache else {}) | (
            {"io": self.io} if self.io else {})
        sub(el, "driver", **driver)
        if self.type == "block":
            sub(el, "source", dev=self.source)
        else:
            sub(el, "source", file=self.source)
        sub(el, "target", dev=self.target_dev, bus=self.target_bus)
        if self.readonly:
            sub(el, "readonly")
        if self.serial:
            sub(el, "serial", self.serial)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Disk:
        target = req(el, "target")
        driver = el.find("driver")
        kind = el.get("type", "file")
        source = req(el, "source").get("dev" if kind == "block" else "file", "")
        return cls(source=source, target_dev=target.get("dev", ""),
                   target_bus=target.get("bus", ""),
                   format=driver.get("type", "raw") if driver is not None else "raw",
                   device=el.get("device", "disk"), readonly=el.find("readonly") is not None,
                   serial=text_of(el, "serial"), type=kind,
                   cache=driver.get("cache") if driver is not None else None,
                   io=driver.get("io") if driver is not None else None)


@dataclass
class Filesystem:
    """A host directory shared into the guest: ``<filesystem type='mount'>`` with virtiofs (``driver`` virtiofs,
    libvirt starts one virtiofsd per share; needs a shared memory backing) or 9p (``driver`` path, served by
    QEMU itself).  ``target`` is the tag the guest mounts."""

    source: str
    target: str
    driver: str = "virtiofs"  # "virtiofs" | "path" (9p)
    accessmode: str = "passthrough"  # "passthrough" | "mapped" | "squash"
    readonly: bool = False
    binary: str | None = None  # virtiofsd path when libvirt would not find it

    def to_xml(self) -> ET.Element:
        el = ET.Element("filesystem", type="mount", accessmode=self.accessmode)
        sub(el, "driver", type=self.driver)
        if self.binary and self.driver == "virtiofs":
            sub(el, "binary", path=self.binary)
        sub(el, "source", dir=self.source)
        sub(el, "target", dir=self.target)
        if self.readonly:
            sub(el, "readonly")
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Filesystem:
        driver = el.find("driver")
        binary = el.find("binary")
        return cls(source=req(el, "source").get("dir", ""), target=req(el, "target").get("dir", ""),
                   driver=driver.get("type", "path") if driver is not None else "path",
                   accessmode=el.get("accessmode", "passthrough"), readonly=el.find("readonly") is not None,
                   binary=binary.get("path") if binary is not None else None)


@dataclass
class Controller:
    """``<controller>``: the virtio-scsi one for ``VirtletDiskDriver: scsi``, and USB switched off (``model='none'``,
    see ``designer.NO_USB``)."""

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
        sub(el, "mac", address=self.mac)
        sub(el, "target", dev=self.target_dev, managed="no")
        sub(el, "model", type=self.model)
        if self.mtu:
            sub(el, "mtu", size=str(self.mtu))
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> EthernetInterface:
        mtu = el.find("mtu")
        model = el.find("model")
        return cls(target_dev=req(el, "target").get("dev", ""), mac=req(el, "mac").get("address", ""),
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
        sub(el, "source", mode="bind", path=self.path)
        if self.log_file:
            sub(el, "log", file=self.log_file, append="on" if self.log_append else "off")
        return el

    def to_xml(self) -> ET.Element:
        el = self._chardev("serial")
        sub(el, "target", port=str(self.port))
        return el

    def console_xml(self) -> ET.Element:
        el = self._chardev("console")
        sub(el, "target", type="serial", port=str(self.port))
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> UnixSerial:
        log = el.find("log")
        target = el.find("target")
        return cls(path=req(el, "source").get("path", ""),
                   log_file=log.get("file") if log is not None else None,
                   log_append=log is None or log.get("append", "off") == "on",
                   port=int(target.get("port", "0")) if target is not None else 0)


GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass
class GuestAgentChannel:
    """The virtio-serial port the QEMU guest agent listens on, named ``org.qemu.guest_agent.0``.

    The host side is a unix socket whose path libvirt picks (no ``path``): libvirt itself connects to it and
    relays ``virDomainQemuAgentCommand``, so virtletd never opens the socket and needs no name for it.
    Other virtio-serial ports (the exec channel, ``virtlet.vm.exec_channel``) name their socket ``path``.
    """

    name: str = GUEST_AGENT_CHANNEL
    path: str | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element("channel", type="unix")
        sub(el, "source", mode="bind", **({"path": self.path} if self.path else {}))
        sub(el, "target", type="virtio", name=self.name)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> GuestAgentChannel:
        name = req(el, "target").get("name", "")
        source = el.find("source")
        # the agent's socket path is libvirt's choice (it shows in the live XML): never pinned by a round trip
        path = source.get("path") if source is not None and name != GUEST_AGENT_CHANNEL else None
        return cls(name=name, path=path or None)


@dataclass
class FileChannel:
    """A virtio-serial port named ``name`` whose output the host appends to the file ``path`` (libvirt opens it,
    or virtlogd does): a one-way channel from the guest, e.g. its exit code (``virtlet.vm.guest_exit``)."""

    path: str
    name: str

    def to_xml(self) -> ET.Element:
        el = ET.Element("channel", type="file")
        sub(el, "source", path=self.path)
        sub(el, "target", type="virtio", name=self.name)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> FileChannel:
        return cls(path=req(el, "source").get("path", ""), name=req(el, "target").get("name", ""))


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
            sub(el, "listen", type="socket", **({"socket": self.socket} if self.socket else {}))
            return el
        el = ET.Element("graphics", type="vnc", autoport="yes" if self.autoport else "no", listen=self.address)
        sub(el, "listen", type="address", address=self.address)
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> VncGraphics:
        listen = el.find("listen")
        if listen is not None and listen.get("type") == "socket":
            return cls(listen_type="socket", socket=listen.get("socket", ""))
        address = el.get("listen") or (listen.get("address") or "" if listen is not None else "")
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
        sub(el, "backend", self.backend, model="random")
        return el

    @classmethod
    def from_xml(cls, el: ET.Element) -> Rng:
        return cls(backend=text_of(el, "backend") or "", model=el.get("model", ""))


@dataclass
class Devices:
    emulator: str
    disks: list[Disk] = field(default_factory=list)
    filesystems: list[Filesystem] = field(default_factory=list)
    controllers: list[Controller] = field(default_factory=list)
    interfaces: list[EthernetInterface] = field(default_factory=list)
    serials: list[UnixSerial] = field(default_factory=list)
    channels: list[GuestAgentChannel] = field(default_factory=list)
    graphics: list[VncGraphics] = field(default_factory=list)
    file_channels: list[FileChannel] = field(default_factory=list)
    memballoon: MemBalloon | None = None
    rng: Rng | None = None

    def to_xml(self) -> ET.Element:
        el = ET.Element("devices")
        sub(el, "emulator", self.emulator)
        devices: list[Disk | Filesystem | Controller | EthernetInterface | UnixSerial] = [
            *self.disks, *self.filesystems, *self.controllers, *self.interfaces, *self.serials]
        for item in devices:
            el.append(item.to_xml())
        if self.serials:
            el.append(self.serials[0].console_xml())
        more: list[GuestAgentChannel | VncGraphics | FileChannel] = [*self.channels, *self.graphics,
                                                                     *self.file_channels]
        for extra in more:
            el.append(extra.to_xml())
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
            emulator=text_of(el, "emulator") or "",
            filesystems=[Filesystem.from_xml(f) for f in el.findall("filesystem") if f.get("type") == "mount"],
            disks=[Disk.from_xml(d) for d in el.findall("disk") if d.get("type") in ("file", "block")],
            controllers=[Controller.from_xml(c) for c in el.findall("controller")
                         if c.get("type") == "scsi" or (c.get("type"), c.get("model")) == ("usb", "none")],
            interfaces=[EthernetInterface.from_xml(i) for i in el.findall("interface")
                        if i.get("type") == "ethernet"],
            serials=[UnixSerial.from_xml(s) for s in el.findall("serial") if s.get("type") == "unix"],
            channels=[GuestAgentChannel.from_xml(c) for c in el.findall("channel")
                      if c.get("type") == "unix" and c.find("target[@type='virtio']") is not None],
            graphics=[VncGraphics.from_xml(g) for g in el.findall("graphics") if g.get("type") == "vnc"],
            file_channels=[FileChannel.from_xml(c) for c in el.findall("channel")
                           if c.get("type") == "file" and c.find("target[@type='virtio']") is not None],
            memballoon=MemBalloon.from_xml(balloon) if balloon is not None else None,
            rng=Rng.from_xml(rng) if rng is not None else None,
        )
