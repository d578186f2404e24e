"""Cluster mode: the user's kubeconfig and ``kubectl`` do the streaming (through the API server).

Why kubectl: it already speaks every protocol version the API server offers and handles authentication; we
only need the pod's address on a local port.  Not testable on a machine without a cluster: the commands
built here are unit-tested, the live path is not.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

from virtlet.ctl.node import CtlError

_FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) ->")


def split_ref(ref: str) -> tuple[str, str]:
    """``NS/NAME`` or ``NAME``: (namespace or "" for "the kubeconfig context's namespace", name)."""
    ns, _, name = ref.rpartition("/")
    return ns, name


def _ns_args(ns: str) -> list[str]:
    """kubectl's convention: without -n, the current context's namespace (``default`` when it names none)."""
    return ["-n", ns] if ns else []


def kubectl(kubeconfig: str | None = None, context: str | None = None) -> list[str]:
    exe = shutil.which("kubectl")
    if exe is None:
        raise CtlError("cluster mode needs kubectl on PATH (or run virtletctl on the node with --endpoint)")
    cmd = [exe]
    if kubeconfig:
        cmd += ["--kubeconfig", kubeconfig]
    if context:
        cmd += ["--context", context]
    return cmd


def port_forward_cmd(base: list[str], ref: str, remote: int, local: int = 0) -> list[str]:
    ns, name = split_ref(ref)
    return [*base, *_ns_args(ns), "port-forward", f"pod/{name}", f"{local or ''}:{remote}"]


def attach_cmd(base: list[str], ref: str) -> list[str]:
    ns, name = split_ref(ref)
    return [*base, *_ns_args(ns), "attach", "-it", f"pod/{name}"]


def start_port_forward(cmd: list[str], timeout: float = 30.0) -> tuple[subprocess.Popen[str], int]:
    """Run ``kubectl port-forward`` and return it with the local port it chose."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = _FORWARDING.search(line)
        if m:
            return proc, int(m.group(1))
    proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    proc.wait()
    raise CtlError(f"kubectl port-forward failed: {err.strip() or 'no forwarding address printed'}")
