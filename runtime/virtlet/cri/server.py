"""The gRPC server of virtletd on a unix socket: CRI (runtime.v1 and runtime.v1alpha2 names) and gRPC health.

Two things here are about stopping and about permissions:
- ``CallGate`` counts the CRI handlers that are *running* (not the gRPC calls: a call whose client gave up, or
  that gRPC cancelled after the grace, is over for gRPC while its handler still works on the host and the state
  database).  A stop waits for the handlers, so the database is never closed under one of them.
- ``bind_unix_socket`` gives the socket its mode without touching the process umask (other threads create files
  at the same time): it binds inside a private 0700 directory next to the final path, chmods, then renames.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from virtlet import errors
from virtlet.cri import versions
from virtlet.cri.interceptor import ErrorMappingInterceptor, Observer, ServerInterceptor

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


def bind_unix_socket(path: Path, mode: int, bind: Callable[[Path], None]) -> None:
    """Make the unix socket ``path`` with ``mode`` and no moment where it has another mode, without changing
    the process umask.  ``bind(tmp)`` creates the listening socket at ``tmp``.

    Why not fchmod: on Linux the mode of a unix socket's *file* is what connect() checks; fchmod on the socket
    fd changes another inode and does not reach it, and gRPC binds itself anyway.  So the socket is made inside
    a fresh 0700 directory (only root reaches it, whatever the umask made the socket), given its mode, and
    renamed onto ``path`` (atomic; a stale socket there was already checked by ``prepare_socket_path``)."""
    private = Path(tempfile.mkdtemp(prefix=".sock-", dir=path.parent))  # mkdtemp: 0700
    tmp = private / "s"
    try:
        if len(os.fsencode(tmp)) >= 108:
            raise errors.InvalidArgument(f"listen: socket directory {path.parent} is too long for a unix socket")
        bind(tmp)
        os.chmod(tmp, mode)
        os.rename(tmp, path)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        private.rmdir()


def serve_grpc_on_unix(server: grpc.Server, path: Path, mode: int = SOCKET_MODE) -> None:
    """Start ``server`` on the unix socket ``path`` (created with ``mode``, see ``bind_unix_socket``)."""
    prepare_socket_path(path)

    def bind(tmp: Path) -> None:
        server.add_insecure_port(f"unix://{tmp}")
        server.start()

    bind_unix_socket(path, mode, bind)


class CallGate(ServerInterceptor):
    """Counts running unary handlers; once closed, refuses new calls with UNAVAILABLE.

    The outermost interceptor: a refused call never reaches a servicer, and the count covers the whole
    handler including error mapping.  Streaming methods (health Watch) are not counted: they last as long as
    their client wants and touch no state."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = 0
        self._closed = False

    def close(self) -> None:
        with self._cond:
            self._closed = True

    @property
    def running(self) -> int:
        with self._cond:
            return self._running

    def wait_idle(self, timeout: float) -> int:
        """Wait until no handler runs, at most ``timeout`` seconds; the number still running."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            return self._running

    def _enter(self) -> bool:
        with self._cond:
            if self._closed:
                return False
            self._running += 1
            return True

    def _leave(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary

        def gated(request: Any, context: grpc.ServicerContext) -> Any:
            if not self._enter():
                context.abort(grpc.StatusCode.UNAVAILABLE, "virtletd is stopping; retry when it is back")
            try:
                return behavior(request, context)
            finally:
                self._leave()

        return grpc.unary_unary_rpc_method_handler(
            gated, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class CriServer:
    def __init__(self, listen: str, runtime_servicer: Any, image_servicer: Any, workers: int = 32,
                 observe: Observer | None = None) -> None:
        self.path = Path(listen)
        self.health = health.HealthServicer()
        self.gate = CallGate()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cri"),
            interceptors=[self.gate, ErrorMappingInterceptor(observe)],
            options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.max_send_message_length", MAX_MESSAGE),
                     ("grpc.so_reuseport", 0)])
        versions.add_servicers(self.server, runtime_servicer, image_servicer)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def start(self) -> None:
        serve_grpc_on_unix(self.server, self.path, SOCKET_MODE)
        for service in ("", "runtime.v1.RuntimeService", "runtime.v1.ImageService"):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("CRI server listening on unix://%s", self.path)

    def stop(self, grace: float = 30.0) -> int:
        """Stop accepting calls, let the handlers in flight finish (up to ``grace`` seconds in all), remove the
        socket.  Returns how many handlers still run after the grace (0: a clean stop)."""
        deadline = time.monotonic() + grace
        self.gate.close()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()  # gRPC: no new calls; calls still open at the end of the grace cancelled
        left = self.gate.wait_idle(max(0.0, deadline - time.monotonic()))
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        return left

    def wait(self) -> None:
        self.server.wait_for_termination()
