"""A real registry (Debian's ``docker-registry``: distribution v2) on loopback for tests, a small Bearer token
server for it, and push code that writes containerDisk images (a disk file under ``/disk/`` in a tar layer)."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import io
import json
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

REGISTRY_BIN = "/usr/bin/docker-registry"
USER_OF_REFRESH = "refresh-user"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Registry:
    """``docker-registry serve`` on 127.0.0.1:<free port>, storage and config in ``base``; killed on exit."""

    def __init__(self, base: Path, users: dict[str, str] | None = None, token: TokenServer | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        """``tls``: (certificate, key) files: the registry speaks HTTPS (see ``make_tls``)."""
        self.base = base
        self.tls = tls
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = base / "storage"
        self.users = users or {}
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Registry:
        self.storage.mkdir(parents=True)
        auth = ""
        if self.users:
            htpasswd = self.base / "htpasswd"
            lines = [subprocess.run(["htpasswd", "-Bbn", u, p], check=True, capture_output=True,
                                    text=True).stdout.strip() for u, p in self.users.items()]
            htpasswd.write_text("\n".join(lines) + "\n")
            auth = f"auth:\n  htpasswd:\n    realm: virtlet-test\n    path: {htpasswd}\n"
        elif self.token:
            auth = (f"auth:\n  token:\n    realm: {self.token.url}/token\n    service: {self.token.service}\n"
                    f"    issuer: {self.token.issuer}\n    rootcertbundle: {self.token.cert_path}\n")
        config = self.base / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\n  accesslog: {disabled: true}\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n  delete: {{enabled: true}}\n"
            f"http:\n  addr: {self.host}\n  secret: {uuid.uuid4().hex}\n"
            + (f"  tls:\n    certificate: {self.tls[0]}\n    key: {self.tls[1]}\n" if self.tls else "") + auth)
        self.log = open(self.base / "registry.log", "wb")
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        self.__exit__()
        raise RuntimeError(f"registry did not start: {(self.base / 'registry.log').read_text()[-2000:]}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.log.close()

    def blob_path(self, digest: str) -> Path:
        hexd = digest.removeprefix("sha256:")
        return self.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def disk_image_id(self, manifest: str) -> str:
        """The id virtletd gives the containerDisk of a pushed single-layer image manifest (docs/images.md):
        sha256 of "virtlet containerDisk v1 <tar|gzip|zstd> <layer digest>".  ``manifest``: its digest, or
        ``repo:tag``."""
        if not manifest.startswith("sha256:"):
            repo, tag = manifest.rsplit(":", 1)
            link = self.storage / "docker/registry/v2/repositories" / repo / "_manifests/tags" / tag / "current/link"
            manifest = link.read_text().strip()
        layer = json.loads(self.blob_path(manifest).read_bytes())["layers"][0]
        mt = layer["mediaType"]
        kind = "zstd" if mt.endswith("+zstd") else "gzip" if mt.endswith("gzip") else "tar"
        return _digest(f"virtlet containerDisk v1 {kind} {layer['digest']}".encode())


class Pusher:
    """Pushes blobs and manifests with a fixed Authorization header (Basic, or a Bearer token)."""

    def __init__(self, host: str, authorization: str | None = None, ca: Path | None = None) -> None:
        self.ca = ca
        self.host = host
        self.authorization = authorization

    def _req(self, method: str, path: str, body: bytes = b"", ctype: str = "") -> http.client.HTTPResponse:
        if self.ca is not None:
            import ssl

            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, timeout=60, context=ssl.create_default_context(cafile=str(self.ca)))
        else:
            conn = http.client.HTTPConnection(self.host, timeout=60)
        headers = {"Content-Length": str(len(body))}
        if ctype:
            headers["Content-Type"] = ctype
        if self.authorization:
            headers["Authorization"] = self.authorization
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        conn.close()
        return resp

    def blob(self, repo: str, data: bytes) -> dict[str, Any]:
        resp = self._req("POST", f"/v2/{repo}/blobs/uploads/")
        assert resp.status == 202, resp.status
        loc = urlsplit(resp.getheader("Location", ""))
        digest = _digest(data)
        sep = "&" if loc.query else ""
        resp = self._req("PUT", f"{loc.path}?{loc.query}{sep}digest={digest}", data, "application/octet-stream")
        assert resp.status == 201, resp.status
        return {"digest": digest, "size": len(data)}

    def manifest(self, repo: str, ref: str, doc: dict[str, Any]) -> str:
        body = json.dumps(doc).encode()
        resp = self._req("PUT", f"/v2/{repo}/manifests/{ref}", body, doc["mediaType"])
        assert resp.status == 201, (resp.status, resp.reason)
        return _digest(body)

    def busybox(self, repo: str, tag: str) -> str:
        """Push the ordinary busybox image of ``oci_image`` (what containerd runs); the manifest digest."""
        from tests.helpers.oci_image import MANIFEST_TYPE, parts

        layer, config, manifest = parts()
        self.blob(repo, layer)
        self.blob(repo, config)
        resp = self._req("PUT", f"/v2/{repo}/manifests/{tag}", manifest, MANIFEST_TYPE)
        assert resp.status == 201, (resp.status, resp.reason)
        return _digest(manifest)

    def container_disk(self, repo: str, tag: str, disk: Path, compress: bool = True,
                       extra: dict[str, bytes] | None = None, docker: bool = False, zstd: bool = False) -> str:
        """Push ``disk`` as ``/disk/<name>`` in one layer (gzip, zstd or plain tar); the manifest digest."""
        layer = layer_tar({f"disk/{disk.name}": disk.read_bytes(), **(extra or {})})
        if zstd:
            import zstandard

            layer = zstandard.ZstdCompressor(level=1).compress(layer)
        elif compress:
            layer = gzip.compress(layer, compresslevel=1)
        config = self.blob(repo, json.dumps({"architecture": "amd64", "os": "linux",
                                             "rootfs": {"type": "layers", "diff_ids": []}}).encode())
        desc = self.blob(repo, layer)
        if docker:
            mt, lmt, cmt = DOCKER_MANIFEST, "application/vnd.docker.image.rootfs.diff.tar", \
                "application/vnd.docker.container.image.v1+json"
        else:
            mt, lmt, cmt = OCI_MANIFEST, "application/vnd.oci.image.layer.v1.tar", \
                "application/vnd.oci.image.config.v1+json"
        return self.manifest(repo, tag, {
            "schemaVersion": 2, "mediaType": mt, "config": {"mediaType": cmt, **config},
            "layers": [{"mediaType": lmt + ("+zstd" if zstd else "+gzip" if compress else ""), **desc}]})

    def index(self, repo: str, tag: str, manifests: dict[str, str]) -> str:
        """An OCI index of already pushed manifests: {"os/arch": digest}."""
        entries = []
        for platform, digest in manifests.items():
            conn = http.client.HTTPConnection(self.host, timeout=60)
            headers = {"Accept": OCI_MANIFEST}
            if self.authorization:
                headers["Authorization"] = self.authorization
            conn.request("GET", f"/v2/{repo}/manifests/{digest}", headers=headers)
            size = len(conn.getresponse().read())
            conn.close()
            os_, arch = platform.split("/")
            entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                            "platform": {"os": os_, "architecture": arch}})
        return self.manifest(repo, tag, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries})


def layer_tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({p.rsplit("/", 1)[0] for p in files if "/" in p})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class TokenServer:
    """A Bearer token server for distribution's ``auth: token``: checks Basic credentials against ``users``
    and signs an RS256 JWT granting pull (and push) on the asked repository."""

    service = "virtlet-test-registry"
    issuer = "virtlet-test-issuer"

    def __init__(self, base: Path, users: dict[str, str]) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.users = users
        self.requests: list[str] = []
        self.refresh_token = "refresh-" + uuid.uuid4().hex  # accepted as an OAuth2 refresh token (POST)
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "virtlet-test-token")])
        now = time.time()
        import datetime

        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(datetime.datetime.fromtimestamp(now - 3600, datetime.UTC))
                     .not_valid_after(datetime.datetime.fromtimestamp(now + 86400, datetime.UTC))
                     .sign(self.key, hashes.SHA256()))
        self.cert_path = base / "token-cert.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.der = self.cert.public_bytes(serialization.Encoding.DER)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                server.requests.append(self.path)
                form = parse_qs(self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode())
                ok = form.get("grant_type") == ["refresh_token"] and \
                    form.get("refresh_token") == [server.refresh_token]
                body = json.dumps({"access_token": server.sign(USER_OF_REFRESH, form.get("scope", [""])[0])}
                                  if ok else {"errors": [{"code": "UNAUTHORIZED", "message": "bad refresh token"}]})
                self.send_response(200 if ok else 401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def do_GET(self) -> None:
                server.requests.append(self.path)
                q = parse_qs(urlsplit(self.path).query)
                user = server._user(self.headers.get("Authorization", ""))
                if user is None:
                    body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
                    self.send_response(401)
                else:
                    body = json.dumps({"token": server.sign(user, q.get("scope", [""])[0])})
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> TokenServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _user(self, header: str) -> str | None:
        if not header.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        return user if self.users.get(user) == password else None

    def sign(self, user: str, scope: str) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        if scope.startswith("repository:"):
            _, repo, actions = scope.split(":", 2)
            access.append({"type": "repository", "name": repo, "actions": actions.split(",")})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [base64.b64encode(self.der).decode()]}
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + 600, "nbf": now - 60,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}

        def b64(d: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

        signing = f"{b64(header)}.{b64(claims)}"
        sig = self.key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()


def make_tls(base: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 signed by it (openssl): (ca, cert, key)."""
    base.mkdir(parents=True, exist_ok=True)
    ca, ca_key = base / f"{name}.pem", base / f"{name}.key"
    cert, key, csr = base / f"{name}-server.pem", base / f"{name}-server.key", base / f"{name}-server.csr"
    ext = base / f"{name}-ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", f"/CN=virtlet test {name}")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out",
        str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key
