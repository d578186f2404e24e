"""Start the real virtletd as a child process on a temporary socket and state dir, and talk CRI to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from virtlet.cri import versions

REPO = Path(__file__).resolve().parents[2]


class VirtletdProcess:
    """One virtletd child process.  ``args`` are extra flags; the log goes to ``<base>/virtletd.log``."""

    def __init__(self, base: Path, args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.base = base
        self.socket = base / "virtlet.sock"
        self.state_dir = base / "state"
        self.run_dir = base / "run"
        self.log_path = base / "virtletd.log"
        self.args = args or []
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    @property
    def cmd(self) -> list[str]:
        return [sys.executable, "-m", "virtlet.daemon", "--listen", str(self.socket),
                "--state-dir", str(self.state_dir), "--run-dir", str(self.run_dir),
                "--stream-address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0", *self.args]

    def start(self, timeout: float = 30.0) -> VirtletdProcess:
        env = {**os.environ, **self.env}
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"virtletd exited with {self.proc.returncode}:\n{self.log()}")
            if self.socket.exists() and self.healthy():
                return self
            time.sleep(0.1)
        # Never leave a daemon that the caller was told did not start: the caller's clean-up will not stop it
        # (an orphaned virtletd outlives the test and its deleted temp dir).
        self.stop()
        raise RuntimeError(f"virtletd did not become healthy in {timeout}s:\n{self.log()}")

    def connect(self) -> grpc.Channel:
        if self.channel is None:
            self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        return self.channel

    def healthy(self) -> bool:
        try:
            stub = health_pb2_grpc.HealthStub(self.connect())
            return bool(stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status ==
                        health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            self._drop_channel()
            return False

    def runtime(self, version: str = "v1") -> Any:
        return versions.runtime_stub(self.connect(), version)

    def image(self, version: str = "v1") -> Any:
        return versions.image_stub(self.connect(), version)

    def _drop_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        self._drop_channel()
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> VirtletdProcess:
        self.stop()
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""
