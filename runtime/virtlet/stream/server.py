"""The streaming HTTP server: single-use URLs for CRI ``Attach``/``Exec``/``PortForward``, upgraded to SPDY or
WebSocket.

Paths are ``/attach/<token>``, ``/exec/<token>`` and ``/portforward/<token>``.  A request is checked in this
order, and each failure ends the connection without opening anything: well-formed head (400), known path (404),
GET/POST (405), an ``Upgrade`` of ``SPDY/3.1`` or ``websocket`` with the headers it needs (400), a live token
of the right kind (403: unknown, expired or already used), a subprotocol both sides speak (403 for SPDY, as
Kubernetes answers; 400 for WebSocket).  Each connection has its own thread; a failing one never stops
the others or the server.

Every connection is bounded (``virtlet.stream.limits.Limits``): the request head must arrive whole within
``head_timeout`` (10 s) and ``max_head`` bytes; at most ``max_connections`` (128) are open at once and the
next one is answered 503 with ``Retry-After`` and closed; after the upgrade, frames, buffered bytes, stalled
sends and idle time are bounded by the SPDY and WebSocket layers.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Any

from virtlet import errors
from virtlet.stream import execute, portforward, remotecommand
from virtlet.stream.httpio import BadRequest, Request, read_request, respond
from virtlet.stream.limits import DEFAULT, Limits
from virtlet.stream.model import AttachRequest, Backend, ExecRequest, PortForwardRequest
from virtlet.stream.tokens import DEFAULT_TTL, TokenStore
from virtlet.stream.websocket import ChannelSocket, accept_key

log = logging.getLogger(__name__)

PROTOCOL_HEADER = "X-Stream-Protocol-Version"


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def negotiate_spdy(client: list[str], server: tuple[str, ...]) -> str | None:
    """Kubernetes' rule: the server's most preferred protocol the client offers; ``""`` if it offered none."""
    if not client:
        return ""
    for p in server:
        if p in client:
            return p
    return None


def negotiate_ws(client: list[str], server: tuple[str, ...]) -> str | None:
    """The client's first offered protocol the server speaks; ``""`` when it offered none."""
    if not client:
        return ""
    for p in client:
        if p in server:
            return p
    return None


