#!/usr/bin/env python3
"""Decide whether KVM really works on this node by running a tiny guest under it.

Why a guest: /dev/kvm may exist and open while KVM is unusable (on some nested hosts a guest runs real-mode
code but stalls as soon as it touches memory in earnest).  The only proof is a guest that does real work.
The guest is a 512-byte boot sector (probe-guest.S): long mode, SSE, 1 GiB of memory writes, then a marker on
the first serial port and an exit through isa-debug-exit.  The same guest first runs under TCG, so a broken
probe (no QEMU, bad flags) is told apart from a broken KVM.

Prints one JSON object: {"mode": "kvm"|"tcg", "kvm_works": bool, "tcg_works": bool, "reason": str}.
It changes nothing on the node (its files live in a temporary directory that is removed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

MARKER = b"VIRTLET-KVM-PROBE-OK"
EXIT_VALUE = 0x2A  # isa-debug-exit makes QEMU exit with (value << 1) | 1
EXPECTED_RC = (EXIT_VALUE << 1) | 1


# The assembled probe-guest.S (see that file for the source and the rebuild command).
GUEST_CODE = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cbf0010b90018fcf3abc70600100320c70600200330bf003066b883000000b90002668905"
    "66050000200083c708e2f2660f0116e87c0f20e0660d200600000f22e066b8001000000f22d866b9800000c00f32660d"
    "000100000f300f20c0660d010000800f22c066ea7a7c0000080066b810008ed88ec00f28c849c7c01000000048c7c700"
    "00000148c7c1000080004c89c0f348ab49ffc875e748c7c3f8ffff0448833b017518beee7c000066baf803ac84c07403"
    "eeebf866baf400b02aeef4ebfd0f1f000000000000000000ffff0000009aaf00ffff00000092cf001700d07c00005649"
    "52544c45542d4b564d2d50524f42452d4f4b0d0a00"
)


def boot_sector() -> bytes:
    """The probe guest padded to a bootable 512-byte sector."""
    if len(GUEST_CODE) > 510 or MARKER not in GUEST_CODE:
        raise ValueError("probe guest code is damaged")
    return GUEST_CODE + bytes(510 - len(GUEST_CODE)) + b"\x55\xaa"


def run_guest(qemu: str, image: str, accel: str, timeout: float) -> tuple[bool, str]:
    """Run the guest once; True when it printed the marker and exited through the debug port."""
    cmd = [qemu, "-accel", accel, "-machine", "pc", "-m", "128", "-nodefaults", "-no-user-config",
           "-display", "none", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
           "-drive", f"file={image},format=raw,if=ide", "-no-reboot"]
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return False, f"{accel}: the guest did not finish within {timeout:g}s (stalls under this accelerator)"
    except OSError as exc:
        return False, f"{accel}: cannot run {qemu}: {exc}"
    if MARKER in proc.stdout and proc.returncode == EXPECTED_RC:
        return True, f"{accel}: the probe guest ran"
    err = proc.stderr.decode(errors="replace").strip().splitlines()
    detail = err[-1] if err else "no error output"
    return False, f"{accel}: the guest failed (exit {proc.returncode}): {detail}"


def probe(qemu: str, timeout: float) -> dict[str, object]:
    path = shutil.which(qemu) or qemu
    if not os.access(path, os.X_OK):
        return {"mode": "tcg", "kvm_works": False, "tcg_works": False,
                "reason": f"{qemu} is not installed, so neither accelerator could be tried"}
    with tempfile.TemporaryDirectory(prefix="virtlet-kvm-probe-") as tmp:
        image = os.path.join(tmp, "probe.img")
        with open(image, "wb") as f:
            f.write(boot_sector())
        tcg_ok, tcg_reason = run_guest(path, image, "tcg", timeout)
        if not os.path.exists("/dev/kvm"):
            kvm_ok, kvm_reason = False, "kvm: /dev/kvm does not exist (module not loaded or no VT-x/AMD-V)"
        else:
            kvm_ok, kvm_reason = run_guest(path, image, "kvm", timeout)
    return {"mode": "kvm" if kvm_ok else "tcg", "kvm_works": kvm_ok, "tcg_works": tcg_ok,
            "reason": f"{kvm_reason}; {tcg_reason}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qemu", default="qemu-system-x86_64")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per guest run")
    args = parser.parse_args(argv)
    json.dump(probe(args.qemu, args.timeout), sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
