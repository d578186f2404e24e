"""virtlet-criproxy: the process.  Reads the config, serves CRI (v1 and v1alpha2) until SIGTERM/SIGINT.

Why its own small server (not ``virtlet.cri.server.CriServer``): each served CRI version gets its own servicer
instance so ``Version`` can answer in the version it was asked in; the socket handling is shared.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from pathlib import Path
from types import FrameType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from virtlet import errors
from virtlet.cri import versions
from virtlet.cri.server import MAX_MESSAGE, SOCKET_MODE, serve_grpc_on_unix
from virtlet.proxy import config as cfgmod
from virtlet.proxy.backends import Backends
from virtlet.proxy.handlers import add_proxy_servicers
from virtlet.proxy.routing import Rules
from virtlet.proxy.servicer import CriProxy
from virtlet.proxy.state import ProxyState

log = logging.getLogger("virtlet.proxy")


class ProxyServer:
    """The gRPC server on the listen socket, in front of ``backends``."""

    def __init__(self, cfg: cfgmod.ProxyConfig, workers: int = 32) -> None:
        self.cfg = cfg
        self.path = Path(cfg.listen)
        self.state = ProxyState(cfg.state_dir)
        self.backends = Backends(cfg.primary, dict(cfg.secondaries), cfg.probe_timeout)
        rules = Rules(frozenset(cfg.secondaries), cfg.handlers)
        self.health = health.HealthServicer()
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="criproxy"),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                     ("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.so_reuseport", 0)])
        for version in versions.VERSIONS:
            proxy = CriProxy(self.backends, rules, version, cfg.list_timeout, self.state)
            add_proxy_servicers(self.server, proxy, version)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)

    def start(self) -> None:
        serve_grpc_on_unix(self.server, self.path, SOCKET_MODE)  # 0660: the kubelet's group, nobody else
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("CRI proxy listening on unix://%s; primary %s; %s", self.path, self.cfg.primary,
                 ", ".join(f"{n}={a}" for n, a in self.cfg.secondaries.items()) or "no secondaries")

    def stop(self, grace: float = 10.0) -> None:
        """Stop accepting calls, let in-flight calls finish, close the backends, remove the socket."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.backends.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = cfgmod.load(argv)
    except errors.VirtletError as exc:
        print(f"virtlet-criproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, cfg.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
                        force=True)
    try:
        server = ProxyServer(cfg)
    except errors.VirtletError as exc:
        log.error("cannot start: %s", exc)
        return 1
    try:
        server.start()
    except errors.VirtletError as exc:
        log.error("cannot start: %s", exc)
        server.backends.close()
        return 1
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s: stopping", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    done.wait()
    server.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