class StreamServer:
    """Serves streaming URLs on ``address`` (``HOST:PORT``; port 0 picks a free one) for ``backend``."""

    def __init__(self, address: str, backend: Backend, *, ttl: float = DEFAULT_TTL,
                 advertise_host: str | None = None, limits: Limits = DEFAULT) -> None:
        self.host, self.port = parse_address(address)
        self.limits = limits
        self.refused = 0  # connections answered 503 (over max_connections)
        self.backend = backend
        self.tokens = TokenStore(ttl)
        self.advertise_host = advertise_host
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    # -- life -------------------------------------------------------------------------------------------
    def start(self) -> StreamServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise errors.Unavailable(f"streaming server cannot listen on {self.host}:{self.port}: {exc}") from exc
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name="stream-accept", daemon=True)
        self._thread.start()
        log.info("streaming server listening on %s", self.base_url)
        return self

    def stop(self) -> None:
        """Stop accepting and end every open session (VMs are not touched)."""
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    @property
    def base_url(self) -> str:
        host = self.advertise_host or self.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # -- URLs -------------------------------------------------------------------------------------------
    def attach_url(self, req: AttachRequest) -> str:
        return f"{self.base_url}/attach/{self.tokens.issue('attach', req)}"

    def exec_url(self, req: ExecRequest) -> str:
        return f"{self.base_url}/exec/{self.tokens.issue('exec', req)}"

    def port_forward_url(self, req: PortForwardRequest) -> str:
        return f"{self.base_url}/portforward/{self.tokens.issue('portforward', req)}"

    # -- connections ------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, peer = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            with self._lock:
                full = len(self._conns) >= self.limits.max_connections
                if not full:
                    self._conns.add(conn)
            if full:
                self._refuse(conn, peer)
                continue
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True, name="stream-conn").start()

    def _refuse(self, conn: socket.socket, peer: Any) -> None:
        """Over ``max_connections``: a 503 that fits the socket buffer, sent without waiting, then close."""
        self.refused += 1
        log.warning("streaming server: %d connections are open (the limit); refusing one from %s",
                    self.limits.max_connections, peer)
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            respond(conn, 503, f"too many streaming connections (at most {self.limits.max_connections}); "
                               f"try again later\n", headers={"Retry-After": "1"})
            conn.shutdown(socket.SHUT_WR)
        conn.close()

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        try:
            self._handle(conn)
        except (OSError, EOFError) as exc:
            log.debug("streaming connection from %s ended: %s", peer, exc)
        except Exception:
            log.exception("streaming connection from %s failed", peer)
        finally:
            with self._lock:
                self._conns.discard(conn)
            with contextlib.suppress(OSError):
                conn.close()

    def _handle(self, conn: socket.socket) -> None:
        try:
            req = read_request(conn, self.limits.head_timeout, self.limits.max_head)
        except BadRequest as exc:
            log.info("streaming server: %s", exc)
            conn.settimeout(self.limits.send_timeout)
            respond(conn, 400, f"bad request: {exc}\n")
            return
        conn.settimeout(self.limits.send_timeout)  # every answer below is sent with a bound
        if req is None:
            return
        parts = req.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in ("attach", "exec", "portforward") or not parts[1]:
            respond(conn, 404, f"{req.path} not found (streaming URLs are /attach/TOKEN, /exec/TOKEN and "
                               f"/portforward/TOKEN)\n")
            return
        kind, token = parts
        if req.method not in ("GET", "POST"):
            respond(conn, 405, f"method {req.method} not allowed (GET or POST with an upgrade)\n")
            return
        upgrade = req.header("upgrade").lower()
        if upgrade == "spdy/3.1":
            transport = "spdy"
        elif upgrade == "websocket":
            transport = "websocket"
            if not req.header("sec-websocket-key") or req.header("sec-websocket-version") != "13":
                respond(conn, 400, "websocket upgrade needs Sec-WebSocket-Key and Sec-WebSocket-Version: 13\n")
                return
        else:
            respond(conn, 400, "this URL must be upgraded: send 'Connection: Upgrade' with "
                               "'Upgrade: SPDY/3.1' or 'Upgrade: websocket'\n")
            return
        request = self.tokens.consume(token, kind)
        if request is None:
            respond(conn, 403, "streaming token is unknown, expired or already used; ask the runtime for a "
                               "new URL\n")
            return
        if kind == "attach":
            self._attach(conn, req, transport, request)
        elif kind == "exec":
            self._exec(conn, req, transport, request)
        else:
            self._port_forward(conn, req, transport, request)

    def _upgrade_spdy(self, conn: socket.socket, req: Request, protocols: tuple[str, ...]) -> str | None:
        offered = req.header_list(PROTOCOL_HEADER)
        chosen = negotiate_spdy(offered, protocols)
        if chosen is None:
            respond(conn, 403, f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                               f"server supports {list(protocols)}\n")
            return None
        headers = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}
        if chosen:
            headers[PROTOCOL_HEADER] = chosen
        respond(conn, 101, headers=headers)
        return chosen

    def _upgrade_ws(self, conn: socket.socket, req: Request, protocols: tuple[str, ...]) -> ChannelSocket | None:
        offered = req.header_list("sec-websocket-protocol")
        chosen = negotiate_ws(offered, protocols)
        if chosen is None:
            respond(conn, 400, f"unable to upgrade: none of the websocket protocols {offered} is supported "
                               f"(server supports {list(protocols)})\n")
            return None
        headers = {"Upgrade": "websocket", "Connection": "Upgrade",
                   "Sec-WebSocket-Accept": accept_key(req.header("sec-websocket-key"))}
        if chosen:
            headers["Sec-WebSocket-Protocol"] = chosen
        respond(conn, 101, headers=headers)
        return ChannelSocket(conn, req.rest, chosen, self.limits)

    def _attach(self, conn: socket.socket, req: Request, transport: str, request: AttachRequest) -> None:
        if transport == "spdy":
            protocol = self._upgrade_spdy(conn, req, remotecommand.SPDY_PROTOCOLS)
            if protocol is not None:
                remotecommand.serve_spdy(conn, req.rest, protocol, request, self.backend, limits=self.limits)
            return
        ws = self._upgrade_ws(conn, req, remotecommand.WS_PROTOCOLS)
        if ws is not None:
            remotecommand.serve_websocket(ws, request, self.backend)

    def _exec(self, conn: socket.socket, req: Request, transport: str, request: ExecRequest) -> None:
        flags = (request.stdin, request.stdout, request.stderr and not request.tty, request.tty)
        session = execute.exec_session(self.backend, request)
        if transport == "spdy":
            protocol = self._upgrade_spdy(conn, req, remotecommand.SPDY_PROTOCOLS)
            if protocol is not None:
                remotecommand.serve_spdy_session(conn, req.rest, protocol, flags, f"exec {request.container_id}",
                                                 session, limits=self.limits, on_resize=session.resize)
            return
        ws = self._upgrade_ws(conn, req, remotecommand.WS_PROTOCOLS)
        if ws is not None:
            remotecommand.serve_websocket_session(ws, flags, session, on_resize=session.resize)

    def _port_forward(self, conn: socket.socket, req: Request, transport: str,
                      request: PortForwardRequest) -> None:
        if transport == "spdy":
            if self._upgrade_spdy(conn, req, portforward.SPDY_PROTOCOLS) is not None:
                portforward.serve_spdy(conn, req.rest, request, self.backend, limits=self.limits)
            return
        try:
            ports = portforward.ws_ports(req.query, request)
        except ValueError as exc:
            respond(conn, 400, f"bad port: {exc}\n")
            return
        if not ports:
            respond(conn, 400, "query parameter 'port' is required\n")
            return
        ws = self._upgrade_ws(conn, req, portforward.WS_PROTOCOLS)
        if ws is not None:
            portforward.serve_websocket(ws, ports, request, self.backend)
