"""Domain XML objects: each element's XML compared structurally (canonical form), and full round trips."""

from __future__ import annotations

from xml.etree import ElementTree as ET

import pytest

from virtlet.vm import domain_xml as dx

NS = "https://example.test/virtlet-test"


def canon(xml: str | ET.Element) -> str:
    """Canonical XML (C14N 2.0) without whitespace-only text: attribute order and indentation do not count."""
    text = xml if isinstance(xml, str) else ET.tostring(xml, encoding="unicode")
    return ET.canonicalize(xml_data=text, strip_text=True)


def assert_xml(actual: ET.Element | str, expected: str) -> None:
    assert canon(actual) == canon(expected)


@pytest.mark.parametrize(("obj", "expected"), [
    (dx.CpuTune(shares=512, global_period=100000, global_quota=50000),
     "<cputune><shares>512</shares><global_period>100000</global_period>"
     "<global_quota>50000</global_quota></cputune>"),
    (dx.CpuTune(period=1000, quota=2000), "<cputune><period>1000</period><quota>2000</quota></cputune>"),
    (dx.Os(machine="pc", smbios_sysinfo=True),
     "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/><smbios mode='sysinfo'/></os>"),
    (dx.Os(), "<os><type arch='x86_64'>hvm</type><boot dev='hd'/></os>"),
    (dx.Cpu(mode="host-model"), "<cpu mode='host-model'/>"),
    (dx.Cpu(mode="custom", model="qemu64"), "<cpu mode='custom'><model>qemu64</model></cpu>"),
    (dx.SysInfo(uuid="u", manufacturer="m", product="p", serial="s"),
     "<sysinfo type='smbios'><system><entry name='manufacturer'>m</entry><entry name='product'>p</entry>"
     "<entry name='serial'>s</entry><entry name='uuid'>u</entry></system></sysinfo>"),
    (dx.Disk(source="/o.qcow2", target_dev="vda"),
     "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/o.qcow2'/>"
     "<target dev='vda' bus='virtio'/></disk>"),
    (dx.Disk(source="/c.iso", target_dev="hdc", target_bus="ide", format="raw", device="cdrom",
             readonly=True),
     "<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/c.iso'/>"
     "<target dev='hdc' bus='ide'/><readonly/></disk>"),
    (dx.Disk(source="/d", target_dev="sda", target_bus="scsi", serial="abc"),
     "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/d'/>"
     "<target dev='sda' bus='scsi'/><serial>abc</serial></disk>"),
    (dx.Controller(), "<controller type='scsi' index='0' model='virtio-scsi'/>"),
    (dx.EthernetInterface(target_dev="tap0", mac="52:54:00:12:34:56", mtu=1450),
     "<interface type='ethernet'><mac address='52:54:00:12:34:56'/><target dev='tap0' managed='no'/>"
     "<model type='virtio'/><mtu size='1450'/></interface>"),
    (dx.EthernetInterface(target_dev="tap1", mac="52:54:00:00:00:01"),
     "<interface type='ethernet'><mac address='52:54:00:00:00:01'/><target dev='tap1' managed='no'/>"
     "<model type='virtio'/></interface>"),
    (dx.UnixSerial(path="/run/c.sock", log_file="/var/log/c.log"),
     "<serial type='unix'><source mode='bind' path='/run/c.sock'/><log file='/var/log/c.log' append='on'/>"
     "<target port='0'/></serial>"),
    (dx.UnixSerial(path="/s"),
     "<serial type='unix'><source mode='bind' path='/s'/><target port='0'/></serial>"),
    (dx.VncGraphics(), "<graphics type='vnc'><listen type='socket'/></graphics>"),
    (dx.VncGraphics(socket="/v.sock"), "<graphics type='vnc'><listen type='socket' socket='/v.sock'/></graphics>"),
    (dx.VncGraphics("address", address="127.0.0.1", autoport=True),
     "<graphics type='vnc' autoport='yes' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/>"
     "</graphics>"),
    (dx.MemBalloon(), "<memballoon model='virtio'/>"),
    (dx.Rng(), "<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"),
])
def test_element_xml(obj: object, expected: str) -> None:
    assert_xml(obj.to_xml(), expected)  # type: ignore[attr-defined]
    assert type(obj).from_xml(obj.to_xml()) == obj  # type: ignore[attr-defined]


def test_console_follows_serial() -> None:
    serial = dx.UnixSerial(path="/s", log_file="/l")
    assert_xml(serial.console_xml(), "<console type='unix'><source mode='bind' path='/s'/>"
                                     "<log file='/l' append='on'/><target type='serial' port='0'/></console>")


