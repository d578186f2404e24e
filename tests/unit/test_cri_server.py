"""The CRI server's call gate and socket binding (no daemon: a real gRPC server on a temp socket)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import grpc
import pytest

from virtlet.cri import server


def test_bind_unix_socket_gives_the_mode_without_the_umask(tmp_path: Path) -> None:
    import socket

    target = tmp_path / "x.sock"
    seen: dict[str, int] = {}
    old = os.umask(0o000)  # the loosest umask: the private directory alone must keep others out
    try:
        def bind(tmp: Path) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(tmp))
            seen["dir"] = stat.S_IMODE(tmp.parent.stat().st_mode)
            socks.append(sock)

        socks: list[socket.socket] = []
        server.bind_unix_socket(target, 0o660, bind)
    finally:
        os.umask(old)
        for s in socks:
            s.close()
    assert seen["dir"] == 0o700
    assert stat.S_ISSOCK(target.lstat().st_mode) and stat.S_IMODE(target.lstat().st_mode) == 0o660
    assert [p.name for p in tmp_path.iterdir()] == ["x.sock"]  # the private directory is gone


def test_grpc_server_socket_mode_and_gate(tmp_path: Path) -> None:
    from concurrent import futures

    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    gate = server.CallGate()
    release = threading.Event()
    entered = threading.Event()

    class SlowHealth(health.HealthServicer):
        def Check(self, request, context):  # type: ignore[no-untyped-def]
            entered.set()
            release.wait(30)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=[gate])
    health_pb2_grpc.add_HealthServicer_to_server(SlowHealth(), srv)
    path = tmp_path / "cri.sock"
    server.serve_grpc_on_unix(srv, path)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        with grpc.insecure_channel(f"unix://{path}") as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            t = threading.Thread(target=lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=30))
            t.start()
            assert entered.wait(30)
            assert gate.running == 1
            gate.close()
            with pytest.raises(grpc.RpcError) as exc:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
            assert gate.wait_idle(0.1) == 1  # still running: the wait is bounded
            release.set()
            t.join(30)
            assert gate.wait_idle(30) == 0
    finally:
        release.set()
        srv.stop(None)
