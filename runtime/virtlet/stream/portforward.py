"""The Kubernetes port-forward protocol, over SPDY streams or WebSocket channels.

SPDY (``portforward.k8s.io``): the client opens a pair of streams per forwarded connection, ``streamtype``
``error`` and ``data``, with the same ``requestid`` and the target ``port`` in their headers; many pairs may
be open at once on one connection.  WebSocket: the ports come from ``?port=`` in the URL; port *i* uses
channel 2*i for data and 2*i+1 for errors, and the server first sends the port (2 bytes, little-endian) on
both channels.  Either way a port that cannot be reached gets a message on its error stream/channel; other
streams go on.

Bounds: a VM port that does not read what the client sends for ``send_timeout`` loses that forwarded
connection; a client that does not read what the VM sends is dropped by the SPDY/WebSocket send bound, and
the VM's socket then fills and stops it (nothing is buffered here beyond one ``RECV`` chunk).  When the client
connection ends, every VM socket it opened is shut down.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading

from virtlet.stream.limits import DEFAULT, Limits
from virtlet.stream.model import Backend, PortForwardRequest
from virtlet.stream.spdy_conn import SpdyConnection, SpdyStream, StreamClosed
from virtlet.stream.websocket import ChannelSocket

log = logging.getLogger(__name__)

SPDY_PROTOCOLS = ("portforward.k8s.io",)
WS_PROTOCOLS = ("v4.channel.k8s.io", "v4.base64.channel.k8s.io", "portforward.k8s.io", "channel.k8s.io",
                "base64.channel.k8s.io")
RECV = 64 * 1024


def _error_text(req: PortForwardRequest, port: int, exc: BaseException) -> str:
    return f"error forwarding port {port} to pod {req.sandbox_id}: {exc}"


def _recv_vm(sock: socket.socket) -> bytes:
    """The next bytes from a VM socket (``b""`` at its end or on any error).  Waits in ``select`` because the
    socket's timeout bounds sends to the VM, not how long the VM may stay silent."""
    try:
        select.select([sock], [], [])
        return sock.recv(RECV)
    except (OSError, ValueError):
        return b""


def _vm_socket(sock: socket.socket, limits: Limits) -> socket.socket:
    sock.settimeout(limits.send_timeout)  # a VM port that reads nothing for this long loses the connection
    return sock


def parse_port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {text!r} is not in 1-65535")
    return port


