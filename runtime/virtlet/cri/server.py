"""The gRPC server of virtletd on a unix socket: CRI (runtime.v1 and runtime.v1alpha2 names) and gRPC health."""

from __future__ import annotations

import logging
import os
import socket
import stat
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from virtlet import errors
from virtlet.cri import versions
from virtlet.cri.interceptor import ErrorMappingInterceptor

log = logging.getLogger(__name__)

SOCKET_MODE = 0o660
MAX_MESSAGE = 16 * 1024 * 1024  # the kubelet's own limit for CRI messages


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


def prepare_socket_path(path: Path) -> None:
    """Make room for the socket: a stale socket is replaced, a live one or a non-socket file is an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise errors.FailedPrecondition(f"listen: {path} exists and is not a socket; refusing to replace it")
    if _socket_in_use(path):
        raise errors.FailedPrecondition(f"listen: {path} is in use by a running process (another virtletd?)")
    log.info("removing stale socket %s", path)
    path.unlink()


class CriServer:
    def __init__(self, listen: str, runtime_servicer: Any, image_servicer: Any, workers: int = 32) -> None:
        self.path = Path(listen)
        self.health = health.HealthServicer()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cri"),
            interceptors=[ErrorMappingInterceptor()],
            options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.max_send_message_length", MAX_MESSAGE),
                     ("grpc.so_reuseport", 0)])
        versions.add_servicers(self.server, runtime_servicer, image_servicer)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def start(self) -> None:
        prepare_socket_path(self.path)
        old_umask = os.umask(0o117)  # the socket is created 0660 from the start, never world-accessible
        try:
            self.server.add_insecure_port(f"unix://{self.path}")
            self.server.start()
        finally:
            os.umask(old_umask)
        os.chmod(self.path, SOCKET_MODE)
        for service in ("", "runtime.v1.RuntimeService", "runtime.v1.ImageService"):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("CRI server listening on unix://%s", self.path)

    def stop(self, grace: float = 30.0) -> None:
        """Stop accepting calls, let in-flight calls finish (up to ``grace`` seconds), remove the socket."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def wait(self) -> None:
        self.server.wait_for_termination()
