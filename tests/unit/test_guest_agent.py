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
from virtlet.stream.client import AttachClient, ExecClient
from virtlet.stream.model import ExecRequest
from virtlet.stream.server import StreamServer
from virtlet.vm import agent_transport as at
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


class ConnectsLater(FakeAgent):
    """An agent that is not connected for the first ``misses`` calls (a guest that is still booting)."""

    def __init__(self, misses: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.misses = misses

    def __call__(self, command: dict[str, Any], timeout: float) -> Any:
        if self.misses > 0:
            self.misses -= 1
            self.calls.append((command, timeout))
            raise ga.AgentUnavailable("QEMU guest agent is not connected")
        return super().__call__(command, timeout)


def test_exec_during_boot_waits_for_the_agent_within_its_timeout() -> None:
    clock = Clock()
    fake = ConnectsLater(4, out=b"vm\n", polls=0)
    res = agent(fake, clock).exec(["hostname"], timeout=10, agent_wait=ga.AGENT_WAIT_DEFAULT)
    assert res.stdout == b"vm\n"
    names = [c["execute"] for c, _ in fake.calls]
    assert names[:5] == ["guest-ping"] * 5 and names[5] == "guest-exec"  # only pings are repeated
    assert clock.now == pytest.approx(4 * ga.AGENT_WAIT_POLL)


def test_an_agent_that_never_connects_is_failed_precondition_after_the_wait() -> None:
    clock = Clock()
    with pytest.raises(errors.FailedPrecondition) as exc:
        agent(ConnectsLater(10**6), clock).exec(["true"], timeout=3, agent_wait=ga.AGENT_WAIT_DEFAULT)
    assert "waited 3s" in str(exc.value) and "qemu-guest-agent" in str(exc.value)
    assert clock.now == pytest.approx(3.0)
    clock = Clock()  # ExecSync timeout 0 (no limit): the wait is bounded by the default
    with pytest.raises(errors.FailedPrecondition, match=f"waited {ga.AGENT_WAIT_DEFAULT:g}s"):
        agent(ConnectsLater(10**6), clock).exec(["true"], agent_wait=ga.AGENT_WAIT_DEFAULT)
    assert clock.now == pytest.approx(ga.AGENT_WAIT_DEFAULT)


def test_waiting_for_the_agent_stops_when_the_vm_stops_or_the_caller_leaves() -> None:
    with pytest.raises(errors.FailedPrecondition, match="VM stopped"):
        agent(ConnectsLater(10**6), running=lambda: False).exec(["true"], agent_wait=60)
    with pytest.raises(errors.DeadlineExceeded, match="went away"):
        agent(ConnectsLater(10**6)).exec(["true"], agent_wait=60, alive=lambda: False)


def test_caller_gone_stops_waiting() -> None:
    with pytest.raises(errors.DeadlineExceeded):
        agent(FakeAgent(polls=10**6)).exec(["sleep", "100"], alive=lambda: False)


def test_output_cap_is_for_stdout_and_stderr_together() -> None:
    res = agent(FakeAgent(out=b"x" * 100, err=b"e" * 5), max_output=16).exec(["yes"])
    assert (res.stdout, res.stderr, res.truncated) == (b"x" * 11, b"e" * 5, True)
    res = agent(FakeAgent(out=b"x" * 100, err=b"e" * 100), max_output=16).exec(["yes"])
    assert (res.stdout, res.stderr) == (b"x" * 8, b"e" * 8)  # both long: each keeps half
    res = agent(FakeAgent(out=b"x" * 100), max_output=17).exec(["yes"], max_output=5)
    assert (res.stdout, res.truncated) == (b"x" * 5, True)
    assert agent(FakeAgent(out=b"x", out_truncated=True)).exec(["x"]).truncated
    assert not agent(FakeAgent(out=b"x" * 16)).exec(["x"], max_output=16).truncated


def test_one_16_mib_cap_on_every_exec_path() -> None:
    assert ga.EXEC_OUTPUT_CAP == 16 * 1024 * 1024
    assert ga.GuestAgent(FakeAgent(), "p").max_output == ga.EXEC_OUTPUT_CAP
    assert ga.EXEC_OUTPUT_CAP - 100 < ga.EXEC_SYNC_OUTPUT_CAP < ga.EXEC_OUTPUT_CAP


def test_over_the_cap_only_the_kept_prefix_is_decoded() -> None:
    import tracemalloc

    big = base64.b64encode(b"y" * (8 << 20)).decode()  # 8 MiB of output, 10.7 MB of base64
    fake = FakeAgent(polls=0)
    fake.__class__ = type("Big", (FakeAgent,), {"__call__": lambda self, c, t: (
        {"pid": 42} if c["execute"] == "guest-exec" else {"exited": True, "exitcode": 0, "out-data": big})})
    tracemalloc.start()
    try:
        res = agent(fake).exec(["yes"], max_output=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (res.stdout, res.truncated) == (b"y" * 1000, True)
    assert peak < 1 << 20, peak  # the 8 MiB were never decoded


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
    return RuntimeServicer(sandboxes, lambda: [], containers=FakeVms(FakeAgent(exitcode=0, out=b"hi\n")))


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




# -- the exec session through the real streaming server ---------------------------------------------------------
class ExecBackend:
    def __init__(self) -> None:
        self.stdin: list[bytes | None] = []

    def run_exec(self, container_id: str, cmd: tuple[str, ...], stdin: bytes | None, alive: Any) -> ga.ExecResult:
        self.stdin.append(stdin)
        if container_id == "broken":
            raise errors.FailedPrecondition("the guest agent does not answer")
        return ga.ExecResult(int(cmd[-1]), b"out:" + (stdin or b""), b"err\n")

    def exec_channel(self, container_id: str, *, tty: bool, gone: Any) -> None:
        return None  # a guest without virtlet-exec-agent: the guest-agent path


def test_exec_cmd_bounds_at_the_cri_call(tmp_path: Path) -> None:
    """A command the exec channel cannot carry is INVALID_ARGUMENT naming cmd before any URL is issued."""
    from virtlet.stream.backend import VirtletBackend

    store = st.StateStore(tmp_path / "s.db")
    backend = VirtletBackend(store, tmp_path)
    for cmd in (("a\0b",), ("x" * 40000,)):
        with pytest.raises(errors.InvalidArgument, match="cmd"):
            backend.check_exec(ExecRequest("c", cmd))


def test_exec_with_tty_without_exec_agent_says_what_to_do(exec_server: Any) -> None:
    """A guest without the exec agent: the TTY exec ends with a Failure naming the agent and the alternatives."""
    srv, _ = exec_server
    client = AttachClient(srv.exec_url(ExecRequest("run", ("sh",), stdin=True, stdout=True, stderr=False,
                                                   tty=True)), stdin=True, tty=True)
    try:
        status = client.status(timeout=10)
    finally:
        client.close()
    assert isinstance(status, dict) and status["status"] == "Failure", status
    assert "virtlet-exec-agent" in status["message"] and "kubectl attach -it" in status["message"]


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


# -- a misbehaving guest agent (issue 13): FAILED_PRECONDITION naming the misbehaviour, never INTERNAL ----------
class Scripted:
    """An agent transport answering guest-exec and guest-exec-status with fixed return values."""

    def __init__(self, started: Any = None, status: Any = None, status_error: Exception | None = None) -> None:
        self.started = {"pid": 42} if started is None else started
        self.status = status
        self.status_error = status_error

    def __call__(self, command: dict[str, Any], timeout: float) -> Any:
        if command["execute"] == "guest-exec":
            return self.started() if callable(self.started) else self.started
        if self.status_error is not None:
            raise self.status_error
        return self.status


_B64_4MB = "QUFB" * (1 << 20)


@pytest.mark.parametrize(("transport", "what"), [
    (Scripted(started=lambda: None), "guest-exec answered a JSON null"),
    (Scripted(started={"pid": "42"}), "'pid' string"),
    (Scripted(started={"pid": 4.5}), "'pid' number"),
    (Scripted(started={"pid": True}), "'pid' boolean"),
    (Scripted(started={"pid": -1}), "process id"),
    (Scripted(started={"pid": 1 << 40}), "process id"),
    (Scripted(started={}), "'pid' null"),
    (Scripted(started=[42]), "JSON array"),
    (Scripted(status=None), "JSON null, not an object"),
    (Scripted(status=[1, 2]), "JSON array, not an object"),
    (Scripted(status={}), "'exited' as null"),
    (Scripted(status={"exited": "yes"}), "'exited' as string"),
    (Scripted(status={"exited": True, "exitcode": "0"}), "'exitcode' is string"),
    (Scripted(status={"exited": True, "exitcode": 1 << 40}), "not a 32-bit integer"),
    (Scripted(status={"exited": True, "signal": [9]}), "'signal' is array"),
    (Scripted(status={"exited": True, "signal": 10**6}), "not a signal number"),
    (Scripted(status={"exited": True, "exitcode": 0, "out-data": 5}), "'out-data' is integer"),
    (Scripted(status={"exited": True, "exitcode": 0, "err-data": {"a": 1}}), "'err-data' is object"),
    (Scripted(status={"exited": True, "exitcode": 0, "out-data": "not base64!"}), "not valid base64"),
    (Scripted(status={"exited": True, "exitcode": 0, "out-data": "QUF"}), "not valid base64"),
    (Scripted(status={"exited": True, "exitcode": 0, "out-data": _B64_4MB + "!!!!"}), "not valid base64"),
    (Scripted(status_error=ga.AgentError("Invalid parameter 'pid'")), "guest-exec-status for PID 42 failed"),
    (Scripted(status_error=ga.AgentMisbehaved("the reply is not JSON")), "the reply is not JSON"),
])
def test_malformed_agent_replies_are_failed_precondition(transport: Scripted, what: str) -> None:
    with pytest.raises(errors.FailedPrecondition) as exc:
        ga.GuestAgent(transport, "default/vm", sleep=lambda s: None).exec(["true"], timeout=5)
    msg = str(exc.value)
    assert "VM pod default/vm: the guest agent misbehaved" in msg and what in msg, msg
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert len(msg) < 600  # a huge reply is not echoed


@pytest.mark.parametrize(("raw", "error", "what"), [
    (b"null", ga.AgentMisbehaved, "JSON NoneType"),
    (b"[1]", ga.AgentMisbehaved, "JSON list"),
    (b"{}", ga.AgentMisbehaved, "neither 'return' nor 'error'"),
    (b"{\"return\": ", ga.AgentMisbehaved, "not JSON"),
    (b"\xff\xfe", ga.AgentMisbehaved, "not JSON"),
    (b"[" * 100_000, ga.AgentMisbehaved, "not JSON"),
    (b'{"error": {"class": "GenericError", "desc": "no"}}', ga.AgentError, "no"),
    (b'{"error": 5}', ga.AgentError, "5"),
])
def test_parse_reply(raw: bytes, error: type, what: str) -> None:
    with pytest.raises(error) as exc:
        ga.parse_reply(raw)
    assert what in str(exc.value)
    with pytest.raises(ga.AgentMisbehaved):
        ga.parse_reply(b" " * 11, max_reply=10)
    assert ga.parse_reply(b'{"return": {"pid": 1}}') == {"pid": 1}


# -- the same through a real unix socket speaking QGA badly -----------------------------------------------------
class AgentSocket:
    """A unix socket answering each command line with ``replies[command name]``: bytes, or a callable given
    the connection (to stall, trickle or flood)."""

    def __init__(self, path: Path, replies: dict[str, Any]) -> None:
        import socket
        import threading

        self.path = path
        self.replies = replies
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        import threading

        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Any) -> None:
        with conn:
            buf = b""
            while b"\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            name = json.loads(buf.split(b"\n")[0])["execute"]
            reply = self.replies[name]
            try:
                if callable(reply):
                    reply(conn, self.stop)
                else:
                    conn.sendall(reply)
            except OSError:
                pass

    def close(self) -> None:
        import contextlib

        self.stop.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(2)  # wakes accept()
        self.sock.close()
        self.thread.join(5)


def _stall(conn: Any, stop: Any) -> None:
    stop.wait(30)


def _endless(conn: Any, stop: Any) -> None:
    conn.sendall(b'{"return": {"exited": true, "out-data": "')
    while not stop.is_set():
        conn.sendall(b"QUFB" * 16384)


def _trickle(conn: Any, stop: Any) -> None:
    conn.sendall(b'{"return": ')
    while not stop.wait(0.2):
        conn.sendall(b" ")


STARTED = b'{"return": {"pid": 42}}\n'


@pytest.mark.parametrize(("replies", "code", "what"), [
    ({"guest-exec": b"null\n"}, grpc.StatusCode.FAILED_PRECONDITION, "misbehaved"),
    ({"guest-exec": b'{"return": {"pid": "x"}}\n'}, grpc.StatusCode.FAILED_PRECONDITION, "'pid' string"),
    ({"guest-exec": b"garbage\n"}, grpc.StatusCode.FAILED_PRECONDITION, "not JSON"),
    ({"guest-exec": STARTED, "guest-exec-status": b'{"return": [1]}\n'}, grpc.StatusCode.FAILED_PRECONDITION,
     "JSON array"),
    ({"guest-exec": STARTED, "guest-exec-status": b'{"return": {"exited": true, "out-data": "%%%%"}}\n'},
     grpc.StatusCode.FAILED_PRECONDITION, "not valid base64"),
    ({"guest-exec": STARTED, "guest-exec-status": _endless}, grpc.StatusCode.FAILED_PRECONDITION,
     "more than"),
    ({"guest-exec": b""}, grpc.StatusCode.FAILED_PRECONDITION, "does not answer"),
    ({"guest-exec": _stall}, grpc.StatusCode.FAILED_PRECONDITION, "no complete reply within"),
    ({"guest-exec": _trickle}, grpc.StatusCode.FAILED_PRECONDITION, "no complete reply within"),
])
def test_misbehaving_agent_socket(tmp_path: Path, replies: dict[str, Any], code: grpc.StatusCode,
                                  what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ga, "CALL_TIMEOUT", 2.0)
    srv = AgentSocket(tmp_path / "qga.sock", replies)
    try:
        agent_ = ga.GuestAgent(at.socket_transport(str(srv.path), max_reply=4 << 20), "default/vm")
        with pytest.raises(errors.VirtletError) as exc:
            agent_.exec(["true"], timeout=3)
        assert exc.value.code == code and what in str(exc.value), str(exc.value)
        assert "VM pod default/vm" in str(exc.value)
    finally:
        srv.close()


def test_a_stalled_agent_does_not_block_other_calls(tmp_path: Path) -> None:
    """One VM's silent agent holds only its own call; another VM's exec answers meanwhile."""
    import threading
    import time

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    stalled = AgentSocket(tmp_path / "a" / "qga.sock", {"guest-exec": _stall})
    good = AgentSocket(tmp_path / "b" / "qga.sock", {
        "guest-exec": STARTED,
        "guest-exec-status": b'{"return": {"exited": true, "exitcode": 0, "out-data": "aGkK"}}\n'})
    try:
        outcome: list[BaseException] = []

        def slow() -> None:
            try:
                ga.GuestAgent(at.socket_transport(str(stalled.path)), "default/a").exec(["true"], timeout=4)
            except BaseException as exc:
                outcome.append(exc)

        t = threading.Thread(target=slow)
        t.start()
        start = time.monotonic()
        res = ga.GuestAgent(at.socket_transport(str(good.path)), "default/b").exec(["echo", "hi"], timeout=10)
        assert res == ga.ExecResult(0, b"hi\n", b"")
        assert time.monotonic() - start < 3  # not behind the stalled one (which takes 4 s)
        t.join(30)
        assert isinstance(outcome[0], errors.FailedPrecondition) and "does not answer" in str(outcome[0])
    finally:
        stalled.close()
        good.close()


def test_exec_sync_with_a_misbehaving_agent_is_failed_precondition(servicer: RuntimeServicer) -> None:
    vms: Any = type("Vms", (), {"guest_agent": lambda self, cid: ga.GuestAgent(
        Scripted(started={"pid": None}), "default/vm")})()
    servicer = RuntimeServicer(servicer.sandboxes, lambda: [], containers=vms)
    with pytest.raises(errors.FailedPrecondition) as exc:
        servicer.ExecSync(api.ExecSyncRequest(container_id="run", cmd=["true"], timeout=5), Context())
    assert "guest agent misbehaved" in str(exc.value)
