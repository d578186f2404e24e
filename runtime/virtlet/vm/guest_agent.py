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
  The guest process keeps running: the agent has no command to kill what ``guest-exec`` started;
- the agent answered something that is not the QGA protocol (not JSON, ``null``, a pid that is not an integer,
  a list as status, wrong types, invalid base64, a reply larger than ``MAX_REPLY``): ``FailedPrecondition``
  saying the guest agent misbehaved.  The guest is the pod author's; its agent is input like any other, so this
  is never INTERNAL, and every agent call is bounded in time (``CALL_TIMEOUT``) and size.

Output cap (issue 13; containerd and CRI-O settled on 16 MiB after CVE-2022-1708 / CVE-2022-31030): stdout and
stderr *together* keep at most ``EXEC_OUTPUT_CAP`` (16 MiB) on every exec path; ExecSync keeps
``EXEC_SYNC_OUTPUT_CAP`` (16 MiB less 64 bytes) so its response fits the kubelet's 16 MiB CRI message limit.
Through libvirt (what virtletd uses) a reply is further limited by libvirt's RPC string size (4 MiB of base64,
about ``LIBVIRT_OUTPUT_LIMIT`` = 3 MiB of output): a command whose output is larger answers
``FailedPrecondition`` saying so (the command has run; only its output is lost).
Past the cap the output is truncated, as containerd does (no marker is added, a line is logged); when both
streams are long, each keeps at least half the cap.  Only the base64 prefix that is kept is decoded; the rest of
a reply is checked to be base64 without being decoded.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from virtlet import errors

log = logging.getLogger(__name__)

