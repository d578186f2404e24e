"""README's first command, tools/local-node.sh, as a (slow) test: a podman node provisioned with site.yml runs the
example VM pod; a second run reuses node and pod and skips site.yml; SSH with the printed command works; `down`
leaves no container and no podman bridge behind.

Why here: the main job must keep working on a fresh machine, and CI is the fresh machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools/local-node.sh"
NODE = "virtlet-local-node"  # what inventories/local expects
BIN = Path(sys.executable).parent


def _run(*args: str, timeout: float = 30 * 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", ANSIBLE_NOCOLOR="1")
    env.pop("ANSIBLE_CONFIG", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _output(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stdout + result.stderr)[-20000:]


@pytest.mark.slow
@pytest.mark.libvirt
@pytest.mark.network
@pytest.mark.molecule
@pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (apt)")
def test_local_node_runs_the_example_vm_pod_and_a_second_run_reuses_it() -> None:
    if subprocess.run(["podman", "container", "exists", NODE], check=False).returncode == 0:
        pytest.skip(f"a local node {NODE} already runs here; this test would remove it")
    try:
        first = _run("up")
        assert first.returncode == 0, _output(first)
        assert "VIRTLET-TINY-READY hostname=tiny-vm" in first.stdout, _output(first)
        ssh = re.search(r"SSH into it:\s+podman exec -it (\S+) (ssh .*root@(\S+))", first.stdout)
        assert ssh, _output(first)
        assert ssh.group(1) == NODE

        second = _run("up")
        assert second.returncode == 0, _output(second)
        assert "site.yml already applied with these sources" in second.stderr, _output(second)
        assert "pod tiny-vm exists" in second.stdout, _output(second)
        assert f"pod IP {ssh.group(3)}" in second.stdout, _output(second)

        # The printed command, without a terminal: the key from the pod's annotation lets root in.
        cmd = ["podman", "exec", NODE, *ssh.group(2).split()[:-1], "-o", "BatchMode=yes",
               "-o", "ConnectTimeout=20", f"root@{ssh.group(3)}", "cat /etc/motd"]
        motd = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        assert "Hello from a virtlet VM pod" in motd.stdout, motd.stdout + motd.stderr
    finally:
        down = _run("down", timeout=300)
    assert down.returncode == 0, _output(down)
    assert subprocess.run(["podman", "container", "exists", NODE], check=False).returncode != 0
    leftover = subprocess.run(["podman", "ps", "-aq"], capture_output=True, text=True, check=True).stdout
    if not leftover.strip():
        assert subprocess.run(["ip", "link", "show", "cni-podman0"], capture_output=True,
                              check=False).returncode != 0, "down left podman's bridge behind"
