"""Fetchers: get the bytes of an image from a Source into a Sink.  Only the HTTP(S) one exists today.

The store knows nothing of protocols: it picks a fetcher by URL scheme and hands it a sink that hashes, writes
and reports progress.  Another transport (e.g. an OCI registry holding disk images) is one more class with a
``fetch`` method and one more scheme in the store's fetcher map.

Error decisions (the kubelet retries a failed pull with back-off, so "may work later" must differ from
"fix your config"): refused connection, DNS failure, silence longer than the profile's timeout, a connection
cut short, HTTP 5xx/429 -> Unavailable; TLS failures and redirect loops -> FailedPrecondition (retrying will
not help until the translation config changes); 404/410 -> NotFound; 401/403 -> PermissionDenied.
"""

from __future__ import annotations

import http.client
import socket
import ssl
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin, urlsplit

from virtlet import __version__, errors
from virtlet.images.translate import Source
from virtlet.images.transport import TransportProfile, ssl_context

_REDIRECTS = {301, 302, 303, 307, 308}


class Sink(Protocol):
    """Receives the image bytes in order: through ``write``, or without a copy by filling ``buffer()`` and
    calling ``commit(n)``."""

    def expect(self, total: int | None) -> None: ...

    def write(self, data: memoryview) -> None: ...

    def buffer(self) -> memoryview: ...

    def commit(self, n: int) -> None: ...


@dataclass(frozen=True)
class FetchInfo:
    url: str  # the URL the bytes came from, after redirects
    content_type: str  # "" when the transport has none


class Fetcher(Protocol):
    def fetch(self, source: Source, sink: Sink) -> FetchInfo:
        """Stream the whole image into ``sink``; raise a ``virtlet.errors`` error on failure."""
        ...


class HttpFetcher:
    """HTTP and HTTPS with the stdlib: redirects, an http:// proxy (CONNECT for https), per-profile TLS."""

    def fetch(self, source: Source, sink: Sink) -> FetchInfo:
        url = source.url
        profile = source.transport
        for _hop in range(profile.max_redirects + 1):
            conn = _connection(url, profile)
            try:
                resp = self._request(conn, url, source)
                if resp.status in _REDIRECTS and resp.getheader("Location"):
                    nxt = urljoin(url, resp.getheader("Location", ""))
                    if urlsplit(nxt).scheme not in ("http", "https"):
                        raise errors.FailedPrecondition(
                            f"image {source.name!r}: {url} redirects to {nxt!r}, which is not http(s)")
                    url = nxt
                    continue
                _check_status(resp, url, source)
                length = resp.getheader("Content-Length")
                expected = int(length) if length and length.isdigit() else None
                sink.expect(expected)
                got = self._stream(resp, url, source, sink)
                if expected is not None and got != expected:
                    raise errors.Unavailable(
                        f"image {source.name!r}: {url} closed the connection after {got} of {expected} bytes "
                        f"({expected - got} missing); the pull will be retried")
                return FetchInfo(url, (resp.getheader("Content-Type") or "").split(";")[0].strip().lower())
            finally:
                conn.close()
        raise errors.FailedPrecondition(
            f"image {source.name!r}: more than {profile.max_redirects} redirects starting at {source.url} "
            f"(last: {url}); a redirect loop? (maxRedirects of transport {profile.name!r})")

    def _request(self, conn: http.client.HTTPConnection, url: str,
                 source: Source) -> http.client.HTTPResponse:
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if source.transport.proxy and parts.scheme == "http":
            target = url  # a plain-HTTP proxy wants the absolute URL
        headers = {"User-Agent": f"virtlet/{__version__}", "Accept-Encoding": "identity",
                   "Host": parts.netloc}
        try:
            conn.request("GET", target, headers=headers)
            return conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise _network_error(exc, url, source) from exc

    def _stream(self, resp: http.client.HTTPResponse, url: str, source: Source, sink: Sink) -> int:
        """Copy the body into ``sink``; the byte count (http.client's readinto does not flag a short body)."""
        got = 0
        try:
            while True:
                with sink.buffer() as view:
                    n = resp.readinto(view)
                if not n:
                    return got
                got += n
                sink.commit(n)
        except (OSError, http.client.HTTPException) as exc:
            raise _network_error(exc, url, source) from exc


def _check_status(resp: http.client.HTTPResponse, url: str, source: Source) -> None:
    status = resp.status
    if status == 200:
        return
    what = f"image {source.name!r}: {url} answered {status} {resp.reason}"
    if status in (404, 410):
        raise errors.NotFound(f"{what}; check the name or its translation ({source.origin})")
    if status in (401, 403):
        raise errors.PermissionDenied(f"{what}; the server refuses access")
    if status >= 500 or status == 429:
        raise errors.Unavailable(f"{what}; the server may recover, the pull will be retried")
    raise errors.FailedPrecondition(f"{what}; expected 200 with the image")


def _network_error(exc: BaseException, url: str, source: Source) -> errors.VirtletError:
    host = urlsplit(url).netloc
    profile = source.transport
    if isinstance(exc, ssl.SSLCertVerificationError):
        return errors.FailedPrecondition(
            f"image {source.name!r}: TLS verification of {host} failed ({exc.verify_message}); give its CA "
            f"in tls.certificates (or serverName) of a translation transport profile (now {profile.name!r})")
    if isinstance(exc, ssl.SSLError):
        return errors.FailedPrecondition(
            f"image {source.name!r}: TLS with {host} failed ({exc.reason or exc}); if the server requires a "
            f"client certificate, give cert and key in tls.certificates of transport {profile.name!r}")
    if isinstance(exc, ConnectionRefusedError):
        return errors.Unavailable(f"image {source.name!r}: connection to {host} refused ({url})")
    if isinstance(exc, socket.gaierror):
        return errors.Unavailable(f"image {source.name!r}: cannot resolve host of {url}: {exc.strerror}")
    if isinstance(exc, TimeoutError):
        return errors.Unavailable(
            f"image {source.name!r}: {host} sent nothing for {profile.timeout:g} s ({url}); timeout of "
            f"transport profile {profile.name!r}")
    if isinstance(exc, http.client.IncompleteRead):
        return errors.Unavailable(
            f"image {source.name!r}: {url} closed the connection after {len(exc.partial)} more bytes, "
            f"{exc.expected} missing")
    return errors.Unavailable(f"image {source.name!r}: download from {url} failed: {exc!r}")


def _connection(url: str, profile: TransportProfile) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    proxy = urlsplit(profile.proxy) if profile.proxy else None
    if parts.scheme == "http":
        if proxy:
            return http.client.HTTPConnection(proxy.hostname or "", proxy.port or 80, timeout=profile.timeout)
        return http.client.HTTPConnection(host, port, timeout=profile.timeout)
    ctx = ssl_context(profile.tls)
    server_name = profile.tls.server_name or host
    if proxy:
        conn = _Https(proxy.hostname or "", proxy.port or 80, profile.timeout, ctx, server_name)
        conn.set_tunnel(host, port)
        return conn
    return _Https(host, port, profile.timeout, ctx, server_name)


class _Https(http.client.HTTPSConnection):
    """HTTPS whose TLS server name (SNI and certificate check) may differ from the host connected to."""

    def __init__(self, host: str, port: int, timeout: float, ctx: ssl.SSLContext, server_name: str) -> None:
        super().__init__(host, port, timeout=timeout, context=ctx)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP, and the CONNECT tunnel when proxied
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)  # type: ignore[attr-defined]
