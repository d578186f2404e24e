"""Fetchers: get the bytes of an image from a Source into a Sink.  Only the HTTP(S) one exists today.

The store knows nothing of protocols: it picks a fetcher by URL scheme and hands it a sink that hashes, writes
and reports progress.  Another transport (e.g. an OCI registry holding disk images) is one more class with a
``fetch`` method and one more scheme in the store's fetcher map.

Error decisions (the kubelet retries a failed pull with back-off, so "may work later" must differ from
"fix your config"): refused connection, DNS failure, silence longer than the profile's timeout, a connection
cut short, HTTP 5xx/429 -> Unavailable; TLS failures and redirect loops -> FailedPrecondition (retrying will
not help until the translation config changes); 404/410 -> NotFound; 401/403 -> PermissionDenied.

The image source policy (``virtlet.images.policy``) is applied here, on every hop: an untrusted URL (a name
without a translation, every redirect) is resolved, checked and connected to by address; a redirect from
https to http, or to another scheme, is refused (FailedPrecondition); a download larger than the policy's
``max_size`` (by Content-Length, or as it streams) is refused with ResourceExhausted naming the limit.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin, urlsplit

from virtlet import __version__, errors, quantity
from virtlet.images import policy as pol
from virtlet.images.translate import Source
from virtlet.images.transport import TransportProfile, ssl_context

_REDIRECTS = {301, 302, 303, 307, 308}
_LENGTH = re.compile(r"^[0-9]{1,20}$")


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
    digest: str = ""  # the image id, when the fetcher vouches for it without a hash of the file (a registry)


class Fetcher(Protocol):
    def fetch(self, source: Source, sink: Sink) -> FetchInfo:
        """Stream the whole image into ``sink``; raise a ``virtlet.errors`` error on failure."""
        ...


class HttpFetcher:
    """HTTP and HTTPS with the stdlib: redirects, an http:// proxy (CONNECT for https), per-profile TLS, under
    an image source policy (default: ``SourcePolicy()``)."""

    def __init__(self, policy: pol.SourcePolicy | None = None) -> None:
        self.policy = policy or pol.SourcePolicy()

    def fetch(self, source: Source, sink: Sink) -> FetchInfo:
        url = source.url
        profile = source.transport
        trusted = source.trusted
        for _hop in range(profile.max_redirects + 1):
            conn = self._connection(url, profile, source, trusted)
            try:
                resp = self._request(conn, url, source)
                if resp.status in _REDIRECTS and resp.getheader("Location"):
                    url = self._redirect(url, resp.getheader("Location", ""), source)
                    trusted = False  # the admin wrote the first URL only; a server chose this one
                    continue
                _check_status(resp, url, source)
                length = (resp.getheader("Content-Length") or "").strip()
                expected = int(length) if _LENGTH.match(length) else None
                if expected is not None and expected > self.policy.max_size:
                    raise self._too_big(source, url, f"its Content-Length is {expected} bytes")
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

    def _redirect(self, url: str, location: str, source: Source) -> str:
        """The next URL, if the policy lets a redirect go there (the address is checked when connecting)."""
        try:
            nxt = urljoin(url, location)
            parts = urlsplit(nxt)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise errors.FailedPrecondition(
                f"image {source.name!r}: {url} redirects to {location[:200]!r}, which is not a valid URL"
            ) from exc
        if parts.scheme not in self.policy.schemes or not parts.hostname:
            raise errors.FailedPrecondition(
                f"image {source.name!r}: {url} redirects to {nxt[:200]!r}; the image source policy allows "
                f"only {' and '.join(self.policy.schemes)} URLs with a host")
        if urlsplit(url).scheme == "https" and parts.scheme == "http":
            raise errors.FailedPrecondition(
                f"image {source.name!r}: {url} redirects to {nxt[:200]!r}; a redirect from https to http is "
                "refused by the image source policy (the image would travel unauthenticated)")
        return nxt

    def _too_big(self, source: Source, url: str, why: str) -> errors.VirtletError:
        limit = self.policy.max_size
        return errors.ResourceExhausted(
            f"image {source.name!r}: {url} is larger than this node's maximum image size "
            f"{quantity.format_bytes(limit)} ({limit} bytes): {why}; the node admin sets the limit with "
            "--image-max-size (image_max_size)")

    def _connection(self, url: str, profile: TransportProfile, source: Source,
                    trusted: bool) -> http.client.HTTPConnection:
        what = f"image {source.name!r} ({url}, {source.origin if url == source.url else 'a redirect'})"
        try:
            return _connection(url, profile, None if trusted else self.policy, what)
        except OSError as exc:
            raise _network_error(exc, url, source) from exc

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
        except ValueError as exc:  # http.client refuses control characters or non-ASCII in the request
            raise errors.FailedPrecondition(
                f"image {source.name!r}: cannot request {url[:200]!r}: {exc}") from exc

    def _stream(self, resp: http.client.HTTPResponse, url: str, source: Source, sink: Sink) -> int:
        """Copy the body into ``sink``; the byte count (http.client's readinto does not flag a short body).
        Stops as soon as the body passes the policy's ``max_size`` (reads at most one byte past it)."""
        got = 0
        limit = self.policy.max_size
        try:
            while True:
                with sink.buffer() as view:
                    n = resp.readinto(view[:min(len(view), limit - got + 1)])
                if not n:
                    return got
                got += n
                sink.commit(n)
                if got > limit:
                    raise self._too_big(source, url, f"the download passed {limit} bytes and was stopped")
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


def _connection(url: str, profile: TransportProfile, policy: pol.SourcePolicy | None,
                what: str) -> http.client.HTTPConnection:
    """A connection for ``url``: to the proxy when the profile has one, else to the host.  With a ``policy``
    (an untrusted URL) the host is resolved and checked first; without a proxy the connection then goes to
    exactly the checked addresses.  Through a proxy the proxy connects: the target is checked as this node
    resolves it, and a name this node cannot resolve is left to the (admin-written, trusted) proxy."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    proxy = urlsplit(profile.proxy) if profile.proxy else None
    addresses: list[pol.Address] | None = None
    if policy is not None:
        try:
            addresses = policy.resolve(host, port, what)
        except socket.gaierror:
            if not proxy:
                raise
    if proxy:
        addresses = None  # connect to the proxy, by its name
    if parts.scheme == "http":
        if proxy:
            return _Http(proxy.hostname or "", proxy.port or 80, profile.timeout, None)
        return _Http(host, port, profile.timeout, addresses)
    ctx = ssl_context(profile.tls)
    server_name = profile.tls.server_name or host
    if proxy:
        conn = _Https(proxy.hostname or "", proxy.port or 80, profile.timeout, ctx, server_name, None)
        conn.set_tunnel(host, port)
        return conn
    return _Https(host, port, profile.timeout, ctx, server_name, addresses)


class _Http(http.client.HTTPConnection):
    """HTTP that connects to the addresses the policy checked (when given) instead of resolving again."""

    def __init__(self, host: str, port: int, timeout: float, addresses: list[pol.Address] | None) -> None:
        super().__init__(host, port, timeout=timeout)
        self._addresses = addresses

    def connect(self) -> None:
        if self._addresses is None:
            super().connect()
        else:
            self.sock = pol.connect(self._addresses, self.timeout)


class _Https(http.client.HTTPSConnection):
    """HTTPS whose TLS server name (SNI and certificate check) may differ from the host connected to."""

    def __init__(self, host: str, port: int, timeout: float, ctx: ssl.SSLContext, server_name: str,
                 addresses: list[pol.Address] | None) -> None:
        super().__init__(host, port, timeout=timeout, context=ctx)
        self._server_name = server_name
        self._addresses = addresses

    def connect(self) -> None:
        if self._addresses is None:
            http.client.HTTPConnection.connect(self)  # TCP, and the CONNECT tunnel when proxied
        else:
            self.sock = pol.connect(self._addresses, self.timeout)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)  # type: ignore[attr-defined]
