"""The termination message of a VM pod: the guest's termination log copied back to the kubelet's file.

The kubelet gives every container a file (``pods/<uid>/containers/<name>/<id>``) mounted at its
``terminationMessagePath`` and reads it after the container exits.  A VM gets that mount as a copy in its config
drive (``virtlet.volumes.shares``), so what the guest writes there stays in the guest.  At StopContainer, while
the VM still runs, virtletd reads the guest's file through the guest agent (``guest-file-open``/``-read``/
``-close``), at most ``MAX_MESSAGE`` bytes (the kubelet reads no more), and writes it into the kubelet's file.

Best effort and bounded: a guest without an agent, an agent that does not answer within the budget, a path
that is not readable in the guest -> nothing is copied (logged), and the stop goes on.  The guest's bytes are
written as they are; the kubelet treats them as text.  The host file is opened without following symlinks and
never created: a file the kubelet removed or replaced by something else is left alone.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
import time
from typing import Any

from virtlet.vm import guest_agent as ga

log = logging.getLogger(__name__)

#: The kubelet reads at most this many bytes of a termination message file.
MAX_MESSAGE = 4096
#: At most this long for the whole copy (it runs inside StopContainer's grace period).
MAX_BUDGET = 3.0
MIN_CALL = 0.5


def budget_for(timeout: int) -> float:
    """Seconds the copy may take in a stop with ``timeout`` seconds of grace: a quarter of it, 0.5 to 3 s."""
    return max(MIN_CALL, min(MAX_BUDGET, timeout / 4))


def read_guest_file(call: ga.Transport, path: str, limit: int, budget: float) -> bytes:
    """At most ``limit`` bytes of the guest file ``path``; raises ``ga.Agent*`` errors or ``ValueError``."""
    deadline = time.monotonic() + budget

    def left() -> float:
        return max(MIN_CALL, deadline - time.monotonic())

    handle = call({"execute": "guest-file-open", "arguments": {"path": path, "mode": "r"}}, left())
    if not isinstance(handle, int) or isinstance(handle, bool):
        raise ValueError(f"guest-file-open answered {type(handle).__name__}, not a handle")
    try:
        data = b""
        while len(data) < limit and time.monotonic() < deadline:
            reply = call({"execute": "guest-file-read", "arguments": {"handle": handle, "count": limit - len(data)}},
                         left())
            data += _chunk(reply, limit - len(data))
            if not isinstance(reply, dict) or reply.get("eof") is not False:
                break
        return data[:limit]
    finally:
        try:
            call({"execute": "guest-file-close", "arguments": {"handle": handle}}, MIN_CALL * 2)
        except (ga.AgentUnavailable, ga.AgentError, ga.AgentMisbehaved, ga.ReplyTooLarge):
            pass


def _chunk(reply: Any, room: int) -> bytes:
    if not isinstance(reply, dict) or not isinstance(reply.get("buf-b64"), str):
        raise ValueError("guest-file-read answered no 'buf-b64' string")
    text: str = reply["buf-b64"][:-(-room // 3) * 4 + 4]  # never decode more than the room left
    try:
        return base64.b64decode(text, validate=True)[:room]
    except (binascii.Error, ValueError) as exc:
        raise ValueError("guest-file-read answered invalid base64") from exc


def write_host_file(host_path: str, data: bytes) -> None:
    """Replace the content of the kubelet's existing regular file ``host_path`` with ``data``."""
    fd = os.open(host_path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{host_path!r} is not a regular file")
        os.ftruncate(fd, 0)
        os.write(fd, data[:MAX_MESSAGE])
    finally:
        os.close(fd)


def collect(call: ga.Transport, guest_path: str, host_path: str, pod: str, budget: float) -> bool:
    """Copy the guest's termination message to the host file; False (logged) when it could not be read."""
    try:
        data = read_guest_file(call, guest_path, MAX_MESSAGE, budget)
    except (ga.AgentUnavailable, ga.AgentError, ga.AgentMisbehaved, ga.ReplyTooLarge, ValueError) as exc:
        log.info("VM pod %s: termination message not read from the guest's %s: %s", pod, guest_path, exc)
        return False
    if not data:
        return True
    try:
        write_host_file(host_path, data)
    except (OSError, ValueError) as exc:
        log.warning("VM pod %s: termination message not written to %s: %s", pod, host_path, exc)
        return False
    return True
