"""Per-RPC preconditions, each declared once: required request fields, a running container, a READY sandbox.

Every check raises the errors vocabulary (``INVALID_ARGUMENT`` for a missing field, ``FAILED_PRECONDITION``
for a state) with one message per condition, naming the RPC so the user knows which call was refused:

- ``require_cmd``: ExecSync and Exec (the CRI servicer and the streaming backend's URL check);
- ``require_stdio``: Exec and Attach need at least one of stdin, stdout and stderr;
- ``container_running``: ExecSync, Exec, Attach (at the CRI call and again when the URL is used),
  ReopenContainerLog;
- ``sandbox_ready``: CreateContainer (``VmManager.create`` before any work, and ``StateStore.add_container``
  again inside the transaction that adds the record), PortForward (at the CRI call and at each connection).

These look at the records, i.e. what the kubelet was told.  ``VmManager.guest_agent`` additionally asks
libvirt whether the domain is active, because a record can still say RUNNING while the VM's exit event is
on its way; that is a different question (and a different message) and stays there.
"""

from __future__ import annotations

from collections.abc import Sequence

from virtlet import errors
from virtlet.state.states import CONTAINER_RUNNING, SANDBOX_READY


def require_cmd(rpc: str, cmd: Sequence[str]) -> None:
    """``cmd`` names a program: INVALID_ARGUMENT otherwise."""
    if not cmd or not cmd[0]:
        raise errors.InvalidArgument(f"{rpc}: cmd is required (the program and its arguments)")


def require_stdio(rpc: str, stdin: bool, stdout: bool, stderr: bool) -> None:
    """At least one stream is asked for: INVALID_ARGUMENT otherwise."""
    if not (stdin or stdout or stderr):
        raise errors.InvalidArgument(f"{rpc}: at least one of stdin, stdout and stderr is required")


def container_running(rpc: str, container_id: str, state: str) -> None:
    """The container's record is RUNNING: FAILED_PRECONDITION otherwise."""
    if state != CONTAINER_RUNNING:
        raise errors.FailedPrecondition(
            f"{rpc}: container {container_id} is {state}; only a running VM accepts {rpc}")


def sandbox_ready(rpc: str, sandbox_id: str, state: str) -> None:
    """The sandbox's record is READY: FAILED_PRECONDITION otherwise."""
    if state != SANDBOX_READY:
        raise errors.FailedPrecondition(f"{rpc}: pod sandbox {sandbox_id} is {state}; only a READY sandbox "
                                        f"accepts {rpc}")
