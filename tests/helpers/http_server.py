"""A real HTTP/HTTPS server on 127.0.0.1 for tests and benches that download images (or anything else).

Routes (``<rel>`` is a path below ``root``)::

    /files/<rel>[?type=<content-type>]   the file (sendfile on plain HTTP), application/octet-stream
    /slow/<rel>                           the file at ``slow_rate`` bytes/s (for kill-mid-download tests)
    /redirect/<rel>                       302 to /files/<rel>
    /goto?to=<url>                        302 to any URL (redirect-policy tests: https->http, loopback, ...)
    /nolength/<rel>                       the file without Content-Length, ended by closing (size-cap tests)
    /truncate/<rel>                       Content-Length of the whole file, then half of it and close
    /loop/<x>                             302 to itself, forever
    /stall/<x>                            200, Content-Length 1 MiB, 16 bytes, then silence until stop()
    /html/<x>                             200 text/html page ("Sign in to download")
    /stats                                JSON {path: GET count} (for a server in another process)
    anything else                         404

``requests`` counts GETs per path (benches count downloads with it).  ``make_pki`` creates a CA, a server
certificate for 127.0.0.1/localhost and a client certificate with the ``openssl`` CLI; pass it as ``tls`` (and
``require_client_cert``) for HTTPS.  ``proxy=True`` makes a forward proxy for absolute-URL GETs instead.
Use as a context manager: ``stop()`` ends stalled handlers and closes the socket, also on test failure.
"""

from __future__ import annotations

import collections
import json
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

HTML_PAGE = (b"<!DOCTYPE html>\n<html><head><title>Download</title></head>"
             b"<body>Sign in to download</body></html>\n")
STALL_LENGTH = 1 << 20


