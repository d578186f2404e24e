"""Transport profiles: how to reach an image URL (timeouts, redirects, proxy, TLS), and their SSL contexts.

Profiles are data parsed from translation configs; the SSL context is built here once per distinct TLS setting
and cached, because loading certificates on every pull would be wasted work and a slow path for errors.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import threading
from dataclasses import dataclass, field

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_REDIRECTS = 10


@dataclass(frozen=True)
class TlsConfig:
    """PEM text: ``ca_certs`` are trusted in addition to the system CAs; ``client_certs`` are (cert, key)."""

    ca_certs: tuple[str, ...] = ()
    client_certs: tuple[tuple[str, str], ...] = ()
    server_name: str | None = None
    insecure: bool = False


@dataclass(frozen=True)
class TransportProfile:
    """``timeout`` is seconds of silence allowed per socket operation (connect, each read), not a total."""

    name: str = "default"
    timeout: float = DEFAULT_TIMEOUT_S
    max_redirects: int = DEFAULT_MAX_REDIRECTS
    proxy: str | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)


_cache: dict[TlsConfig, ssl.SSLContext] = {}
_cache_lock = threading.Lock()


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """The client SSL context for ``tls``; raises ``ssl.SSLError``/``ValueError`` for unusable PEM."""
    with _cache_lock:
        ctx = _cache.get(tls)
        if ctx is None:
            ctx = _build(tls)
            _cache[tls] = ctx
        return ctx


def _build(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    for pem in tls.ca_certs:
        ctx.load_verify_locations(cadata=pem)
    for cert, key in tls.client_certs:
        _load_client_cert(ctx, cert, key)
    if tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    # The ssl module loads a key pair only from files: write them to a private dir and remove it at once.
    with tempfile.TemporaryDirectory(prefix="virtlet-tls-") as d:
        os.chmod(d, 0o700)
        cert_path, key_path = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, text in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        ctx.load_cert_chain(cert_path, key_path)
