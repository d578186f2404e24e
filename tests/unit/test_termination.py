"""The termination message copy: bounded reads from a (fake) guest agent, safe writes to the host file."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from virtlet.vm import guest_agent as ga
from virtlet.vm import termination


class FakeAgent:
    def __init__(self, content: bytes, chunk: int = 1000, read_reply: Any = None) -> None:
        self.content, self.chunk, self.read_reply = content, chunk, read_reply
        self.pos, self.calls, self.closed = 0, [], False

    def __call__(self, cmd: dict[str, Any], timeout: float) -> Any:
        self.calls.append(cmd)
        name = cmd["execute"]
        if name == "guest-file-open":
            if cmd["arguments"]["path"] == "/missing":
                raise ga.AgentError("No such file or directory")
            return 7
        if name == "guest-file-close":
            self.closed = True
            return {}
        if self.read_reply is not None:
            return self.read_reply
        n = min(self.chunk, cmd["arguments"]["count"])
        part = self.content[self.pos:self.pos + n]
        self.pos += len(part)
        return {"count": len(part), "buf-b64": base64.b64encode(part).decode(), "eof": self.pos >= len(self.content)}


def test_reads_at_most_the_kubelets_limit_in_chunks() -> None:
    agent = FakeAgent(b"x" * 10000)
    assert termination.read_guest_file(agent, "/dev/termination-log", 4096, 3.0) == b"x" * 4096
    assert agent.closed and all(c["arguments"].get("count", 0) <= 4096 for c in agent.calls)


def test_hostile_replies(tmp_path: Path) -> None:
    host = tmp_path / "log"
    host.write_text("")
    for reply in ({"buf-b64": "!!!"}, {"buf-b64": 5}, [], {"buf-b64": base64.b64encode(b"y" * 9000).decode()}):
        agent = FakeAgent(b"", read_reply=reply)
        ok = termination.collect(agent, "/t", str(host), "ns/p", 1.0)
        assert agent.closed
        assert len(host.read_bytes()) <= 4096
        expected = isinstance(reply, dict) and reply.get("buf-b64") not in ("!!!", 5)
        assert ok == expected, reply
    assert not termination.collect(FakeAgent(b""), "/missing", str(host), "ns/p", 1.0)


def test_host_file_is_never_followed_nor_created(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert not termination.collect(FakeAgent(b"msg"), "/t", str(link), "ns/p", 1.0)
    assert target.read_text() == "keep"
    assert not termination.collect(FakeAgent(b"msg"), "/t", str(tmp_path / "gone"), "ns/p", 1.0)
    assert not (tmp_path / "gone").exists()
    real = tmp_path / "real"
    real.write_text("old content that is longer")
    assert termination.collect(FakeAgent(b"msg"), "/t", str(real), "ns/p", 1.0)
    assert real.read_bytes() == b"msg"


@pytest.mark.parametrize("timeout,budget", [(0, 0.5), (4, 1.0), (30, 3.0)])
def test_budget(timeout: int, budget: float) -> None:
    assert termination.budget_for(timeout) == budget