@dataclass(frozen=True)
class Pki:
    """Paths of PEM files made by ``make_pki``."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @staticmethod
    def pem(path: Path) -> str:
        return path.read_text()


def make_pki(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Pki:
    """A throw-away CA plus server and client certificates signed by it (EC P-256: fast to generate)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    p = Pki(d / "ca.pem", d / "ca.key", d / "server.pem", d / "server.key",
            d / "client.pem", d / "client.key")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *key, "-keyout", str(p.ca_key), "-out", str(p.ca_cert), "-days", "2",
        "-subj", "/CN=virtlet test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    san = ",".join(f"IP:{h}" if h[0].isdigit() else f"DNS:{h}" for h in hosts)
    server_ext = f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n"
    client_ext = "extendedKeyUsage=clientAuth\n"
    for cert, k, cn, ext in ((p.server_cert, p.server_key, hosts[0], server_ext),
                             (p.client_cert, p.client_key, "virtlet test client", client_ext)):
        csr, extfile = d / f"{cert.stem}.csr", d / f"{cert.stem}.ext"
        extfile.write_text(ext)
        run("req", "-new", *key, "-keyout", str(k), "-out", str(csr), "-subj", f"/CN={cn}")
        run("x509", "-req", "-in", str(csr), "-CA", str(p.ca_cert), "-CAkey", str(p.ca_key),
            "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(extfile))
    return p


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: ImageHttpServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        ctx = self.owner.ssl_context
        if ctx is not None:
            try:  # handshake in the handler thread, so a silent client cannot block accept()
                request = ctx.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        super().finish_request(request, client_address)


class ImageHttpServer:
    """One server on a free loopback port; see the module docstring for the routes."""

    def __init__(self, root: Path, *, tls: Pki | None = None, require_client_cert: bool = False,
                 slow_rate: int = 256 * 1024, proxy: bool = False) -> None:
        self.root = Path(root)
        self.slow_rate = slow_rate
        self.proxy = proxy
        self.requests: collections.Counter[str] = collections.Counter()
        self.ssl_context: ssl.SSLContext | None = None
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(tls.server_cert, tls.server_key)
            if require_client_cert:
                ctx.load_verify_locations(tls.ca_cert)
                ctx.verify_mode = ssl.CERT_REQUIRED
            self.ssl_context = ctx
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _handler_class(self))
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context else "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def name(self, path: str) -> str:
        """The image name (no scheme) that an untranslated pull turns into ``url(path)``."""
        return f"127.0.0.1:{self.port}/{path.lstrip('/')}"

    def count(self, path: str) -> int:
        with self._lock:
            return self.requests["/" + path.lstrip("/")]

    def start(self) -> ImageHttpServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> ImageHttpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler_class(server: ImageHttpServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            with server._lock:
                server.requests[parts.path] += 1
            try:
                if server.proxy:
                    return self._forward()
                kind, _, rel = parts.path.lstrip("/").partition("/")
                query = parse_qs(parts.query)
                if kind == "loop":
                    return self._redirect(parts.path)
                if kind == "redirect":
                    return self._redirect(f"/files/{rel}")
                if kind == "goto":
                    return self._redirect(query.get("to", ["/"])[0])
                if kind == "html":
                    return self._send(200, HTML_PAGE, "text/html; charset=utf-8")
                if kind == "stall":
                    return self._stall()
                if kind == "stats":
                    with server._lock:
                        body = json.dumps(dict(server.requests)).encode()
                    return self._send(200, body, "application/json")
                path = self._file(rel)
                if kind == "truncate" and path is not None:
                    return self._truncated(path)
                if kind == "nolength" and path is not None:
                    return self._no_length(path)
                if kind in ("files", "slow") and path is not None:
                    ctype = query.get("type", ["application/octet-stream"])[0]
                    return self._serve(path, ctype, slow=kind == "slow")
                self._send(404, b"not found\n", "text/plain")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
                pass

        def _file(self, rel: str) -> Path | None:
            p = (server.root / rel).resolve()
            if not p.is_relative_to(server.root.resolve()) or not p.is_file():
                return None
            return p

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _stall(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(STALL_LENGTH))
            self.end_headers()
            self.wfile.write(b"\0" * 16)
            self.wfile.flush()
            server.stopping.wait(120)

        def _truncated(self, path: Path) -> None:
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.close_connection = True

        def _no_length(self, path: Path) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            with open(path, "rb") as f:
                shutil.copyfileobj(f, self.wfile, 1 << 20)

        def _serve(self, path: Path, ctype: str, slow: bool) -> None:
            size = path.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.flush()
            with open(path, "rb") as f:
                if not slow:
                    self.connection.sendfile(f)
                    return
                chunk = max(server.slow_rate // 10, 1)
                while data := f.read(chunk):
                    self.wfile.write(data)
                    self.wfile.flush()
                    if server.stopping.wait(0.1):
                        return

        def _forward(self) -> None:
            if not self.path.startswith("http://"):
                return self._send(400, b"proxy: absolute http:// URL expected\n", "text/plain")
            try:
                up = urllib.request.urlopen(self.path, timeout=30)
            except urllib.error.HTTPError as exc:
                return self._send(exc.code, exc.read(), "text/plain")
            with up:
                self.send_response(up.status)
                for h in ("Content-Type", "Content-Length"):
                    if up.headers.get(h):
                        self.send_header(h, up.headers[h])
                self.end_headers()
                shutil.copyfileobj(up, self.wfile, 1 << 20)

    return Handler


def free_port() -> int:
    """A loopback port nothing listens on (for connection-refused tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    """``python -m tests.helpers.http_server --root DIR``: serve until killed; prints the port on stdout."""
    import argparse

    ap = argparse.ArgumentParser(description="virtlet test image server")
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--tls-dir", type=Path, help="make a PKI here and serve HTTPS")
    args = ap.parse_args(argv)
    tls = make_pki(args.tls_dir) if args.tls_dir else None
    srv = ImageHttpServer(args.root, tls=tls).start()
    print(srv.port, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
