"""tools/leftovers.py sees what the benches leave, as it sees what the tests leave (real processes and dirs)."""

from __future__ import annotations

import importlib.util
import subprocess
import tempfile
from pathlib import Path
from types import ModuleType

TOOL = Path(__file__).resolve().parents[2] / "tools" / "leftovers.py"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("leftovers_tool", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_hand_started_qemu_of_the_boot_bench_is_listed() -> None:
    tool = _tool()
    # A process whose command line reads like vm_boot's hand-written QEMU (started outside libvirt).
    proc = subprocess.Popen(["bash", "-c", 'exec -a "qemu-system-x86_64 -name vmboot-leftovertest-qemu-1" sleep 60'])
    try:
        listed = [p for p in _wait_listed(tool) if "vmboot-leftovertest" in p]
        assert listed, "the bench's QEMU is not listed"
    finally:
        proc.kill()
        proc.wait()
    assert not [p for p in tool.processes() if "vmboot-leftovertest" in p]


def _wait_listed(tool: ModuleType) -> list[str]:
    for _ in range(100):  # until bash has exec'd
        found: list[str] = tool.processes()
        if any("vmboot-leftovertest" in p for p in found):
            return found
        subprocess.run(["sleep", "0.05"], check=True)
    return []


def test_a_bench_temp_dir_is_listed() -> None:
    tool = _tool()
    d = tempfile.mkdtemp(prefix="virtlet-podstart-", dir="/var/tmp")
    try:
        assert d in tool.files_and_mounts()
    finally:
        Path(d).rmdir()
    assert d not in tool.files_and_mounts()
