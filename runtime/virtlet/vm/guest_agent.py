"""Commands in a VM through the QEMU guest agent: what CRI ``ExecSync`` (exec probes) and ``Exec`` run on.

Why the guest agent: a VM pod has no process namespace virtletd could enter, and SSH needs keys and a network.
The agent (``qemu-ga`` in the guest, on the virtio-serial port ``org.qemu.guest_agent.0`` every virtlet domain
has) runs a command and hands back its exit status and captured output.  virtletd speaks to it only through
libvirt (``virDomainQemuAgentCommand``), which owns the channel socket and its synchronisation.

The protocol used: ``guest-exec`` (``path``, ``arg``, ``input-data`` base64, ``capture-output``) answers a
guest PID at once; ``guest-exec-status`` answers ``exited`` and, once exited, ``exitcode`` (or ``signal``)
and base64 ``out-data``/``err-data``.  The agent buffers all output until the process ends, so output arrives
in one piece at the end: fine for probes and one-shot commands, useless for interactive ones.

Outcomes, chosen to match what a shell and the kubelet expect:

- the command ran: its exit code, stdout and stderr; killed by signal N -> exit code 128 + N (as a shell says);
- the agent could not start it: the agent's error text as stderr, exit code **127** when the program does not
  exist ("No such file or directory", a shell's "command not found") and **126** otherwise (permission
  denied, not executable: a shell's "cannot execute").  An exec probe then fails with a message saying why,
  exactly like a probe whose command is missing in a container image;
- the agent is not there (not installed, not started yet, VM not running): ``FailedPrecondition``;
- the command did not end within ``timeout``: ``DeadlineExceeded``, which the kubelet reports as a probe timeout.
  The guest process keeps running: the agent has no command to kill what ``guest-exec`` started.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from virtlet import errors

log = logging.getLogger(__name__)

MAX_OUTPUT = 1 << 20  # bytes kept per stream; the rest is dropped (the agent itself stops at 16 MiB)
MAX_INPUT = 1 << 20  # stdin bytes passed as input-data (one JSON message through libvirt)
EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXECUTE = 126
POLL_FIRST = 0.02  # seconds before the first guest-exec-status; doubles up to POLL_MAX
POLL_MAX = 0.5
CALL_TIMEOUT = 10.0  # seconds one agent command may take (libvirt's own wait for the agent's reply)


class AgentUnavailable(Exception):
    """The agent is not connected or does not answer (what libvirt says is in the message)."""


class AgentError(Exception):
    """The agent answered a command with an error: the message is the agent's own ``desc``."""


# (command, timeout in seconds) -> the reply's "return" value; raises AgentUnavailable or AgentError
Transport = Callable[[dict[str, Any], float], Any]


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    truncated: bool = False  # some output was dropped (over the cap here or in the agent)


def no_agent_message(pod: str, detail: str = "") -> str:
    why = f" ({detail})" if detail else ""
    return (f"VM pod {pod}: the guest agent does not answer{why}; the image needs qemu-guest-agent running on "
            f"the virtio-serial port org.qemu.guest_agent.0 (`virtletctl ssh` works without it)")


