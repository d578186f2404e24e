"""The guest-agent exec protocol against a fake agent (base64, polling, exit codes, errors, timeout, output cap),
the ExecSync/Exec servicer checks, and the exec session of the streaming server."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.unit.test_store import _container, _sandbox
from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.runtime_service import RuntimeServicer
from virtlet.state import store as st
from virtlet.stream.client import ExecClient
from virtlet.stream.model import ExecRequest
from virtlet.stream.server import StreamServer
from virtlet.vm import guest_agent as ga


class FakeAgent:
    """Answers guest-exec / guest-exec-status like qemu-ga; ``polls`` status replies say "still running"."""

    def __init__(self, *, exitcode: int | None = 0, signal: int | None = None, out: bytes = b"", err: bytes = b"",
                 polls: int = 2, spawn_error: str | None = None, unavailable: bool = False,
                 out_truncated: bool = False) -> None:
        self.exitcode, self.signal, self.out, self.err = exitcode, signal, out, err
        self.polls = polls
        self.spawn_error = spawn_error
        self.unavailable = unavailable
        self.out_truncated = out_truncated
        self.calls: list[tuple[dict[str, Any], float]] = []

    def __call__(self, command: dict[str, Any], timeout: float) -> Any:
        self.calls.append((command, timeout))
        if self.unavailable:
            raise ga.AgentUnavailable("Guest agent is not responding: QEMU guest agent is not connected")
        name = command["execute"]
        if name == "guest-ping":
            return {}
        if name == "guest-exec":
            if self.spawn_error:
                raise ga.AgentError(self.spawn_error)
            return {"pid": 42}
        assert name == "guest-exec-status" and command["arguments"] == {"pid": 42}
        if self.polls > 0:
            self.polls -= 1
            return {"exited": False}
        reply: dict[str, Any] = {"exited": True}
        if self.exitcode is not None:
            reply["exitcode"] = self.exitcode
        if self.signal is not None:
            reply["signal"] = self.signal
        if self.out:
            reply["out-data"] = base64.b64encode(self.out).decode()
        if self.err:
            reply["err-data"] = base64.b64encode(self.err).decode()
        if self.out_truncated:
            reply["out-truncated"] = True
        return reply


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def agent(fake: FakeAgent, clock: Clock | None = None, **kw: Any) -> ga.GuestAgent:
    clock = clock or Clock()
    return ga.GuestAgent(fake, "default/vm", sleep=clock.sleep, clock=clock, **kw)


def test_exec_sends_argv_and_stdin_base64_and_decodes_output() -> None:
    fake = FakeAgent(exitcode=3, out=b"out\n", err=b"\xff err\n")
    res = agent(fake).exec(["sh", "-c", "exit 3"], stdin=b"in\x00put", timeout=10)
    assert res == ga.ExecResult(3, b"out\n", b"\xff err\n")
    first = fake.calls[0][0]
    assert first == {"execute": "guest-exec", "arguments": {
        "path": "sh", "arg": ["-c", "exit 3"], "capture-output": True,
        "input-data": base64.b64encode(b"in\x00put").decode()}}


def test_polls_back_off_and_stay_bounded() -> None:
    clock = Clock()
    agent(FakeAgent(polls=8), clock).exec(["true"])
    assert clock.sleeps[0] == ga.POLL_FIRST
    assert all(b >= a for a, b in zip(clock.sleeps, clock.sleeps[1:], strict=False))
    assert max(clock.sleeps) == ga.POLL_MAX and len(clock.sleeps) == 8


def test_signal_is_128_plus_n_like_a_shell() -> None:
    assert agent(FakeAgent(exitcode=None, signal=9)).exec(["x"]).exit_code == 137


@pytest.mark.parametrize(("desc", "code"), [
    ("Guest agent command failed, error was 'Failed to execute child process “nope” (No such file or directory)'",
     127),
    ("Guest agent command failed, error was 'Failed to execute child process “/etc” (Permission denied)'", 126)])
def test_spawn_failure_is_a_shell_like_exit_code(desc: str, code: int) -> None:
    res = agent(FakeAgent(spawn_error=desc)).exec(["nope"])
    assert res.exit_code == code
    assert res.stderr.startswith(b"Failed to execute child process") and res.stderr.endswith(b")\n")


def test_no_agent_is_failed_precondition_naming_the_pod_and_the_way_out() -> None:
    with pytest.raises(errors.FailedPrecondition) as exc:
        agent(FakeAgent(unavailable=True)).exec(["true"])
    msg = str(exc.value)
    assert "VM pod default/vm" in msg and "qemu-guest-agent" in msg and "virtletctl ssh" in msg
    with pytest.raises(errors.FailedPrecondition):
        agent(FakeAgent(unavailable=True)).ping()
    agent(FakeAgent()).ping()


def test_timeout_is_deadline_exceeded_and_says_the_process_keeps_running() -> None:
    clock = Clock()
    fake = FakeAgent(polls=10**6)
    with pytest.raises(errors.DeadlineExceeded) as exc:
        agent(fake, clock).exec(["sleep", "100"], timeout=2)
    assert "within 2s" in str(exc.value) and "keeps running" in str(exc.value) and "PID 42" in str(exc.value)
    assert clock.now == pytest.approx(2.0)  # the last sleep is cut to the deadline
    assert all(1 <= t <= ga.CALL_TIMEOUT for _, t in fake.calls)


def test_caller_gone_stops_waiting() -> None:
    with pytest.raises(errors.DeadlineExceeded):
        agent(FakeAgent(polls=10**6)).exec(["sleep", "100"], alive=lambda: False)


def test_output_cap() -> None:
    res = agent(FakeAgent(out=b"x" * 100, err=b"e" * 10), max_output=16).exec(["yes"])
    assert (res.stdout, res.stderr, res.truncated) == (b"x" * 16, b"e" * 10, True)
    assert agent(FakeAgent(out=b"x", out_truncated=True)).exec(["x"]).truncated


def test_bad_requests() -> None:
    with pytest.raises(errors.InvalidArgument):
        agent(FakeAgent()).exec([])
    with pytest.raises(errors.InvalidArgument):
        agent(FakeAgent()).exec(["cat"], stdin=b"x" * (ga.MAX_INPUT + 1))


# -- servicer ---------------------------------------------------------------------------------------------------
class Context:
    def is_active(self) -> bool:
        return True


class FakeVms:
    def __init__(self, fake: FakeAgent) -> None:
        self.fake = fake

    def guest_agent(self, cid: str) -> ga.GuestAgent:
        return agent(self.fake)


@pytest.fixture
def servicer(tmp_path: Path) -> RuntimeServicer:
    store = st.StateStore(tmp_path / "state.db")
    for sid, cid in (("s1", "run"), ("s2", "made")):
        store.add_sandbox(_sandbox(sid, state=st.SANDBOX_READY, uid=sid))
        store.add_container(_container(cid, sid))
    store.update_container("run", state=st.CONTAINER_RUNNING)
    sandboxes: Any = type("Sandboxes", (), {"store": store})()
    svc = RuntimeServicer(sandboxes, lambda: [])
    svc.containers = FakeVms(FakeAgent(exitcode=0, out=b"hi\n"))
    return svc


def test_exec_sync_runs_in_a_running_vm(servicer: RuntimeServicer) -> None:
    resp = servicer.ExecSync(api.ExecSyncRequest(container_id="run", cmd=["echo", "hi"], timeout=5), Context())
    assert (resp.stdout, resp.stderr, resp.exit_code) == (b"hi\n", b"", 0)


@pytest.mark.parametrize(("request_", "error"), [
    (api.ExecSyncRequest(container_id="gone", cmd=["true"]), errors.NotFound),
    (api.ExecSyncRequest(container_id="made", cmd=["true"]), errors.FailedPrecondition),
    (api.ExecSyncRequest(container_id="run", cmd=[]), errors.InvalidArgument),
    (api.ExecSyncRequest(container_id="", cmd=["true"]), errors.InvalidArgument)])
def test_exec_sync_errors(servicer: RuntimeServicer, request_: Any, error: type) -> None:
    with pytest.raises(error):
        servicer.ExecSync(request_, Context())


def test_exec_with_tty_is_refused_with_the_alternatives(servicer: RuntimeServicer) -> None:
    with pytest.raises(errors.FailedPrecondition) as exc:
        servicer.Exec(api.ExecRequest(container_id="run", cmd=["sh"], stdin=True, stdout=True, tty=True), Context())
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "kubectl attach -it" in str(exc.value) and "virtletctl ssh" in str(exc.value)


# -- the exec session through the real streaming server ---------------------------------------------------------
class ExecBackend:
    def __init__(self) -> None:
        self.stdin: list[bytes | None] = []

    def run_exec(self, container_id: str, cmd: tuple[str, ...], stdin: bytes | None, alive: Any) -> ga.ExecResult:
        self.stdin.append(stdin)
        if container_id == "broken":
            raise errors.FailedPrecondition("the guest agent does not answer")
        return ga.ExecResult(int(cmd[-1]), b"out:" + (stdin or b""), b"err\n")


@pytest.fixture
def exec_server() -> Any:
    backend = ExecBackend()
    srv = StreamServer("127.0.0.1:0", backend).start()  # type: ignore[arg-type]
    try:
        yield srv, backend
    finally:
        srv.stop()


def _run(srv: StreamServer, req: ExecRequest, stdin: bytes = b"", **kw: Any) -> tuple[bytes, bytes, Any]:
    client = ExecClient(srv.exec_url(req), stdin=req.stdin, **kw)
    try:
        return client.run(stdin, timeout=10)
    finally:
        client.close()


def test_stream_exec_exit_code_on_the_error_stream(exec_server: Any) -> None:
    srv, backend = exec_server
    out, err, status = _run(srv, ExecRequest("c", ("sh", "7"), stdin=True), stdin=b"a" * 100_000)
    assert (out, err) == (b"out:" + b"a" * 100_000, b"err\n")
    assert status["reason"] == "NonZeroExitCode" and ExecClient.exit_code(status) == 7
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "7"}]
    out, err, status = _run(srv, ExecRequest("c", ("true", "0")))
    assert status == {"metadata": {}, "status": "Success"} and ExecClient.exit_code(status) == 0
    assert backend.stdin[-1] is None  # no stdin stream: no input-data
    # the v2 protocol has no JSON Status: the exit code travels as text
    _, _, status = _run(srv, ExecRequest("c", ("false", "1")), protocols=["v2.channel.k8s.io"])
    assert status == "command terminated with non-zero exit code: exit status 1"


def test_stream_exec_failure_is_an_internal_error_status(exec_server: Any) -> None:
    srv, _ = exec_server
    _, _, status = _run(srv, ExecRequest("broken", ("true", "0")))
    assert status["status"] == "Failure" and status["reason"] == "InternalError"
    assert "guest agent does not answer" in status["message"]


def test_stream_exec_over_websocket_v5(exec_server: Any) -> None:
    from virtlet.stream.client import upgrade
    from virtlet.stream.websocket import FrameReader, encode_frame

    srv, _ = exec_server
    up = upgrade(srv.exec_url(ExecRequest("c", ("x", "4"), stdin=True)), ["v5.channel.k8s.io"],
                 transport="websocket", method="GET")
    sock = up.sock
    try:
        sock.sendall(encode_frame(0x2, b"\x00piped", mask=True) + encode_frame(0x2, b"\xff\x00", mask=True))
        reader = FrameReader(sock, up.rest, expect_masked=False)
        got: dict[int, bytes] = {}
        while 3 not in got:
            opcode, payload = reader.message()
            if opcode == 0x8:
                break
            got[payload[0]] = got.get(payload[0], b"") + payload[1:]
    finally:
        sock.close()
    assert got[1] == b"out:piped" and got[2] == b"err\n"
    assert json.loads(got[3])["details"]["causes"][0]["message"] == "4"
