"""Interactive `kubectl exec -it` and streamed `kubectl exec` on a real tiny VM through the exec channel
(virtio-serial port cloud.virtlet.exec, virtlet-exec-agent in the guest; virtlet.vm.exec_channel), driven
through virtletd's real streaming server the way kubectl speaks SPDY: output before the command ends, stdin,
resize reaching `stty size`, ^C interrupting `sleep`, exit code 3 in the Status."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_vm_lifecycle import MARKER, Pod, _pull
from virtlet.cri.gen import api_pb2 as api
from virtlet.stream.client import AttachClient, ExecClient

pytestmark = [pytest.mark.libvirt, pytest.mark.network]


@pytest.fixture
def tty_vm(vm_virtletd: VirtletdProcess, world_dir: Path, image_server: Any, tiny_image: Path) -> Any:
    shutil.copy(tiny_image, image_server.root / "tiny.qcow2")
    name = image_server.name("files/tiny.qcow2")
    _pull(vm_virtletd, name)
    pod = Pod(vm_virtletd, world_dir, "vm-exec-tty", image=name)
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        pod.wait_log(MARKER)
        yield pod
    finally:
        pod.stop_and_remove()


def _url(pod: Pod, *cmd: str, stdin: bool = False, tty: bool = False) -> str:
    return pod.rt.Exec(api.ExecRequest(container_id=pod.container_id, cmd=list(cmd), stdin=stdin, stdout=True,
                                       stderr=not tty, tty=tty), timeout=30).url


def _read_until(client: AttachClient, needle: bytes, timeout: float = 60) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not seen; got {buf[-400:]!r}"
        data = client.read(min(left, 1.0))
        if data == b"":
            raise AssertionError(f"session ended before {needle!r}; got {buf[-400:]!r}")
        buf += data or b""
    return buf


def test_exec_tty_and_streamed_output(tty_vm: Pod) -> None:
    # non-interactive: the first line arrives while the command still runs (sleep 15), before its Status
    client = ExecClient(_url(tty_vm, "sh", "-c", "echo first; sleep 15; echo second; echo e >&2; exit 4"))
    try:
        first = b""
        deadline = time.monotonic() + 120  # the first exec may wait for the agent of a VM still booting
        while b"first\n" not in first:
            assert time.monotonic() < deadline, first
            first += client.stdout.read(1.0) or b""
        assert b"second" not in first
        assert client.error.read(0.1) is None  # no Status yet: the command is still running
        out, err, status = client.run(timeout=120)
        assert (out, err, ExecClient.exit_code(status)) == (b"second\n", b"e\n", 4)
    finally:
        client.close()

    # interactive: a shell on a pty, resized, ^C, exit code 3
    shell = AttachClient(_url(tty_vm, "sh", stdin=True, tty=True), stdin=True, tty=True)
    try:
        shell.send_resize(100, 37)
        shell.write(b"stty size; tty\r")
        out = _read_until(shell, b"37 100")
        shell.write(b"test -t 0 && echo is-a-tty\r")
        _read_until(shell, b"is-a-tty\r\n")
        shell.send_resize(132, 50)
        shell.write(b"stty size\r")
        _read_until(shell, b"50 132")
        started = time.monotonic()
        shell.write(b"sleep 300\r")
        time.sleep(2)
        shell.write(b"\x03")  # ^C: the pty's line discipline sends SIGINT to the foreground job
        shell.write(b"echo rc=$?\r")  # typed ahead: runs once the interrupted sleep gave the prompt back
        out = _read_until(shell, b"rc=130", timeout=60)
        assert time.monotonic() - started < 120
        shell.write(b"exit 3\r")
        while shell.read(5.0) not in (b"",):
            pass
        status = shell.status(timeout=30)
        assert isinstance(status, dict) and status["reason"] == "NonZeroExitCode", status
        assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "3"}]
    finally:
        shell.close()
    del out

    # a client that leaves mid-command: the command is killed in the guest, and the next exec works
    gone = AttachClient(_url(tty_vm, "sleep", "777", stdin=True, tty=True), stdin=True, tty=True)
    time.sleep(3)
    gone.close()
    deadline = time.monotonic() + 60
    while True:
        client = ExecClient(_url(tty_vm, "ps"))
        try:
            out, _err, status = client.run(timeout=60)
        finally:
            client.close()
        assert ExecClient.exit_code(status) == 0, status
        if b"sleep 777" not in out:
            break
        assert time.monotonic() < deadline, out
        time.sleep(1)
