"""Boots the project's guest test images under plain QEMU (TCG) from their own disks and checks the console.

Why plain QEMU and not libvirt: these tests prove the images themselves (BIOS boot, DHCP, the cloud-init
subset or real cloud-init, the ACPI power button), independent of virtletd. The image is built (or reused from
``.cache/guest-images``) by ``guest-images/build.sh``; each boot runs on a throw-away qcow2 overlay, so the
cached image is never written, and QEMU is killed and every file removed in ``finally`` blocks.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pycdlib
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "guest-images" / "build.sh"
BOOT_TIMEOUT = 120.0  # TCG on a loaded 2-core machine; the tiny image usually needs ~10 s
FULL_BOOT_TIMEOUT = 400.0

pytestmark = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs qemu-system-x86_64")


def build_image(name: str) -> Path:
    """Runs ``guest-images/build.sh NAME`` (a no-op when the stamp matches) and returns the qcow2 path."""
    proc = subprocess.run([str(BUILD), name], capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, f"build.sh {name} failed:\n{proc.stderr[-4000:]}"
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.is_file(), path
    return path


def write_seed_iso(path: Path, files: dict[str, str], label: str = "cidata") -> None:
    """A NoCloud (or ConfigDrive) seed as ISO 9660 with Joliet and Rock Ridge, like virtletd writes it."""
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident=label)
    iso_dirs: dict[str, str] = {"": ""}  # "openstack/latest" -> "/D1/D2" (plain ISO 9660 names)
    for n, (name, text) in enumerate(sorted(files.items())):
        parts = name.split("/")
        for depth in range(1, len(parts)):
            sub, parent = "/".join(parts[:depth]), "/".join(parts[:depth - 1])
            if sub not in iso_dirs:
                iso_dirs[sub] = f"{iso_dirs[parent]}/D{len(iso_dirs)}"
                iso.add_directory(iso_dirs[sub], rr_name=parts[depth - 1], joliet_path="/" + sub)
        data = text.encode()
        iso_name = f"{iso_dirs['/'.join(parts[:-1])]}/F{n}.;1"
        iso.add_fp(io.BytesIO(data), len(data), iso_name, rr_name=parts[-1], joliet_path="/" + name)
    iso.write(str(path))
    iso.close()


SEED_BUSES = {
    # how libvirt attaches virtletd's seed by default: a CD-ROM on the IDE bus
    "ide-cd": lambda p: ["-drive", f"file={p},media=cdrom,if=ide,readonly=on"],
    "scsi-cd": lambda p: ["-device", "virtio-scsi-pci,id=scsi0",
                          "-drive", f"file={p},if=none,id=seed,readonly=on",
                          "-device", "scsi-cd,drive=seed,bus=scsi0.0"],
    "virtio-disk": lambda p: ["-drive", f"file={p},if=virtio,format=raw,readonly=on"],
}


def write_seed_fat(path: Path, files: dict[str, str], label: str = "cidata") -> None:
    """A NoCloud seed on a FAT disk image, made with mtools (no mount)."""
    subprocess.run(["truncate", "-s", "2M", str(path)], check=True)
    subprocess.run(["mformat", "-i", str(path), "-v", label.upper(), "::"], check=True, timeout=30)
    for name, text in files.items():
        src = path.parent / f".{name}"
        src.write_text(text)
        subprocess.run(["mcopy", "-i", str(path), str(src), f"::/{name}"], check=True, timeout=30)
        src.unlink()


class Guest:
    """One QEMU process on an overlay of a guest image, its serial console written to a file."""

    def __init__(self, workdir: Path, image: Path, seed: Path | None, memory_mb: int = 256, cpus: int = 1,
                 nic: str = "user,model=virtio-net-pci", seed_bus: str = "ide-cd") -> None:
        self.workdir = workdir
        self.console = workdir / "console.log"
        self.qmp_path = workdir / "qmp.sock"
        overlay = workdir / "root.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay)],
            check=True, timeout=60)
        cmd = [
            "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", str(memory_mb), "-smp", str(cpus),
            "-display", "none", "-vga", "none", "-monitor", "none", "-no-reboot",
            "-serial", f"file:{self.console}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-nic", nic,
        ]
        if seed is not None:
            cmd += SEED_BUSES[seed_bus](seed)
        with open(workdir / "qemu.err", "wb") as err:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                         start_new_session=True)

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """Polls the console file (every 0.25 s) until ``pattern`` matches; fails with the console tail."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.text())
            if match:
                return match
            if self.proc.poll() is not None:
                pytest.fail(f"QEMU exited ({self.proc.returncode}) before /{pattern}/:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no /{pattern}/ on the console within {timeout:.0f} s:\n{self.tail()}")
            time.sleep(0.25)

    def tail(self, n: int = 60) -> str:
        err = (self.workdir / "qemu.err").read_text(errors="replace")
        return "\n".join(self.text().splitlines()[-n:]) + ("\n[qemu stderr] " + err if err else "")

    def qmp(self, command: str) -> None:
        """Sends one QMP command (e.g. ``system_powerdown``: the ACPI power button, as libvirt's shutdown)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.qmp_path))
            reader = sock.makefile("r")
            reader.readline()  # greeting
            for cmd in ("qmp_capabilities", command):
                sock.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
                while "return" not in (reply := json.loads(reader.readline())) and "error" not in reply:
                    pass
                assert "error" not in reply, reply

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="virtlet-guestimg-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def boot(workdir: Path) -> Iterator:
    """``boot(image, seed_files, **kw)`` starts a guest; every guest is killed at the end of the test."""
    guests: list[Guest] = []

    def start(image: Path, seed_files: dict[str, str] | None, label: str = "cidata", seed_fat: bool = False,
              **kw) -> Guest:
        seed = None
        if seed_files is not None:
            seed = workdir / f"seed{len(guests)}.img"
            (write_seed_fat if seed_fat else write_seed_iso)(seed, seed_files, label)
        gdir = workdir / f"g{len(guests)}"
        gdir.mkdir()
        guest = Guest(gdir, image, seed, **kw)
        guests.append(guest)
        return guest

    try:
        yield start
    finally:
        for guest in guests:
            guest.kill()


def _seed(iid: str, host: str, user_data: str) -> dict[str, str]:
    return {"meta-data": f"instance-id: {iid}\nlocal-hostname: {host}\n", "user-data": user_data}


YAML2TREE = REPO / "guest-images" / "tiny" / "yaml2tree.awk"
GOLDEN = REPO / "tests" / "unit" / "golden" / "cloudinit"
HANDWRITTEN_USER_DATA = """#cloud-config
# hand-written style: indented lists, flow lists, quotes, comments, block scalars
hostname: "quoted host"   # a comment after a value
runcmd:
  - [ sh, -c, "echo a, b" ]
  - - ls
    - -l
  - plain string
  - 'it''s'
  - |
    multi
      line
