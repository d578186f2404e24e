"""Checks of the Ansible node appliance that run on the controller: lint, syntax, argument validation, and the
kvm and virtlet_runtime roles against this machine (check mode or temporary directories only).

Why here and not in molecule: these are the fast failures (bad inventory, lint, a config virtletd rejects)
that should show up in seconds, without building a node image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from virtlet import config as virtlet_config

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
INVENTORY = Path(__file__).with_name("inventory.yml")
# The Ansible tree this test owns (other folders' YAML is linted by their owners).
ANSIBLE_PATHS = ["site.yml", "roles", "playbooks", "inventories", ".ansible-lint", ".yamllint"]
ROLES = ["kvm", "libvirt", "cni", "virtlet_runtime", "criproxy", "node_label"]


def run(*argv: str, timeout: float = 300, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_FORCE_COLOR="0", PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def site(*extra: str, inventory: Path = INVENTORY) -> subprocess.CompletedProcess[str]:
    return run("ansible-playbook", "-i", str(inventory), "site.yml", "--check", *extra)


def test_yamllint_clean() -> None:
    result = run("yamllint", "--strict", *ANSIBLE_PATHS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ansible_lint_production_profile() -> None:
    result = run("ansible-lint", "--offline")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


@pytest.mark.parametrize("playbook", ["site.yml", "playbooks/site.yml", "playbooks/reset.yml"])
def test_syntax_check(playbook: str) -> None:
    result = run("ansible-playbook", "-i", str(INVENTORY), "--syntax-check", playbook)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_default_is_in_the_argument_spec_and_the_example_inventory() -> None:
    group_vars = REPO / "inventories/example/group_vars/virtlet_nodes"
    example = "".join(p.read_text() for p in group_vars.glob("*.yml"))
    for role in ROLES:
        defaults = yaml.safe_load((REPO / "roles" / role / "defaults/main.yml").read_text())
        spec = yaml.safe_load((REPO / "roles" / role / "meta/argument_specs.yml").read_text())
        options = spec["argument_specs"]["main"]["options"]
        assert set(defaults) == set(options), f"{role}: defaults and argument spec differ"
        for name in defaults:
            assert name.startswith(role + "_"), f"{role}: variable {name} lacks the role prefix"
            assert f"# {name}:" in example, f"{name} missing from inventories/example"


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("kvm_mode", "fast", "value of kvm_mode must be one of: auto, kvm, tcg"),
    ("kvm_nested", "maybe", "argument 'kvm_nested' is of type"),
    ("libvirt_manage_services", "sometimes", "argument 'libvirt_manage_services' is of type"),
    ("virtlet_runtime_kvm", "fast", "value of virtlet_runtime_kvm must be one of"),
    ("criproxy_restart_kubelet", "perhaps", "argument 'criproxy_restart_kubelet' is of type"),
    ("cni_default_network", "2", "argument 'cni_default_network' is of type"),
])
def test_bad_variable_fails_validation_before_any_role_runs(variable: str, value: str, expected: str) -> None:
    result = site("-e", f"{variable}={value}")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert expected in out, out
    assert "Validation of arguments failed" in out, out
    # The failing play is the validation play: no role task started, nothing changed.
    assert "TASK [kvm :" not in out, out
    assert "changed=0" in out, out


def test_bad_variable_in_an_inventory_file(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    (inventory / "hosts.yml").write_text(INVENTORY.read_text())
    (inventory / "group_vars" / "virtlet_nodes.yml").write_text("---\nkvm_mode: fast\nkvm_nested: maybe\n")
    result = site(inventory=inventory / "hosts.yml")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "kvm_mode" in out and "kvm_nested" in out, out
    assert "TASK [kvm :" not in out, out


def test_good_variables_pass_validation() -> None:
    result = site("--tags", "validate-only", "-e", "kvm_mode=tcg", "-e", "kvm_nested=true",
                  "-e", "virtlet_runtime_kvm=off")
    assert result.returncode == 0, result.stdout + result.stderr


def probe_verdict() -> dict[str, object]:
    out = subprocess.run([sys.executable, str(REPO / "roles/kvm/files/kvm_probe.py"), "--timeout", "5"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out)


def kvm_role(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    playbook = tmp_path / "kvm.yml"
    playbook.write_text(yaml.safe_dump([{
        "name": "kvm role", "hosts": "virtlet_nodes", "gather_facts": False,
        "roles": [{"role": "kvm"}]}]))
    return run("ansible-playbook", "-i", str(INVENTORY), str(playbook), "--check",
               "-e", "kvm_load_modules=false", "-e", "kvm_probe_timeout=5",
               "-e", f"kvm_fact_dir={tmp_path / 'facts'}", *extra)


def test_kvm_role_reports_the_probe_decision(tmp_path: Path) -> None:
    verdict = probe_verdict()
    assert verdict["tcg_works"], verdict
    result = kvm_role(tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    if verdict["kvm_works"]:
        assert "KVM works: VM pods use hardware acceleration" in out, out
    else:
        assert "TCG SELECTED" in out, out
    assert not (tmp_path / "facts").exists(), "check mode must not write the fact file"


def test_kvm_mode_kvm_is_fatal_without_working_kvm(tmp_path: Path) -> None:
    if probe_verdict()["kvm_works"]:
        pytest.skip("KVM works on this machine")
    result = kvm_role(tmp_path, "-e", "kvm_mode=kvm")
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "KVM does not work on localhost" in out and "kvm_mode=auto" in out, out


def test_runtime_config_is_accepted_by_virtletd(tmp_path: Path) -> None:
    """The role's virtlet.yaml and translation files, written for real into a temp dir, load in virtletd."""
    etc = tmp_path / "etc"
    playbook = tmp_path / "config.yml"
    translations = [{"name": "tiny", "translations": [{"name": "tiny", "url": "http://127.0.0.1:1/tiny.qcow2"}]},
                    {"name": "regexp", "prefix": "ex", "translations": [
                        {"regexp": "^img-(.*)$", "url": "http://127.0.0.1:1/\\1.qcow2"}]}]
    playbook.write_text(yaml.safe_dump([{
        "name": "config only", "hosts": "virtlet_nodes", "gather_facts": False,
        "vars": {"kvm_detected_mode": "tcg"},
        "tasks": [{"name": "config", "ansible.builtin.include_role": {
            "name": "virtlet_runtime", "tasks_from": "config.yml"}}]}]))
    common = ["-i", str(INVENTORY), str(playbook),
              "-e", f"virtlet_runtime_config_dir={etc}",
              "-e", f"virtlet_runtime_image_translations_dir={etc}/images",
              "-e", f"virtlet_runtime_state_dir={tmp_path}/state",
              "-e", f"virtlet_runtime_image_dir={tmp_path}/img",
              "-e", f"virtlet_runtime_fact_dir={tmp_path}/facts",
              "-e", "virtlet_runtime_systemd=false", "-e", "virtlet_runtime_log_level=debug"]
    extra = ["-e", json.dumps({"virtlet_runtime_image_translations": translations})]
    first = run("ansible-playbook", *common, *extra)
    assert first.returncode == 0, first.stdout + first.stderr
    cfg = virtlet_config.load(["--config", str(etc / "virtlet.yaml")], environ={})
    assert cfg.kvm == "off" and cfg.log_level == "debug"
    assert cfg.image_translations_dir == etc / "images"
    # translation files may hold TLS client keys: root-only
    assert (etc / "images").stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in (etc / "images").iterdir()} == {
        "tiny.yaml": 0o600, "regexp.yaml": 0o600}
    tiny = yaml.safe_load((etc / "images" / "tiny.yaml").read_text())
    assert tiny == {"translations": [{"name": "tiny", "url": "http://127.0.0.1:1/tiny.qcow2"}]}
    again = run("ansible-playbook", *common, *extra)
    assert again.returncode == 0 and "changed=0" in again.stdout, again.stdout + again.stderr
    # Dropping a translation from the list removes the file the role wrote for it.
    fewer = ["-e", json.dumps({"virtlet_runtime_image_translations": translations[:1]})]
    third = run("ansible-playbook", *common, *fewer)
    assert third.returncode == 0, third.stdout + third.stderr
    assert sorted(p.name for p in (etc / "images").iterdir()) == ["tiny.yaml"]
