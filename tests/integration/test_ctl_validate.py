"""``virtletctl validate`` on real parts: a running libvirtd and virtlogd, a real CNI bridge conf and plugins, a
test virtletd, a real containerd and the CRI proxy in front of both; then virtletd stopped, and a kubelet drop-in
that points elsewhere: each failure is one FAIL line with a fix line, and the exit code is 1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.containerd import ContainerdProcess
from tests.helpers.daemon import REPO, VirtletdProcess
from tests.integration.test_criproxy import ProxyProcess
from tests.integration.test_criproxy import containerd as containerd
from tests.integration.test_criproxy import proxy as proxy

pytestmark = [pytest.mark.network, pytest.mark.libvirt]


def _validate(*args: str) -> tuple[int, dict[str, str], str]:
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'runtime'}:{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-m", "virtlet.ctl.main", "validate", *args], capture_output=True,
                         text=True, env=env, timeout=120)
    lines: dict[str, str] = {}
    last = ""
    for line in out.stdout.splitlines():
        parts = line.split(None, 2)
        if line.startswith(("ok ", "warn ", "FAIL ")):
            last = parts[1]
            lines[last] = line
        elif line.strip().startswith("fix:"):
            lines[last + ":fix"] = line.strip()
    return out.returncode, lines, out.stdout + out.stderr


def test_validate_a_node_then_break_it(world_dir: Path, bridge_cni: Path, libvirt_daemons: None,
                                       containerd: ContainerdProcess, virtletd: VirtletdProcess,
                                       proxy: ProxyProcess) -> None:
    cfg = world_dir / "virtlet.yaml"
    cfg.write_text(yaml.safe_dump({
        "listen": str(virtletd.socket), "libvirt_uri": "qemu:///system", "kvm": "off",
        "cni_conf_dir": str(bridge_cni), "image_dir": str(world_dir / "images"),
        "state_dir": str(virtletd.state_dir)}))
    pcfg = world_dir / "criproxy.yaml"
    pcfg.write_text(yaml.safe_dump({
        "listen": str(proxy.socket), "primary": containerd.address,
        "secondaries": {"virtlet.cloud": f"unix://{virtletd.socket}"}}))
    dropin = world_dir / "90-virtlet-criproxy.conf"
    dropin.write_text(f'[Service]\nEnvironment="KUBELET_EXTRA_ARGS=--container-runtime-endpoint=unix://{proxy.socket}'
                      f' --node-labels=extraRuntime=virtlet"\n')
    args = ["--config", str(cfg), "--proxy-config", str(pcfg), "--kubelet-dropin", str(dropin), "--min-free", "1Mi"]

    rc, lines, out = _validate(*args)
    assert rc == 0, out
    for check in ("config", "qemu", "virtiofsd", "libvirt", "virtlogd", "cni", "virtletd", "criproxy", "kubelet",
                  "disk"):
        assert lines[check].startswith("ok "), out
    assert lines["kvm"].startswith("warn ") and "TCG" in lines["kvm"], out  # kvm: off is a decision, with reason
    assert "routes to containerd" in lines["criproxy"] and "virtlet.cloud" in lines["criproxy"], out
    assert out.rstrip().endswith("this node can run VM pods"), out

    # break it: virtletd down, the kubelet pointed elsewhere, a disk need the node cannot meet
    virtletd.stop()
    dropin.write_text('[Service]\nEnvironment="KUBELET_EXTRA_ARGS=--container-runtime-endpoint=unix:///run/'
                      'containerd/containerd.sock"\n')
    rc, lines, out = _validate(*args[:-1], "1Ei")
    assert rc == 1, out
    assert lines["virtletd"].startswith("FAIL ") and "does not answer" in lines["virtletd"], out
    assert "start virtletd" in lines["virtletd:fix"], out
    assert lines["criproxy"].startswith("FAIL ") and "virtlet.cloud" in lines["criproxy"], out
    assert lines["kubelet"].startswith("FAIL ") and "restart the kubelet" in lines["kubelet:fix"], out
    assert lines["disk"].startswith("FAIL ") and "fix:" in lines["disk:fix"], out
    assert lines["libvirt"].startswith("ok "), out
    assert "4 check(s) failed: virtletd, criproxy, kubelet, disk" in out, out

    # the proxy up but its primary runtime (containerd) down: the fix names the primary, not the proxy
    containerd.stop()
    rc, lines, out = _validate(*args)
    assert rc == 1, out
    assert lines["criproxy"].startswith("FAIL ") and "its primary runtime" in lines["criproxy"], out
    assert "containerd" in lines["criproxy:fix"], out


def test_validate_refuses_unknown_checks_and_sizes(tmp_path: Path) -> None:
    rc, _, out = _validate("--skip", "nonsense")
    assert rc == 1 and "--skip nonsense: no such check" in out, out
    rc, _, out = _validate("--min-free", "lots")
    assert rc == 1 and "--min-free" in out, out
