"""Shell completion of ``kubectl virt`` through kubectl's plugin completion (kubectl 1.26+).

kubectl runs ``kubectl_complete-virt ARGS... PARTIAL`` when the user presses TAB after ``kubectl virt``, and reads
cobra's answer: one candidate per line, then ``:<directive>`` (4: do not fall back to file names).  We complete
the command names, and the pod argument of ssh, vnc and console with the pods ``kubectl get pods`` lists (with
the user's -n/--context/--kubeconfig).  Why not argcomplete: it is not a dependency, and kubectl's own
completion scripts already handle bash, zsh, fish and PowerShell once the executable is on PATH.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

NO_FILE_COMP = 4
POD_COMMANDS = ("ssh", "vnc", "console")
_VALUE_FLAGS = ("-n", "--namespace", "--context", "--kubeconfig", "--endpoint", "--mode", "--port")


def _pods(flags: list[str]) -> list[str]:
    exe = shutil.which("kubectl")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, *flags, "get", "pods", "-o", "name"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.removeprefix("pod/") for line in out.stdout.split()]


def complete(args: Sequence[str], commands: Sequence[str]) -> str:
    *done, partial = list(args) or [""]
    flags: list[str] = []
    words: list[str] = []
    i = 0
    while i < len(done):
        a = done[i]
        if a in _VALUE_FLAGS and i + 1 < len(done):
            if a in ("-n", "--namespace", "--context", "--kubeconfig"):
                flags += [a, done[i + 1]]
            i += 2
            continue
        if not a.startswith("-"):
            words.append(a)
        i += 1
    candidates: list[str] = []
    if not words:
        candidates = [c for c in commands if c.startswith(partial)]
    elif words[0] in POD_COMMANDS and len(words) == 1:
        user, at, pod = partial.rpartition("@") if words[0] == "ssh" else ("", "", partial)
        candidates = [f"{user}{at}{p}" for p in _pods(flags) if p.startswith(pod)]
    return "".join(f"{c}\n" for c in candidates) + f":{NO_FILE_COMP}\n"