# -- SPDY -----------------------------------------------------------------------------------------------------
class _SpdyPairs:
    """Matches data and error streams by request id and forwards each complete pair in its own thread."""

    def __init__(self, req: PortForwardRequest, backend: Backend, limits: Limits = DEFAULT) -> None:
        self.req = req
        self.backend = backend
        self.limits = limits
        self.socks: set[socket.socket] = set()
        self.closing = False
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, SpdyStream]] = {}
        self.threads: list[threading.Thread] = []

    def on_stream(self, stream: SpdyStream) -> None:
        kind = stream.header("streamtype")
        if kind not in ("data", "error"):
            stream.abort()
            return
        rid = stream.header("requestid")
        if not rid:  # clients before request ids: the error stream is created right before its data stream
            rid = str(stream.id if kind == "error" else stream.id - 2)
        with self._lock:
            pair = self._pending.setdefault(rid, {})
            if kind in pair:
                stream.abort()
                return
            pair[kind] = stream
            if len(pair) < 2:
                return
            del self._pending[rid]
        t = threading.Thread(target=self.forward, args=(pair["data"], pair["error"]), daemon=True,
                             name=f"portforward-{rid}")
        self.threads = [x for x in self.threads if x.is_alive()] + [t]
        t.start()

    def forward(self, data: SpdyStream, error: SpdyStream) -> None:
        port_text = data.header("port")
        try:
            port = parse_port(port_text)
            sock = _vm_socket(self.backend.dial(self.req.sandbox_id, port), self.limits)
        except Exception as exc:
            msg = _error_text(self.req, int(port_text) if port_text.isdigit() else 0, exc)
            log.info("%s", msg)
            with contextlib.suppress(StreamClosed, OSError):
                error.write(msg.encode())
            error.close()
            data.close()
            return
        with self._lock:
            if self.closing:
                sock.close()
                return
            self.socks.add(sock)
        upstream = threading.Thread(target=_stream_to_socket, args=(data, sock), daemon=True)
        try:
            upstream.start()
            while True:
                chunk = _recv_vm(sock)
                if not chunk:
                    break
                try:
                    data.write(chunk)
                except StreamClosed:
                    break
            data.close()
            upstream.join(self.limits.send_timeout)  # what the client still sends may reach the VM
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # ends a send to a VM that stopped reading
            if upstream.is_alive():
                upstream.join(5)
            with self._lock:
                self.socks.discard(sock)
            sock.close()
            error.close()

    def close(self) -> None:
        """The client connection ended: end every forwarded connection to the VM."""
        with self._lock:
            self.closing = True
            socks = list(self.socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _stream_to_socket(stream: SpdyStream, sock: socket.socket) -> None:
    while True:
        chunk = stream.read()
        if not chunk:
            break
        try:
            sock.sendall(chunk)
        except OSError:
            break
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


def serve_spdy(sock: socket.socket, initial: bytes, req: PortForwardRequest, backend: Backend, *,
               limits: Limits = DEFAULT) -> None:
    """Serve port-forward streams until the client closes the connection (the 101 was already sent)."""
    pairs = _SpdyPairs(req, backend, limits)
    conn = SpdyConnection(sock, server=True, on_stream=pairs.on_stream, initial=initial, limits=limits).start()
    conn.closed.wait()
    pairs.close()
    for t in list(pairs.threads):
        t.join(5)
    conn.close()


# -- WebSocket ----------------------------------------------------------------------------------------------
def ws_ports(query: dict[str, list[str]], req: PortForwardRequest) -> list[int]:
    """Ports of a WebSocket port-forward: ``?port=`` (comma lists allowed), else those of the CRI request."""
    texts = query.get("port", []) + query.get("ports", [])
    if not texts:
        return list(req.ports)
    return [parse_port(p) for t in texts for p in t.split(",")]


def serve_websocket(ws: ChannelSocket, ports: list[int], req: PortForwardRequest, backend: Backend) -> None:
    """Serve a WebSocket port-forward for ``ports`` (the 101 was already sent)."""
    socks: dict[int, socket.socket] = {}
    lock = threading.Lock()
    remaining = [len(ports)]

    def done() -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            ws.close()

    def pump(i: int, sock: socket.socket) -> None:
        try:
            while True:
                chunk = _recv_vm(sock)
                if not chunk:
                    break
                ws.send(2 * i, chunk)
        except OSError:
            pass
        finally:
            done()

    try:
        for i, port in enumerate(ports):
            prefix = struct.pack("<H", port)
            ws.send(2 * i, prefix)
            ws.send(2 * i + 1, prefix)
        for i, port in enumerate(ports):
            try:
                sock = _vm_socket(backend.dial(req.sandbox_id, port), ws.limits)
            except Exception as exc:
                msg = _error_text(req, port, exc)
                log.info("%s", msg)
                ws.send(2 * i + 1, msg.encode())
                done()
                continue
            socks[i] = sock
            threading.Thread(target=pump, args=(i, sock), daemon=True, name=f"portforward-ws-{port}").start()
        while True:
            frame = ws.receive()
            if frame is None:
                break
            channel, data = frame
            target = socks.get(channel // 2) if channel % 2 == 0 else None
            if target is not None and data:
                try:
                    target.sendall(data)
                except OSError as exc:  # the VM port stopped reading (send_timeout) or went away
                    log.info("port-forward to %s: %s; closing that connection", req.sandbox_id, exc)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        for sock in socks.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        ws.close()