write_files:
  - path: /x
    encoding: b64
    content: aGVsbG8K
    append: true
  - content: |+
      keep

    path: "/y z"
    permissions: '0600'
users:
- default
- name: root
  ssh_authorized_keys: [ "ssh-ed25519 AAA x@y" ]
"""


def _tree(path: Path) -> object:
    if path.is_file():
        return path.read_text()
    kids = sorted(p.name for p in path.iterdir())
    if kids and all(k.isdigit() for k in kids):
        return [_tree(path / k) for k in kids]
    return {k: _tree(path / k) for k in kids}


def _as_strings(value: object) -> object:
    if isinstance(value, dict):
        return {str(k): _as_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_as_strings(v) for v in value]
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def _yaml_cases() -> list[Path]:
    return sorted(p for p in GOLDEN.glob("*/*") if p.name in ("meta-data", "user-data", "network-config"))


@pytest.mark.skipif(shutil.which("busybox") is None, reason="needs busybox (busybox-static)")
@pytest.mark.parametrize("source", [*_yaml_cases(), "handwritten"],
                         ids=lambda s: s if isinstance(s, str) else f"{s.parent.name}/{s.name}")
def test_tiny_yaml_reader_agrees_with_pyyaml(source: Path | str, workdir: Path) -> None:
    """The guest's awk reader reads virtletd's seeds (golden files) and hand-written YAML as PyYAML does."""
    if source == "handwritten":
        src = workdir / "user-data"
        src.write_text(HANDWRITTEN_USER_DATA)
    else:
        src = Path(source)
    text = src.read_text()
    if text.startswith("#!"):
        pytest.skip("a script, not YAML")
    subprocess.run(["busybox", "awk", "-v", f"out={workdir}/tree", "-f", str(YAML2TREE), str(src)],
                   check=True, timeout=60)
    assert _tree(workdir / "tree") == _as_strings(yaml.safe_load(text) or {})


@pytest.fixture(scope="module")
def tiny_image() -> Path:
    return build_image("tiny")


def test_tiny_boots_applies_cloud_init_and_prints_marker(tiny_image: Path, boot) -> None:
    token = uuid.uuid4().hex[:12]
    payload = "written by a b64 write_files entry\n"

    user_data = "\n".join([
        "#cloud-config",
        "write_files:",
        "- path: /etc/virtlet-test/value",
        "  permissions: '0600'",
        "  content: |",
        f"    value-{token}",
        "- path: /etc/virtlet-test/b64",
        "  encoding: b64",
        f"  content: {base64.b64encode(payload.encode()).decode()}",
        "runcmd:",
        "- echo RUNCMD-STRING $(cat /etc/virtlet-test/value) > /dev/console",
        "- [sh, -c, 'echo RUNCMD-LIST $(stat -c %a /etc/virtlet-test/value) $(cat /etc/virtlet-test/b64)"
        " > /dev/console']",
        "- virtlet-sysinfo > /dev/console",
        "",
    ])
    guest = boot(tiny_image, _seed(f"iid-{token}", f"tiny-{token[:6]}", user_data), cpus=2)
    guest.wait_for(rf"^VIRTLET-TINY-READY hostname=tiny-{token[:6]} instance-id=iid-{token}\b", BOOT_TIMEOUT)
    text = guest.text()
    assert f"RUNCMD-STRING value-{token}" in text
    assert "RUNCMD-LIST 600 written by a b64 write_files entry" in text
    assert re.search(r"^VIRTLET-SYSINFO nproc=2 memtotal_kb=\d+", text, re.MULTILINE), guest.tail()
    # the boot went through the BIOS and the kernel printed its messages on the serial console
    assert "Linux version" in text or "Booting" in text or "Decompressing" in text or "SYSLINUX" in text


def test_tiny_powers_off_on_acpi_power_button(tiny_image: Path, boot) -> None:
    guest = boot(tiny_image, _seed("iid-acpi", "acpi", "#cloud-config\n"))
    guest.wait_for(r"^VIRTLET-TINY-READY ", BOOT_TIMEOUT)
    guest.wait_for(r"login: ", BOOT_TIMEOUT)
    guest.qmp("system_powerdown")
    assert guest.wait_exit(timeout=BOOT_TIMEOUT) == 0
    # -no-reboot makes QEMU exit on a reboot too: the kernel's last words tell which one it was
    after = guest.text().split("VIRTLET-TINY-READY", 1)[1]
    assert "reboot: Power down" in after and "Restarting system" not in after, guest.tail()


def test_tiny_can_be_told_to_ignore_acpi(tiny_image: Path, boot) -> None:
    guest = boot(tiny_image, _seed("iid-noacpi", "noacpi", "#cloud-config\nruncmd:\n- virtlet-ignore-acpi\n"))
    guest.wait_for(r"^VIRTLET-TINY-READY ", BOOT_TIMEOUT)
    guest.qmp("system_powerdown")
    guest.wait_for(r"ignoring the ACPI power button", BOOT_TIMEOUT)
    assert guest.proc.poll() is None


def test_tiny_runs_a_user_data_script_and_boots_without_seed(tiny_image: Path, boot) -> None:
    script = "#!/bin/sh\necho SCRIPT-RAN-AS-$(hostname) > /dev/console\n"
    guest = boot(tiny_image, _seed("iid-script", "scripted", script))
    guest.wait_for(r"^VIRTLET-TINY-READY hostname=scripted ", BOOT_TIMEOUT)
    assert "SCRIPT-RAN-AS-scripted" in guest.text()
    bare = boot(tiny_image, None)
    bare.wait_for(r"^VIRTLET-TINY-READY hostname=tiny ", BOOT_TIMEOUT)


CONFIG_DRIVE_META = """{
  "hostname": "cfgdrive",
  "name": "vm-1",
  "public_keys": {
    "key-0": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8g a@b"
  },
  "uuid": "iid-configdrive"
}
"""


@pytest.mark.parametrize("layout", ["configdrive-on-scsi-cd", "nocloud-fat-on-virtio-disk"])
def test_tiny_finds_other_seed_layouts(tiny_image: Path, boot, layout: str) -> None:
    user_data = ("#cloud-config\nruncmd:\n"
                 "- echo SEED-LAYOUT-OK $(cat /root/.ssh/authorized_keys 2>/dev/null | wc -l)"
                 " > /dev/console\n")
    if layout == "configdrive-on-scsi-cd":
        files = {"openstack/latest/meta_data.json": CONFIG_DRIVE_META,
                 "openstack/latest/user_data": user_data}
        guest = boot(tiny_image, files, label="config-2", seed_bus="scsi-cd")
        guest.wait_for(r"^VIRTLET-TINY-READY hostname=cfgdrive instance-id=iid-configdrive ", BOOT_TIMEOUT)
        assert "SEED-LAYOUT-OK 1" in guest.text()
    else:
        seed = _seed("iid-fat", "fatseed", user_data)
        guest = boot(tiny_image, seed, seed_fat=True, seed_bus="virtio-disk")
        guest.wait_for(r"^VIRTLET-TINY-READY hostname=fatseed instance-id=iid-fat ", BOOT_TIMEOUT)
        assert "SEED-LAYOUT-OK 0" in guest.text()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True, timeout=30)


def _ssh(key: Path, port: int, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ssh", "-i", str(key), "-p", str(port), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30",
         "-o", "LogLevel=ERROR", "root@127.0.0.1", command],
        capture_output=True, text=True, timeout=90, check=False)


@pytest.mark.skipif(shutil.which("ssh") is None, reason="needs openssh-client")
def test_tiny_ssh_with_keys_from_cloud_init(tiny_image: Path, boot, workdir: Path) -> None:
    keys = {}
    for name in ("top", "user"):
        keys[name] = workdir / f"id_{name}"
        _keygen(keys[name])
    pub = {name: Path(f"{path}.pub").read_text().strip() for name, path in keys.items()}
    user_data = "\n".join([
        "#cloud-config",
        "ssh_authorized_keys:",
        f"  - {pub['top']}",
        "users:",
        "  - default",
        "  - name: root",
        "    ssh-authorized-keys:",
        f"      - {pub['user']}",
        "",
    ])
    port = _free_port()
    guest = boot(tiny_image, _seed("iid-ssh", "sshvm", user_data), cpus=2, memory_mb=192,
                 nic=f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:22")
    guest.wait_for(r"^VIRTLET-TINY-READY hostname=sshvm ", BOOT_TIMEOUT)
    for name in ("top", "user"):
        result = _ssh(keys[name], port, "virtlet-sysinfo")
        assert result.returncode == 0, result.stderr
        assert re.match(r"VIRTLET-SYSINFO nproc=2 memtotal_kb=\d+ hostname=sshvm$", result.stdout.strip())
    stranger = workdir / "id_stranger"
    _keygen(stranger)
    assert _ssh(stranger, port, "true").returncode != 0


@pytest.mark.slow
def test_full_image_runs_real_cloud_init(boot) -> None:
    image = build_image("full")
    token = uuid.uuid4().hex[:12]
    user_data = "\n".join([
        "#cloud-config",
        "write_files:",
        "- path: /etc/virtlet-test",
        "  content: |",
        f"    full-{token}",
        "runcmd:",
        "- echo FULL-RUNCMD $(cat /etc/virtlet-test) $(hostname)",
        "",
    ])
    guest = boot(image, _seed(f"iid-{token}", "full-vm", user_data), memory_mb=1024, cpus=2)
    guest.wait_for(rf"FULL-RUNCMD full-{token} full-vm", FULL_BOOT_TIMEOUT)
    guest.wait_for(r"Cloud-init v\. .* finished", FULL_BOOT_TIMEOUT)