def full_domain() -> dx.Domain:
    return dx.Domain(
        type="qemu", name="virtlet-abc", uuid="123e4567-e89b-12d3-a456-426614174000",
        title="ns/pod (virtlet)",
        memory_bytes=512 * 1024**2, vcpus=2, cpuset="0-1",
        cputune=dx.CpuTune(shares=1024, global_period=100000, global_quota=150000),
        os=dx.Os(machine="pc", smbios_sysinfo=True), cpu=dx.Cpu(mode="host-model"),
        sysinfo=dx.SysInfo(uuid="123e4567-e89b-12d3-a456-426614174000", product="virtlet VM"),
        devices=dx.Devices(
            emulator="/usr/bin/qemu-system-x86_64",
            disks=[dx.Disk(source="/o.qcow2", target_dev="sda", target_bus="scsi"),
                   dx.Disk(source="/c.iso", target_dev="sdb", target_bus="scsi", format="raw", device="cdrom",
                           readonly=True)],
            controllers=[dx.Controller()],
            interfaces=[dx.EthernetInterface(target_dev="tap0", mac="52:54:00:12:34:56", mtu=1500)],
            serials=[dx.UnixSerial(path="/run/c.sock", log_file="/log/c.raw")],
            channels=[dx.GuestAgentChannel()],
            graphics=[dx.VncGraphics()], memballoon=dx.MemBalloon(), rng=dx.Rng()),
        metadata=[dx.Metadata(uri=NS, prefix="vt", root="container",
                              fields={"container-id": "abc", "pod": "p"})],
    )


def test_domain_xml_structure() -> None:
    expected = f"""
    <domain type='qemu'>
      <name>virtlet-abc</name>
      <uuid>123e4567-e89b-12d3-a456-426614174000</uuid>
      <title>ns/pod (virtlet)</title>
      <metadata><vt:container xmlns:vt='{NS}'><vt:container-id>abc</vt:container-id><vt:pod>p</vt:pod>
        </vt:container></metadata>
      <memory unit='KiB'>524288</memory>
      <vcpu placement='static' cpuset='0-1'>2</vcpu>
      <cputune><shares>1024</shares><global_period>100000</global_period><global_quota>150000</global_quota>
      </cputune>
      <sysinfo type='smbios'><system><entry name='product'>virtlet VM</entry>
        <entry name='uuid'>123e4567-e89b-12d3-a456-426614174000</entry></system></sysinfo>
      <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/><smbios mode='sysinfo'/></os>
      <features><acpi/><apic/></features>
      <cpu mode='host-model'/>
      <clock offset='utc'/>
      <on_poweroff>destroy</on_poweroff>
      <on_reboot>restart</on_reboot>
      <on_crash>destroy</on_crash>
      <devices>
        <emulator>/usr/bin/qemu-system-x86_64</emulator>
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/o.qcow2'/>
          <target dev='sda' bus='scsi'/></disk>
        <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/c.iso'/>
          <target dev='sdb' bus='scsi'/><readonly/></disk>
        <controller type='scsi' index='0' model='virtio-scsi'/>
        <interface type='ethernet'><mac address='52:54:00:12:34:56'/><target dev='tap0' managed='no'/>
          <model type='virtio'/><mtu size='1500'/></interface>
        <serial type='unix'><source mode='bind' path='/run/c.sock'/><log file='/log/c.raw' append='on'/>
          <target port='0'/></serial>
        <console type='unix'><source mode='bind' path='/run/c.sock'/><log file='/log/c.raw' append='on'/>
          <target type='serial' port='0'/></console>
        <channel type='unix'><source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
        <graphics type='vnc'><listen type='socket'/></graphics>
        <memballoon model='virtio'/>
        <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
      </devices>
    </domain>"""
    assert_xml(dx.to_string(full_domain()), expected)


def test_round_trip() -> None:
    domain = full_domain()
    assert dx.from_string(dx.to_string(domain), {NS: "vt"}) == domain


def test_minimal_domain_omits_optional_parts() -> None:
    domain = dx.Domain(name="d", uuid="u", memory_bytes=1000, vcpus=1, devices=dx.Devices(emulator="/q"))
    root = ET.fromstring(dx.to_string(domain))
    for tag in ("title", "metadata", "cputune", "sysinfo", "cpu"):
        assert root.find(tag) is None, tag
    assert root.find("memory").text == "1"  # rounded up to whole KiB
    assert root.find("vcpu").get("cpuset") is None
    assert [child.tag for child in root.find("devices")] == ["emulator"]


def test_metadata_not_requested_is_dropped() -> None:
    assert dx.from_string(dx.to_string(full_domain())).metadata == []
    assert dx.from_string(dx.to_string(full_domain()), {"urn:other": "o"}).metadata == []


