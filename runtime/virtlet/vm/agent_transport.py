"""How virtletd's guest-agent commands reach ``qemu-ga`` (the ``Transport`` of ``virtlet.vm.guest_agent``): through
libvirt for the VMs it runs, or over a unix socket of the agent's own (tests feed real, misbehaving bytes that
way).  Both map every failure to the agent exceptions of ``guest_agent`` and bound each call in time and size."""

from __future__ import annotations

import json
import math
import socket
import time
from typing import Any

from virtlet.vm.guest_agent import (
    LIBVIRT_OUTPUT_LIMIT,
    MAX_REPLY,
    AgentError,
    AgentMisbehaved,
    AgentUnavailable,
    ReplyTooLarge,
    Transport,
    parse_reply,
)


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
            if exc.get_error_code() == libvirt.VIR_ERR_RPC and "encode message payload" in text:
                # libvirtd could not send the reply: remote strings stop at 4 MiB (~3 MiB of exec output)
                raise ReplyTooLarge(f"libvirt: {text}; its limit is about {LIBVIRT_OUTPUT_LIMIT >> 20} MiB") from exc
            marker = "unable to execute QEMU agent command"
            if marker in text:
                raise AgentError(text.split("': ", 1)[-1]) from exc
            raise AgentUnavailable(text) from exc
        if not isinstance(reply, str) or not reply:
            raise AgentMisbehaved("libvirt passed an empty reply")
        return parse_reply(reply)

    return call


def socket_transport(path: str, *, max_reply: int = MAX_REPLY) -> Transport:
    """Agent commands over a unix socket speaking QGA directly (one JSON object per line each way).

    virtletd talks to its VMs' agents through libvirt (``libvirt_transport``), which owns their channel
    sockets; this transport is for an agent on a socket of its own (``qemu -chardev socket,server=on``) and is
    how tests feed real, misbehaving bytes through ``parse_reply``.  Each call connects, sends one command and
    reads one reply line within ``timeout`` seconds *in total* and at most ``max_reply`` bytes: an agent that
    never answers is ``AgentUnavailable``, one that sends too much or no line end in time is cut off.
    """

    def call(command: dict[str, Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(path)
                sock.sendall(json.dumps(command).encode() + b"\n")
            except OSError as exc:
                raise AgentUnavailable(f"cannot reach the agent socket: {exc}") from exc
            buf = bytearray()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentUnavailable(f"no complete reply within {timeout:g}s")
                sock.settimeout(left)
                try:
                    data = sock.recv(min(1 << 16, max_reply + 1 - len(buf)))
                except TimeoutError as exc:
                    raise AgentUnavailable(f"no complete reply within {timeout:g}s") from exc
                except OSError as exc:
                    raise AgentUnavailable(f"agent socket failed: {exc}") from exc
                if not data:
                    raise AgentUnavailable("the agent closed the connection before a complete reply")
                end = data.find(b"\n")
                if end >= 0:
                    buf += data[:end]
                    break
                buf += data
                if len(buf) > max_reply:
                    raise AgentMisbehaved(f"a reply of more than {max_reply} bytes")
        return parse_reply(bytes(buf), max_reply)

    return call
