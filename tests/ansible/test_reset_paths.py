"""A reset after an inventory that changes every path leaves nothing behind (slow: one podman node).

One privileged systemd podman node (the molecule node image, molecule/shared/build-node-image.sh), an inventory
that moves every path, name and unit-facing socket the roles make configurable (prefix, configuration, state,
images, translations, run directory, sockets, CNI directory/file/network/bridge, kubelet drop-in, RuntimeClass
file, every role's fact directory), site.yml, then playbooks/reset.yml: the node's snapshot after the reset must
equal the one before site.yml (molecule/shared/files/node-snapshot.sh and compare-snapshots.sh, with the same
allow-list as the molecule scenario, plus the moved directories outside the snapshot's usual roots).

Why one node and no containerd: this checks what the roles write and remove, not the pods (the molecule scenario
does); the proxy serves its health check without its primary runtime.  Unique container name and pod subnet
10.244.99.0/24 (the local node uses .88, molecule .77); the node and podman's bridge are removed also on failure.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SHARED = REPO / "molecule/shared"
# Moved paths outside the roots node-snapshot.sh lists (/etc, /opt, /usr/local, /var/lib/virtlet, /run/virtlet*).
EXTRA_ROOTS = ["/var/lib/vlr", "/var/lib/vlr-facts", "/var/lib/cni", "/run/vlr-run", "/run/vlr-virtlet.sock",
               "/run/vlr-criproxy.sock"]


def moved_paths(wheelhouse: str) -> dict[str, object]:
    """Every path/name variable of the roles, away from its default."""
    return {
        "kvm_load_modules": False,
        "kvm_fact_dir": "/var/lib/vlr-facts/kvm",
        "libvirt_fact_dir": "/var/lib/vlr-facts/libvirt",
        "cni_fact_dir": "/var/lib/vlr-facts/cni",
        "cni_conf_dir": "/etc/vlr-cni/net.d",
        "cni_extra_conf_dir": "/etc/vlr-cni/multus/net.d",
        "cni_default_file": "20-vlr.conflist",
        "cni_network_name": "vlr-net",
        "cni_bridge": "vlr0",
        "cni_subnet": "10.244.99.0/24",
        "cni_gateway": "10.244.99.1",
        "virtlet_runtime_fact_dir": "/var/lib/vlr-facts/runtime",
        "virtlet_runtime_prefix": "/opt/vlr/runtime",
        "virtlet_runtime_config_dir": "/etc/vlr/virtlet",
        "virtlet_runtime_listen": "/run/vlr-virtlet.sock",
        "virtlet_runtime_state_dir": "/var/lib/vlr/state",
        "virtlet_runtime_image_dir": "/var/lib/vlr/images",
        "virtlet_runtime_image_translations_dir": "/etc/vlr/virtlet/images",
        "virtlet_runtime_cni_conf_dir": "/etc/vlr-cni/net.d",
        "virtlet_runtime_cni_extra_conf_dir": "/etc/vlr-cni/multus/net.d",
        "virtlet_runtime_extra_config": {"run_dir": "/run/vlr-run"},
        "virtlet_runtime_wheelhouse": wheelhouse,
        "virtlet_runtime_ready_timeout": 120,
        "virtlet_runtime_image_translations": [
            {"name": "vlr", "translations": [{"name": "tiny", "url": "http://127.0.0.1:1/tiny.qcow2"}]}],
        "criproxy_fact_dir": "/var/lib/vlr-facts/criproxy",
        "criproxy_executable": "/opt/vlr/runtime/venv/bin/virtlet-criproxy",
        "criproxy_health_command": "/opt/vlr/runtime/bin/virtlet-health",
        "criproxy_config_dir": "/etc/vlr/criproxy",
        "criproxy_listen": "/run/vlr-criproxy.sock",
        "criproxy_state_dir": "/var/lib/vlr/criproxy-state",
        "criproxy_secondaries": {"virtlet.cloud": "unix:///run/vlr-virtlet.sock"},
        "criproxy_kubelet_dropin_dir": "/etc/vlr-kubelet/dropins",
        "criproxy_kubelet_dropin_file": "95-vlr.conf",
        "criproxy_runtimeclass_file": "/etc/vlr/runtimeclass/runtimeclass.yaml",
        # site.yml's last play validates the node; this node has no containerd (the proxy's primary) to answer
        "virtlet_validate_skip": ["criproxy"],
    }


def sh(*argv: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
                          env=env)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.stdout + result.stderr)[-20000:]
    return result.stdout


def snapshot(node: str, name: str) -> None:
    ok(sh("podman", "exec", node, "/root/node-snapshot.sh", f"/root/{name}"))
    roots = " ".join(EXTRA_ROOTS)
    ok(sh("podman", "exec", node, "sh", "-c", f"find {roots} 2>/dev/null | sort >/root/{name}/moved-files; true"))


@pytest.mark.slow
@pytest.mark.molecule
@pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (apt)")
@pytest.mark.timeout(40 * 60)  # a node image build, site.yml and reset.yml on a cold apt cache
def test_reset_after_an_inventory_that_moves_every_path_leaves_nothing_behind(tmp_path: Path) -> None:
    node = f"virtlet-reset-{secrets.token_hex(4)}"
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
               ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0", PYTHON=sys.executable)
    image = ok(sh(str(SHARED / "build-node-image.sh"), timeout=900, env=env)).strip().splitlines()[-1]
    wheelhouse = ok(sh(str(SHARED / "build-wheelhouse.sh"), timeout=900, env=env)).strip().splitlines()[-1]
    apt_cache = REPO / ".cache/ansible-reset/apt"
    # apt needs partial/ in its archives directory and does not make it there itself.
    (apt_cache / "partial").mkdir(parents=True, exist_ok=True)
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "hosts.yml").write_text(yaml.safe_dump({"virtlet_nodes": {"hosts": {node: {
        "ansible_connection": "containers.podman.podman", "ansible_python_interpreter": "/usr/bin/python3"}}}}))
    (inventory / "group_vars/virtlet_nodes.yml").write_text(yaml.safe_dump(moved_paths(wheelhouse)))

    def playbook(path: str) -> subprocess.CompletedProcess[str]:
        return sh(str(BIN / "ansible-playbook"), "-i", str(inventory), path, timeout=20 * 60, env=env)

    try:
        # Same settings as the molecule nodes (molecule/shared/create.yml explains each one).
        ok(sh("podman", "run", "-d", "--name", node, "--hostname", node, "--privileged", "--cgroupns=private",
              "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
              "-v", f"{apt_cache}:/var/cache/apt/archives", "--label", "owner=virtlet-reset-test",
              image, "/sbin/init"))
        deadline = time.monotonic() + 120
        while sh("podman", "exec", node, "systemctl", "is-system-running").stdout.strip() not in (
                "running", "degraded"):
            assert time.monotonic() < deadline, f"systemd in {node} did not come up"
            time.sleep(1)
        for name in ("node-snapshot.sh", "compare-snapshots.sh", "reset-allowed-leftovers.txt"):
            ok(sh("podman", "cp", str(SHARED / "files" / name), f"{node}:/root/{name}"))
        snapshot(node, "before-site")

        site = playbook("site.yml")
        ok(site)
        # The moved paths were really used (not the defaults).
        for path in ("/opt/vlr/runtime/venv/bin/virtletd", "/etc/vlr/virtlet/virtlet.yaml",
                     "/etc/vlr/virtlet/images/vlr.yaml", "/etc/vlr/criproxy/criproxy.yaml",
                     "/etc/vlr/runtimeclass/runtimeclass.yaml", "/etc/vlr-cni/net.d/20-vlr.conflist",
                     "/etc/vlr-kubelet/dropins/95-vlr.conf", "/var/lib/vlr/state", "/var/lib/vlr/images",
                     "/var/lib/vlr/criproxy-state", "/run/vlr-virtlet.sock", "/run/vlr-criproxy.sock",
                     "/var/lib/vlr-facts/kvm/virtlet_kvm.fact",
                     "/var/lib/vlr-facts/libvirt/virtlet_packages_libvirt.fact"):
            ok(sh("podman", "exec", node, "test", "-e", path))
        for path in ("/opt/virtlet", "/etc/virtlet", "/var/lib/virtlet", "/var/lib/virtlet-criproxy", "/etc/ansible",
                     "/run/virtlet.sock"):
            assert sh("podman", "exec", node, "test", "-e", path).returncode != 0, f"{path} made despite moved"

        ok(playbook("playbooks/reset.yml"))
        snapshot(node, "after-reset")
        compare = sh("podman", "exec", node, "/root/compare-snapshots.sh", "/root/before-site", "/root/after-reset",
                     "/root/reset-allowed-leftovers.txt")
        assert compare.returncode == 0, compare.stdout + compare.stderr
    finally:
        sh("podman", "rm", "--force", "--volumes", "--ignore", node, timeout=300)
        sh(str(SHARED / "files/podman-bridge-cleanup.sh"))
    assert sh("podman", "container", "exists", node).returncode != 0
