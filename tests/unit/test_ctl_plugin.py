"""``kubectl virt``: kubectl's flag conventions, exit codes, cluster mode by default, and shell completion.

The kubectl binary is a recording stand-in on PATH (no cluster here): it writes its argv to a file and, for
``get pods -o name``, lists two pods -- enough to check the command lines kubectl would run."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from virtlet.ctl.completion import complete
from virtlet.ctl.main import PLUGIN_PROG, _ref, build_parser, main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_kubectl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "kubectl.argv"
    exe = tmp_path / "bin" / "kubectl"
    exe.parent.mkdir()
    exe.write_text(f"#!/bin/sh\nprintf '%s ' \"$@\" >> {log}; echo >> {log}\n"
                   "case \"$*\" in *'get pods -o name'*) echo pod/web-vm; echo pod/db-vm;; esac\nexit 7\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{exe.parent}:{os.environ['PATH']}")
    return log


def test_namespace_before_or_after_the_command() -> None:
    p = build_parser(PLUGIN_PROG)
    for argv in (["-n", "prod", "console", "vm"], ["console", "-n", "prod", "vm"],
                 ["console", "vm", "--namespace", "prod"]):
        args = p.parse_args(argv)
        assert _ref(args, args.pod) == "prod/vm", argv
    args = p.parse_args(["--context", "c1", "ssh", "--kubeconfig", "k", "root@vm"])
    assert (args.context, args.kubeconfig, args.namespace) == ("c1", "k", None)
    assert _ref(args, "other/vm") == "other/vm"  # an explicit NS/ wins over -n


def test_usage_errors_exit_1_like_kubectl(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"], prog=PLUGIN_PROG)
    assert exc.value.code == 1
    assert "error: " in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["console", "--help"], prog=PLUGIN_PROG)
    assert exc.value.code == 0
    assert "usage: kubectl virt console" in capsys.readouterr().out


def test_plugin_uses_the_kubeconfig_even_where_a_node_socket_exists(fake_kubectl: Path) -> None:
    # cluster mode: kubectl attach with the user's context and namespace; kubectl's exit code is passed on
    rc = main(["--context", "c1", "console", "-n", "prod", "vm"], prog=PLUGIN_PROG)
    assert rc == 7
    assert fake_kubectl.read_text().split() == ["--context", "c1", "-n", "prod", "attach", "-it", "pod/vm"]


def test_completion_of_commands_and_pods(fake_kubectl: Path) -> None:
    commands = ["ssh", "vnc", "console", "validate", "version"]
    assert complete(["v"], commands) == "vnc\nvalidate\nversion\n:4\n"
    assert complete(["ssh", "-n", "prod", "root@w"], commands) == "root@web-vm\n:4\n"
    assert "-n prod get pods -o name" in fake_kubectl.read_text()
    assert complete(["console", "d"], commands) == "db-vm\n:4\n"
    assert complete(["version", ""], commands) == ":4\n"


def test_entry_points_run_as_kubectl_runs_them(fake_kubectl: Path, tmp_path: Path) -> None:
    """kubectl execs ``kubectl-virt ARGS`` and ``kubectl_complete-virt ARGS``: the scripts pyproject.toml declares."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kubectl-virt"] == "virtlet.ctl.main:kubectl_plugin"
    assert scripts["kubectl_complete-virt"] == "virtlet.ctl.main:kubectl_complete"
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'runtime'}:{os.environ.get('PYTHONPATH', '')}")
    run = [sys.executable, "-c", "import sys; from virtlet.ctl.main import kubectl_plugin; sys.exit(kubectl_plugin())"]
    out = subprocess.run([*run, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("usage: kubectl virt"), out
    out = subprocess.run([*run, "vnc"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1 and "error: the following arguments are required: POD" in out.stderr, out
    comp = [sys.executable, "-c",
            "import sys; from virtlet.ctl.main import kubectl_complete; sys.exit(kubectl_complete())"]
    out = subprocess.run([*comp, "con"], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout == "console\n:4\n", out