def test_from_string_reads_libvirt_style_xml() -> None:
    """libvirt adds ids, addresses, aliases and units; the reader keeps what it knows and ignores the rest."""
    xml = f"""<domain type='kvm' id='7'><name>virtlet-x</name><uuid>u</uuid>
      <metadata><virtlet:container xmlns:virtlet='{NS}'><virtlet:pod-uid>p</virtlet:pod-uid>
      </virtlet:container></metadata>
      <memory unit='KiB'>1048576</memory><currentMemory unit='KiB'>1048576</currentMemory>
      <vcpu placement='static'>1</vcpu><resource><partition>/machine</partition></resource>
      <os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/></os>
      <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
          <source file='/o.qcow2' index='1'/><backingStore type='file' index='2'><format type='raw'/>
          <source file='/store/img'/></backingStore><target dev='vda' bus='virtio'/>
          <alias name='virtio-disk0'/>
          <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/></disk>
        <controller type='usb' index='0' model='piix3-uhci'/>
        <controller type='pci' index='0' model='pci-root'/>
        <interface type='ethernet'><mac address='52:54:00:aa:bb:cc'/><target dev='tapx' managed='no'/>
          <model type='virtio'/><alias name='net0'/></interface>
        <serial type='unix'><source mode='bind' path='/s'/><log file='/l' append='on'/>
          <target type='isa-serial' port='0'><model name='isa-serial'/></target><alias name='serial0'/>
        </serial>
        <console type='unix'><source mode='bind' path='/s'/><target type='serial' port='0'/></console>
        <channel type='unix'><source mode='bind'
          path='/var/lib/libvirt/qemu/channel/target/domain-7-virtlet-x/org.qemu.guest_agent.0'/>
          <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/><alias name='channel0'/>
          <address type='virtio-serial' controller='0' bus='0' port='1'/></channel>
        <input type='mouse' bus='ps2'/>
        <graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'><listen type='address'
          address='127.0.0.1'/></graphics>
      </devices><seclabel type='dynamic' model='dac' relabel='yes'/></domain>"""
    domain = dx.from_string(xml, {NS: "virtlet"})
    assert (domain.type, domain.name, domain.memory_bytes, domain.vcpus) == ("kvm", "virtlet-x", 1024**3, 1)
    assert domain.metadata[0].fields == {"pod-uid": "p"}
    assert domain.devices.disks == [dx.Disk(source="/o.qcow2", target_dev="vda")]
    assert domain.devices.controllers == []
    assert domain.devices.interfaces == [dx.EthernetInterface(target_dev="tapx", mac="52:54:00:aa:bb:cc")]
    assert domain.devices.serials == [dx.UnixSerial(path="/s", log_file="/l")]
    assert domain.devices.graphics == [dx.VncGraphics("address", address="127.0.0.1", autoport=True)]
    assert domain.devices.channels == [dx.GuestAgentChannel()]


@pytest.mark.parametrize("xml", ["<domain", "<network/>", "<domain><name>x</name></domain>",
                                 "<domain><vcpu>1</vcpu><memory unit='parsec'>1</memory></domain>"])
def test_from_string_refuses_malformed(xml: str) -> None:
    with pytest.raises(ValueError):
        dx.from_string(xml)


def test_unknown_domain_type_refused() -> None:
    with pytest.raises(ValueError, match="domain type"):
        dx.to_string(dx.Domain(type="xen", name="d", uuid="u", memory_bytes=1, vcpus=1,
                               devices=dx.Devices(emulator="/q")))


def test_vnc_socket_from_live_xml() -> None:
    """What libvirt reports for ``<listen type='socket'/>``: the path it chose in the domain's private dir."""
    el = ET.fromstring("<graphics type='vnc' socket='/var/lib/libvirt/qemu/domain-3-x/vnc.sock'>"
                       "<listen type='socket' socket='/var/lib/libvirt/qemu/domain-3-x/vnc.sock'/></graphics>")
    assert dx.VncGraphics.from_xml(el) == dx.VncGraphics(socket="/var/lib/libvirt/qemu/domain-3-x/vnc.sock")


def test_usb_switched_off_survives_a_read() -> None:
    """A domain read back (vm_boot's hand-made copy of virtletd's) keeps USB off; libvirt's default controller
    of other domains is not carried over."""
    xml = """<domain type='qemu'><name>virtlet-x</name><uuid>u</uuid><memory unit='KiB'>1024</memory>
      <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>
      <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
        <controller type='usb' index='0' model='none'><alias name='usb'/></controller>
        <controller type='pci' index='0' model='pci-root'/></devices></domain>"""
    domain = dx.from_string(xml)
    assert domain.devices.controllers == [dx.Controller(type="usb", model="none", index=0)]
    assert "<controller type=\"usb\" index=\"0\" model=\"none\" />" in dx.to_string(domain)