class GuestAgent:
    """The guest agent of one running VM.  ``pod`` names the pod in error messages."""

    def __init__(self, transport: Transport, pod: str, *, max_output: int = MAX_OUTPUT,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> None:
        self._call = transport
        self.pod = pod
        self.max_output = max_output
        self._sleep = sleep
        self._clock = clock

    def ping(self, timeout: float = 5.0) -> None:
        """Return when the agent answers ``guest-ping``; ``FailedPrecondition`` when it does not."""
        try:
            self._call({"execute": "guest-ping"}, timeout)
        except (AgentUnavailable, AgentError) as exc:
            raise errors.FailedPrecondition(no_agent_message(self.pod, str(exc))) from exc

    def exec(self, argv: Sequence[str], stdin: bytes | None = None, timeout: float | None = None,
             alive: Callable[[], bool] | None = None) -> ExecResult:
        """Run ``argv`` (no shell; ``argv[0]`` is looked up in the guest's PATH) and wait for it to end.

        ``timeout`` (seconds; ``None`` or <= 0: no limit) bounds the whole call; past it ``DeadlineExceeded``
        is raised and the guest process keeps running (the agent cannot kill it).  ``alive`` is asked between
        polls; when it says ``False`` (the caller went away) waiting stops with ``DeadlineExceeded`` too.
        """
        if not argv or not argv[0]:
            raise errors.InvalidArgument("the command to run is empty")
        if stdin is not None and len(stdin) > MAX_INPUT:
            raise errors.InvalidArgument(
                f"stdin of {len(stdin)} bytes is more than the {MAX_INPUT} bytes a VM pod exec accepts")
        deadline = self._clock() + timeout if timeout and timeout > 0 else None
        args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if stdin:
            args["input-data"] = base64.b64encode(stdin).decode()
        try:
            started = self._call({"execute": "guest-exec", "arguments": args}, self._call_timeout(deadline))
        except AgentUnavailable as exc:
            raise errors.FailedPrecondition(no_agent_message(self.pod, str(exc))) from exc
        except AgentError as exc:
            return _spawn_failure(str(exc))
        pid = int(started["pid"])
        delay = POLL_FIRST
        while True:
            if alive is not None and not alive():
                raise errors.DeadlineExceeded(f"VM pod {self.pod}: the caller went away before {argv[0]!r} "
                                              f"(guest PID {pid}) ended; it keeps running in the guest")
            if deadline is not None and self._clock() >= deadline:
                raise errors.DeadlineExceeded(
                    f"VM pod {self.pod}: {argv[0]!r} did not finish within {timeout:g}s; it keeps running in "
                    f"the guest as PID {pid} (the guest agent cannot stop it)")
            try:
                status = self._call({"execute": "guest-exec-status", "arguments": {"pid": pid}},
                                    self._call_timeout(deadline))
            except AgentUnavailable as exc:
                raise errors.FailedPrecondition(
                    no_agent_message(self.pod, f"{exc}; {argv[0]!r} may still run as guest PID {pid}")) from exc
            except AgentError as exc:
                raise errors.Internal(f"VM pod {self.pod}: guest-exec-status for PID {pid} failed: {exc}") from exc
            if status.get("exited"):
                return self._result(status)
            wait = delay if deadline is None else min(delay, max(0.0, deadline - self._clock()))
            self._sleep(wait)
            delay = min(delay * 2, POLL_MAX)

    def _call_timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return CALL_TIMEOUT
        return max(1.0, min(CALL_TIMEOUT, deadline - self._clock()))

    def _result(self, status: dict[str, Any]) -> ExecResult:
        if "exitcode" in status:
            code = int(status["exitcode"])
        elif "signal" in status:
            code = 128 + int(status["signal"])
        else:
            code = 0
        out, cut_out = _decode(status.get("out-data", ""), self.max_output)
        err, cut_err = _decode(status.get("err-data", ""), self.max_output)
        truncated = cut_out or cut_err or bool(status.get("out-truncated")) or bool(status.get("err-truncated"))
        if truncated:
            log.info("VM pod %s: exec output truncated (cap %d bytes per stream)", self.pod, self.max_output)
        return ExecResult(code, out, err, truncated)


_WRAPPED = re.compile(r"^Guest agent command failed, error was '(.*)'$", re.DOTALL)


def _decode(data: str, cap: int) -> tuple[bytes, bool]:
    raw = base64.b64decode(data) if data else b""
    return raw[:cap], len(raw) > cap


def _spawn_failure(desc: str) -> ExecResult:
    wrapped = _WRAPPED.match(desc)  # qemu-ga: "Guest agent command failed, error was 'Failed to execute ...'"
    desc = wrapped.group(1) if wrapped else desc
    code = EXIT_NOT_FOUND if "No such file or directory" in desc else EXIT_CANNOT_EXECUTE
    return ExecResult(code, b"", (desc.rstrip() + "\n").encode())


# -- libvirt ------------------------------------------------------------------------------------------------
def libvirt_transport(dom: Any) -> Transport:
    """Agent commands for ``dom`` (a ``libvirt.virDomain``) through ``libvirt_qemu.qemuAgentCommand``.

    libvirt reports an agent that is not connected, not synchronised or silent as ``VIR_ERR_AGENT_UNRESPONSIVE``
    / ``VIR_ERR_AGENT_UNSYNCED`` (and a stopped domain as ``VIR_ERR_OPERATION_INVALID``): those are
    ``AgentUnavailable``.  An error the agent itself answered comes as an internal error "unable to execute
    QEMU agent command 'NAME': DESC": that is ``AgentError(DESC)``.
    """
    import libvirt
    import libvirt_qemu

    unavailable = {libvirt.VIR_ERR_AGENT_UNRESPONSIVE, libvirt.VIR_ERR_OPERATION_INVALID,
                   getattr(libvirt, "VIR_ERR_AGENT_UNSYNCED", -1),
                   getattr(libvirt, "VIR_ERR_AGENT_COMMAND_TIMEOUT", -1)}

    def call(command: dict[str, Any], timeout: float) -> Any:
        try:
            reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(command), max(1, math.ceil(timeout)), 0)
        except libvirt.libvirtError as exc:
            text = exc.get_error_message() or str(exc)
            if exc.get_error_code() in unavailable:
                raise AgentUnavailable(text) from exc
            marker = "unable to execute QEMU agent command"
            if marker in text:
                raise AgentError(text.split("': ", 1)[-1]) from exc
            raise AgentUnavailable(text) from exc
        return json.loads(reply).get("return") if reply else None

    return call
