"""Does KVM really work here?  Decided once at start by running a tiny guest under KVM, with a timeout.

``/dev/kvm`` existing and opening proves nothing: on some hosts (nested, restricted) it opens, yet a guest
hangs as soon as it turns paging on, or QEMU aborts with ``-cpu host``.  So ``detect`` boots a 64 KiB
firmware of our own that does what every OS does first -- real mode -> page tables -> long mode -- then
checks memory and writes to QEMU's ``isa-debug-exit`` port, which ends QEMU with a known exit code.  Only
that exit code counts as "KVM works".  The same firmware runs under TCG too (``run_probe("tcg")``), which
shows the probe itself is sound.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from virtlet import errors

MODES = ("auto", "on", "off")
KVM_DEVICE = Path("/dev/kvm")
EMULATOR_NAMES = ("qemu-system-x86_64", "/usr/libexec/qemu-kvm", "qemu-kvm")
DEFAULT_TIMEOUT_S = 5.0

_EXIT_PORT = 0xF4
_EXIT_VALUE = 0x2A
PROBE_EXIT_CODE = (_EXIT_VALUE << 1) | 1  # isa-debug-exit ends QEMU with (value << 1) | 1
_FIRMWARE_SIZE = 0x10000  # QEMU wants a BIOS of a multiple of 64 KiB; mapped at 0xF0000 and below 4 GiB
_FIRMWARE_BASE = 0xF0000
_RESET_VECTOR = 0xFFF0


@dataclass(frozen=True)
class KvmDecision:
    """The libvirt domain type to use ("kvm" or "qemu" = TCG) and why, for the log and Status conditions."""

    domain_type: str
    reason: str


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str


def _u16(value: int) -> bytes:
    return value.to_bytes(2, "little")


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def probe_firmware() -> bytes:
    """The probe guest: a 64 KiB BIOS image (hand-assembled x86; each line is one instruction)."""
    real_mode_head = b"".join([
        b"\xfa",                                # cli
        b"\x31\xc0",                            # xor ax, ax
        b"\x8e\xd8",                            # mov ds, ax
        b"\x8e\xc0",                            # mov es, ax
        b"\xbf\x00\x10",                        # mov di, 0x1000
        b"\xb9\x00\x18",                        # mov cx, 0x1800
        b"\xfc",                                # cld
        b"\xf3\xab",                            # rep stosw            ; zero 0x1000..0x3fff (page tables)
        b"\x66\xc7\x06\x00\x10" + _u32(0x2003),  # mov dword [0x1000], 0x2003 ; PML4[0] -> PDPT, present+rw
        b"\x66\xc7\x06\x00\x20" + _u32(0x3003),  # mov dword [0x2000], 0x3003 ; PDPT[0] -> PD, present+rw
        b"\x66\xc7\x06\x00\x30" + _u32(0x83),    # mov dword [0x3000], 0x83   ; PD[0] = 2 MiB page at 0
    ])
    real_mode_tail = b"".join([
        b"\x0f\x20\xe0",                        # mov eax, cr4
        b"\x66\x83\xc8\x20",                    # or eax, 0x20         ; PAE
        b"\x0f\x22\xe0",                        # mov cr4, eax
        b"\x66\xb8" + _u32(0x1000),             # mov eax, 0x1000
        b"\x0f\x22\xd8",                        # mov cr3, eax         ; PML4
        b"\x66\xb9" + _u32(0xC0000080),         # mov ecx, IA32_EFER
        b"\x0f\x32",                            # rdmsr
        b"\x66\x0d" + _u32(0x100),              # or eax, 0x100        ; LME
        b"\x0f\x30",                            # wrmsr
        b"\x0f\x20\xc0",                        # mov eax, cr0
        b"\x66\x0d" + _u32(0x80000001),         # or eax, 0x80000001   ; PE + PG: long mode
        b"\x0f\x22\xc0",                        # mov cr0, eax
    ])
    head_len = len(real_mode_head) + 7 + len(real_mode_tail)
    long_mode_at = head_len + 8                 # after the far jump below
    far_jump = b"\x66\xea" + _u32(_FIRMWARE_BASE + long_mode_at) + _u16(0x08)  # jmp dword 0x08:long_mode
    long_mode = b"".join([
        b"\x66\xb8\x10\x00",                    # mov ax, 0x10
        b"\x8e\xd8",                            # mov ds, ax
        b"\x48\xb8" + (0x1234567890).to_bytes(8, "little"),  # mov rax, 0x1234567890
        b"\x48\x89\x04\x25" + _u32(0x4000),     # mov [0x4000], rax
        b"\x48\x8b\x1c\x25" + _u32(0x4000),     # mov rbx, [0x4000]
        b"\x48\x39\xc3",                        # cmp rbx, rax
        b"\x75\x04",                            # jne halt
        b"\xb0" + bytes([_EXIT_VALUE]),         # mov al, EXIT_VALUE
        b"\xe6" + bytes([_EXIT_PORT]),          # out EXIT_PORT, al   ; QEMU exits with PROBE_EXIT_CODE
        b"\xf4",                                # halt: hlt
        b"\xeb\xfd",                            # jmp halt
    ])
    code_len = head_len + len(far_jump) + len(long_mode)
    gdt_at = (code_len + 7) & ~7
    gdt = b"".join([
        (0).to_bytes(8, "little"),                   # null descriptor
        (0x00AF9A000000FFFF).to_bytes(8, "little"),  # 0x08: 64-bit code
        (0x00CF92000000FFFF).to_bytes(8, "little"),  # 0x10: data
    ])
    gdt_desc_at = gdt_at + len(gdt)
    lgdt = b"\x2e\x66\x0f\x01\x16" + _u16(gdt_desc_at)  # lgdt cs:[gdt_desc]
    code = real_mode_head + lgdt + real_mode_tail + far_jump + long_mode
    assert len(code) == code_len
    image = bytearray(b"\xf4" * _FIRMWARE_SIZE)  # hlt everywhere else
    image[: len(code)] = code
    image[gdt_at: gdt_desc_at] = gdt
    image[gdt_desc_at: gdt_desc_at + 6] = _u16(len(gdt) - 1) + _u32(_FIRMWARE_BASE + gdt_at)
    image[_RESET_VECTOR: _RESET_VECTOR + 5] = b"\xea" + _u16(0) + _u16(_FIRMWARE_BASE >> 4)  # jmp 0xf000:0
    return bytes(image)


def find_emulator() -> str:
    """The QEMU binary for x86-64 guests; ``FailedPrecondition`` when none is installed."""
    for name in EMULATOR_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise errors.FailedPrecondition(
        "no QEMU for x86-64 guests found (looked for qemu-system-x86_64, qemu-kvm); install qemu-system-x86")


def run_probe(accel: str, emulator: str, timeout: float = DEFAULT_TIMEOUT_S) -> ProbeResult:
    """Boot the probe firmware with ``-accel <accel>`` ("kvm" or "tcg"); ok only if it reached its exit."""
    with tempfile.TemporaryDirectory(prefix="virtlet-kvm-probe-") as tmp:
        firmware = Path(tmp) / "probe.bin"
        firmware.write_bytes(probe_firmware())
        cmd = [emulator, "-accel", accel, "-machine", "pc", "-m", "16", "-nodefaults", "-no-user-config",
               "-display", "none", "-serial", "none", "-monitor", "none", "-no-reboot",
               "-bios", str(firmware), "-device", f"isa-debug-exit,iobase={_EXIT_PORT:#x},iosize=1"]
        started = time.monotonic()
        try:
            out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=timeout, check=False)
        except FileNotFoundError:
            return ProbeResult(False, f"{emulator} is not installed")
        except subprocess.TimeoutExpired:
            return ProbeResult(False, f"a test guest under {accel} did not finish within {timeout:g} s "
                                      f"(the guest hangs)")
    took = time.monotonic() - started
    if out.returncode == PROBE_EXIT_CODE:
        return ProbeResult(True, f"a test guest ran to its end under {accel} in {took:.2f} s")
    lines = [line for line in out.stderr.splitlines() if line.strip() and "warning" not in line.lower()]
    why = lines[-1].strip() if lines else "no error message"
    return ProbeResult(False, f"a test guest under {accel} failed: QEMU exited with code {out.returncode}: "
                              f"{why}")


def probe_kvm(emulator: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> ProbeResult:
    """Check /dev/kvm, then really run the probe guest under KVM."""
    if not KVM_DEVICE.exists():
        return ProbeResult(False, f"{KVM_DEVICE} does not exist (kvm module not loaded, or the device is not "
                                  f"passed into this container)")
    try:
        os.close(os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return ProbeResult(False, f"{KVM_DEVICE} cannot be opened: {exc.strerror}")
    try:
        qemu = emulator or find_emulator()
    except errors.FailedPrecondition as exc:
        return ProbeResult(False, str(exc))
    result = run_probe("kvm", qemu, timeout)
    if not result.ok:
        return ProbeResult(False, f"{KVM_DEVICE} opens, but {result.detail}")
    return result


def detect(mode: str, timeout: float = DEFAULT_TIMEOUT_S, emulator: str | None = None) -> KvmDecision:
    """The domain type for ``--kvm auto|on|off``; ``on`` without working KVM is ``FailedPrecondition``."""
    if mode not in MODES:
        raise errors.InvalidArgument(f"kvm: {mode!r} is not allowed; expected one of {', '.join(MODES)}")
    if mode == "off":
        return KvmDecision("qemu", "KVM disabled by configuration (kvm: off); VMs use QEMU software "
                                   "emulation (TCG)")
    result = probe_kvm(emulator, timeout)
    if result.ok:
        return KvmDecision("kvm", f"KVM works: {result.detail}")
    if mode == "on":
        raise errors.FailedPrecondition(
            f"kvm: on, but KVM does not work here: {result.detail}. Fix KVM on this node, or set kvm to auto "
            f"(falls back to TCG) or off")
    return KvmDecision("qemu", f"KVM does not work here: {result.detail}; VMs use QEMU software emulation "
                               f"(TCG), which is much slower")
