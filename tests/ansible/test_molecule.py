"""The molecule scenario as a (slow) test: two systemd nodes in podman, site.yml, idempotence, VM pods, reset;
and the snapshot comparison that decides whether reset.yml put a node back (fast, on temp dirs).

Why a pytest wrapper: CI runs one test command; this keeps `molecule test` in it with a bounded time and the
log attached to the failure.  Skipped when podman or molecule is missing (see docs/ansible.md, "molecule").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

@pytest.mark.slow
@pytest.mark.libvirt
@pytest.mark.network
@pytest.mark.molecule
@pytest.mark.skipif(shutil.which("podman") is None or not (BIN / "molecule").exists(),
                    reason="needs podman (apt) and molecule + molecule-plugins[podman] (pip)")
@pytest.mark.timeout(30 * 60)  # longer than the 600 s default: two nodes, site.yml twice, reset
def test_molecule_default_scenario() -> None:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", ANSIBLE_NOCOLOR="1", PY_COLORS="0",
               ANSIBLE_FORCE_COLOR="0")
    env.pop("ANSIBLE_CONFIG", None)
    result = subprocess.run([str(BIN / "molecule"), "test"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=30 * 60, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-20000:]


COMPARE = REPO / "molecule/shared/files/compare-snapshots.sh"
ALLOW = REPO / "molecule/shared/files/reset-allowed-leftovers.txt"


def _snapshot(root: Path, name: str, aspects: dict[str, list[str]]) -> Path:
    d = root / name
    d.mkdir()
    for aspect, lines in aspects.items():
        (d / aspect).write_text("".join(f"{line}\n" for line in lines))
    return d


def _compare(before: Path, after: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", str(COMPARE), str(before), str(after), str(ALLOW)], capture_output=True,
                          text=True, timeout=30, check=False)


@pytest.mark.parametrize("extra", [
    {"users": ["polkitd"], "groups": ["polkitd:"]},
    {"groups": ["kvm:", "rdma:"]},
])
def test_reset_comparison_excuses_what_debian_keeps_after_purge(tmp_path: Path, extra: dict[str, list[str]]) -> None:
    base = {"users": ["root"], "groups": ["root:"], "files": ["/etc"]}
    after = {k: v + extra.get(k, []) for k, v in base.items()}
    result = _compare(_snapshot(tmp_path, "before", base), _snapshot(tmp_path, "after", after))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("before", "after", "shown"), [
    ({"files": ["/etc"]}, {"files": ["/etc", "/etc/ansible"]}, "files + /etc/ansible"),
    ({"files": ["/etc"]}, {"files": ["/etc", "/etc/xml"]}, "files + /etc/xml"),
    ({"files": ["/etc", "/etc/cni"]}, {"files": ["/etc"]}, "files - /etc/cni"),
    ({"users": ["root", "polkitd"]}, {"users": ["root"]}, "users - polkitd"),
    ({"users": ["root"]}, {"users": ["root", "someone"]}, "users + someone"),
])
def test_reset_comparison_reports_everything_else(tmp_path: Path, before: dict[str, list[str]],
                                                  after: dict[str, list[str]], shown: str) -> None:
    result = _compare(_snapshot(tmp_path, "before", before), _snapshot(tmp_path, "after", after))
    assert result.returncode == 1
    assert shown in result.stdout.splitlines()