EXEC_OUTPUT_CAP = 16 << 20  # bytes of stdout + stderr kept on every exec path; the rest is dropped
EXEC_SYNC_OUTPUT_CAP = EXEC_OUTPUT_CAP - 64  # ExecSync: room for the response's own framing in 16 MiB
AGENT_STREAM_MAX = 16 << 20  # qemu-ga's own cap per stream (GUEST_EXEC_MAX_OUTPUT)
# the longest reply a well-behaved agent sends: two base64 streams of AGENT_STREAM_MAX, plus the JSON around them
MAX_REPLY = 2 * 4 * ((AGENT_STREAM_MAX + 2) // 3) + (64 << 10)
# what libvirt passes back in one agent reply: REMOTE_STRING_MAX (4 MiB) of base64 and JSON, ~3 MiB of output
LIBVIRT_OUTPUT_LIMIT = 3 << 20
MAX_INPUT = 1 << 20  # stdin bytes passed as input-data (one JSON message through libvirt)
EXIT_NOT_FOUND = 127
EXIT_CANNOT_EXECUTE = 126
POLL_FIRST = 0.02  # seconds before the first guest-exec-status; doubles up to POLL_MAX
POLL_MAX = 0.5
CALL_TIMEOUT = 10.0  # seconds one agent command may take (libvirt's own wait for the agent's reply)
# Calls during boot (issue 17): an exec sent right after StartContainer waits for the agent to connect.  ExecSync
# waits within its own timeout; a call without one (ExecSync timeout 0, streaming Exec) waits at most this long,
# enough for qemu-ga of a systemd guest booting under TCG, short enough that a guest without an agent is told so.
AGENT_WAIT_DEFAULT = 120.0
AGENT_WAIT_POLL = 0.5  # seconds between guest-ping attempts while waiting


class AgentUnavailable(Exception):
    """The agent is not connected or does not answer (what libvirt says is in the message)."""


class AgentError(Exception):
    """The agent answered a command with an error: the message is the agent's own ``desc``."""


class AgentMisbehaved(Exception):
    """The agent answered something that is not the QGA protocol (the message says what)."""


class ReplyTooLarge(Exception):
    """libvirt could not hand over a reply this large (its RPC strings stop at 4 MiB)."""


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


def misbehaved_message(pod: str, detail: str) -> str:
    return (f"VM pod {pod}: the guest agent misbehaved: {detail}; check qemu-guest-agent in the VM image "
            f"(`virtletctl ssh` works without it)")


def parse_reply(raw: str | bytes, max_reply: int = MAX_REPLY) -> Any:
    """The ``return`` value of one QGA reply; ``AgentError`` for an ``error`` reply, ``AgentMisbehaved`` for
    anything else that is not a QGA reply (checked for size before it is parsed)."""
    if len(raw) > max_reply:
        raise AgentMisbehaved(f"a reply of {len(raw)} bytes is larger than the {max_reply} bytes allowed")
    try:
        reply = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise AgentMisbehaved(f"the reply is not JSON ({str(exc)[:100]})") from exc
    if not isinstance(reply, dict):
        raise AgentMisbehaved(f"the reply is a JSON {type(reply).__name__}, not an object")
    if "error" in reply:
        err = reply["error"]
        desc = err.get("desc") if isinstance(err, dict) else None
        raise AgentError(desc if isinstance(desc, str) else str(err)[:200])
    if "return" not in reply:
        raise AgentMisbehaved("the reply has neither 'return' nor 'error'")
    return reply["return"]


class GuestAgent:
    """The guest agent of one running VM.  ``pod`` names the pod in error messages."""

    def __init__(self, transport: Transport, pod: str, *, max_output: int = EXEC_OUTPUT_CAP,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 running: Callable[[], bool] | None = None) -> None:
        self._call = transport
        self.pod = pod
        self._running = running  # is the VM still up? (asked while waiting for the agent to connect)
        self.max_output = max_output
        self._sleep = sleep
        self._clock = clock

    def ping(self, timeout: float = 5.0) -> None:
        """Return when the agent answers ``guest-ping``; ``FailedPrecondition`` when it does not."""
        try:
            self._call({"execute": "guest-ping"}, timeout)
        except (AgentUnavailable, AgentError) as exc:
            raise errors.FailedPrecondition(no_agent_message(self.pod, str(exc))) from exc
        except AgentMisbehaved as exc:
            raise errors.FailedPrecondition(misbehaved_message(self.pod, str(exc))) from exc

    def wait_connected(self, timeout: float, *, running: Callable[[], bool] | None = None,
                       alive: Callable[[], bool] | None = None) -> None:
        """Return once the agent answers ``guest-ping``, trying for up to ``timeout`` seconds (a VM that is still
        booting has no agent yet).  ``FailedPrecondition`` saying how long it waited when it never answers, or
        at once when ``running`` says the VM stopped; ``DeadlineExceeded`` when ``alive`` says the caller left.
        ``guest-ping`` changes nothing in the guest, so it is safe to repeat (``guest-exec`` is not)."""
        deadline = self._clock() + max(0.0, timeout)
        while True:
            left = deadline - self._clock()
            try:
                self._call({"execute": "guest-ping"}, max(1.0, min(5.0, left)))
                return
            except (AgentUnavailable, AgentError) as exc:
                last = str(exc)
            except AgentMisbehaved as exc:
                raise errors.FailedPrecondition(misbehaved_message(self.pod, f"guest-ping: {exc}")) from exc
            running = running or self._running
            if running is not None and not running():
                raise errors.FailedPrecondition(f"VM pod {self.pod}: the VM stopped before its guest agent answered")
            if alive is not None and not alive():
                raise errors.DeadlineExceeded(f"VM pod {self.pod}: the caller went away while waiting for the "
                                              f"guest agent to connect")
            left = deadline - self._clock()
            if left <= 0:
                raise errors.FailedPrecondition(no_agent_message(
                    self.pod, f"waited {timeout:g}s for it to connect; last: {last}"))
            self._sleep(min(AGENT_WAIT_POLL, left))

    def exec(self, argv: Sequence[str], stdin: bytes | None = None, timeout: float | None = None,
             alive: Callable[[], bool] | None = None, max_output: int | None = None,
             agent_wait: float = 0.0) -> ExecResult:
        """Run ``argv`` (no shell; ``argv[0]`` is looked up in the guest's PATH) and wait for it to end.

        ``timeout`` (seconds; ``None`` or <= 0: no limit) bounds the whole call; past it ``DeadlineExceeded``
        is raised and the guest process keeps running (the agent cannot kill it).  ``alive`` is asked between
        polls; when it says ``False`` (the caller went away) waiting stops with ``DeadlineExceeded`` too.
        ``max_output`` (default: the agent's ``max_output``) caps stdout and stderr together.
        ``agent_wait`` > 0: first wait for the agent to connect (``wait_connected``), within ``timeout`` when there
        is one, else for at most ``agent_wait`` seconds; the command's own time counts from the same start.
        """
        if not argv or not argv[0]:
            raise errors.InvalidArgument("the command to run is empty")
        if stdin is not None and len(stdin) > MAX_INPUT:
            raise errors.InvalidArgument(
                f"stdin of {len(stdin)} bytes is more than the {MAX_INPUT} bytes a VM pod exec accepts")
        deadline = self._clock() + timeout if timeout and timeout > 0 else None
        if agent_wait > 0:
            self.wait_connected(deadline - self._clock() if deadline is not None else agent_wait, alive=alive)
        args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if stdin:
            args["input-data"] = base64.b64encode(stdin).decode()
        try:
            started = self._call({"execute": "guest-exec", "arguments": args}, self._call_timeout(deadline))
        except AgentUnavailable as exc:
            raise errors.FailedPrecondition(no_agent_message(self.pod, str(exc))) from exc
        except AgentMisbehaved as exc:
            raise errors.FailedPrecondition(misbehaved_message(self.pod, f"guest-exec: {exc}")) from exc
        except AgentError as exc:
            return _spawn_failure(str(exc))
        pid = self._pid(started)
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
            except ReplyTooLarge as exc:
                raise errors.FailedPrecondition(
                    f"VM pod {self.pod}: the output of {argv[0]!r} (guest PID {pid}) is larger than the guest agent "
                    f"can hand back through libvirt ({exc}); write large output to a file in the VM") from exc
            except (AgentError, AgentMisbehaved) as exc:
                raise errors.FailedPrecondition(
                    misbehaved_message(self.pod, f"guest-exec-status for PID {pid} failed: {exc}")) from exc
            if not isinstance(status, dict):
                raise errors.FailedPrecondition(misbehaved_message(
                    self.pod, f"guest-exec-status answered a JSON {_kind(status)}, not an object"))
            exited = status.get("exited")
            if not isinstance(exited, bool):
                raise errors.FailedPrecondition(misbehaved_message(
                    self.pod, f"guest-exec-status answered 'exited' as {_kind(exited)}, not a boolean"))
            if exited:
                return self._result(status, self.max_output if max_output is None else max_output)
            wait = delay if deadline is None else min(delay, max(0.0, deadline - self._clock()))
            self._sleep(wait)
            delay = min(delay * 2, POLL_MAX)

    def _call_timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return CALL_TIMEOUT
        return max(1.0, min(CALL_TIMEOUT, deadline - self._clock()))

    def _pid(self, started: Any) -> int:
        pid = started.get("pid") if isinstance(started, dict) else None
        if not _is_int(pid) or not 0 < pid < 1 << 31:
            what = f"'pid' {_kind(pid)}" if isinstance(started, dict) else f"a JSON {_kind(started)}"
            raise errors.FailedPrecondition(misbehaved_message(
                self.pod, f"guest-exec answered {what} instead of a process id"))
        return int(pid)

    def _result(self, status: dict[str, Any], cap: int) -> ExecResult:
        try:
            code = _exit_code(status)
            out_data, err_data = _b64_field(status, "out-data"), _b64_field(status, "err-data")
            keep_out, keep_err = split_cap(_b64_size(out_data), _b64_size(err_data), cap)
            out, err = _decode_prefix(out_data, keep_out), _decode_prefix(err_data, keep_err)
        except AgentMisbehaved as exc:
            raise errors.FailedPrecondition(misbehaved_message(self.pod, f"guest-exec-status: {exc}")) from exc
        truncated = (len(out) < _b64_size(out_data) or len(err) < _b64_size(err_data)
                     or status.get("out-truncated") is True or status.get("err-truncated") is True)
        if truncated:
            log.warning("VM pod %s: exec output truncated to %d bytes (stdout and stderr together)", self.pod, cap)
        return ExecResult(code, out, err, truncated)


_WRAPPED = re.compile(r"^Guest agent command failed, error was '(.*)'$", re.DOTALL)
_B64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def _exit_code(status: dict[str, Any]) -> int:
    """The exit code a shell would report (128 + N for signal N); int32, as CRI carries it."""
    if "exitcode" in status:
        code = status["exitcode"]
        if not _is_int(code) or not -(1 << 31) <= code < 1 << 31:
            raise AgentMisbehaved(f"'exitcode' is {_kind(code)} {str(code)[:40]}, not a 32-bit integer")
        return int(code)
    if "signal" in status:
        sig = status["signal"]
        if not _is_int(sig) or not 0 < sig < 128:
            raise AgentMisbehaved(f"'signal' is {_kind(sig)} {str(sig)[:40]}, not a signal number")
        return 128 + int(sig)
    return 0


def _b64_field(status: dict[str, Any], name: str) -> str:
    data = status.get(name, "")
    if not isinstance(data, str):
        raise AgentMisbehaved(f"{name!r} is {_kind(data)}, not a base64 string")
    if len(data) % 4 or not _B64.fullmatch(data):  # checked without decoding anything
        raise AgentMisbehaved(f"{name!r} is not valid base64")
    return data


def _b64_size(data: str) -> int:
    return len(data) // 4 * 3 - (2 if data.endswith("==") else 1 if data.endswith("=") else 0)


def split_cap(out_len: int, err_len: int, cap: int) -> tuple[int, int]:
    """Bytes of stdout and stderr to keep so that together they are at most ``cap``; when both are long each
    keeps at least half."""
    keep_err = min(err_len, cap // 2)
    keep_out = min(out_len, cap - keep_err)
    keep_err = min(err_len, cap - keep_out)
    return keep_out, keep_err


def _decode_prefix(data: str, keep: int) -> bytes:
    """The first ``keep`` bytes of base64 ``data``, decoding only the characters needed for them."""
    if keep <= 0:
        return b""
    chars = min(len(data), -(-keep // 3) * 4)
    try:
        return base64.b64decode(data[:chars], validate=True)[:keep]
    except (binascii.Error, ValueError) as exc:
        raise AgentMisbehaved("output is not valid base64") from exc


def _spawn_failure(desc: str) -> ExecResult:
    wrapped = _WRAPPED.match(desc)  # qemu-ga: "Guest agent command failed, error was 'Failed to execute ...'"
    desc = wrapped.group(1) if wrapped else desc
    code = EXIT_NOT_FOUND if "No such file or directory" in desc else EXIT_CANNOT_EXECUTE
    return ExecResult(code, b"", (desc.rstrip() + "\n").encode())
