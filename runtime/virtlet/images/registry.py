"""A client of the OCI distribution API (registries): references, credentials, Basic and Bearer auth, requests.

Why our own client and not ``python-dxf``/``oras``: a registry pull must go through the node's image source
policy on every hop (the registry, each blob redirect, the token realm): resolve once, check every address,
connect to exactly the checked addresses (no DNS-rebinding gap), refuse https->http redirects.  Those
libraries use ``requests``, which resolves again on connect and cannot be pinned to checked addresses; they
also log request details.  The protocol part we need is small (GET of manifests and blobs, the 401 challenge,
a token request), so it is written here on the stdlib connections of ``virtlet.images.fetch``, which the
HTTP(S) fetcher already uses; the blobs stream into the store's hashing sink (``containerdisk``).

Plain HTTP is used only for registries on loopback addresses (as Docker and containerd treat localhost) and
for registries the node's registry config marks ``insecure``; everything else is HTTPS.

Secrets (passwords, tokens) live in ``Credentials`` objects whose repr hides them; they are sent only in
``Authorization`` headers, to the registry host and to its token realm, never on a redirect to another host,
and no message or log line contains them.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlencode, urljoin, urlsplit

from virtlet import __version__, errors
from virtlet.images import fetch as ft
from virtlet.images import policy as pol
from virtlet.images.transport import TlsConfig, TransportProfile

_REF = re.compile(r"^(?P<host>[A-Za-z0-9.-]+(?::[0-9]{1,5})?)/(?P<repo>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
                  r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?"
                  r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')
MAX_SMALL_BODY = 4 << 20  # manifests, token answers, error bodies
_LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class Reference:
    host: str  # "registry.example" or "127.0.0.1:5000"
    repo: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repo}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str, what: str) -> Reference:
    """``host[:port]/repo[:tag][@sha256:<hex>]``; without tag and digest the tag is ``latest``."""
    m = _REF.match(text)
    if not m or len(text) > 1024:
        raise errors.InvalidArgument(
            f"{what}: {text[:200]!r} is not a registry reference host[:port]/repository[:tag][@sha256:<64 hex>] "
            "(repository in lowercase letters, digits and . _ - separators)")
    tag, digest = m.group("tag"), m.group("digest")
    return Reference(m.group("host"), m.group("repo"), tag or (None if digest else "latest"), digest)


@dataclass(frozen=True)
class Credentials:
    """From CRI ``AuthConfig`` or the node's registry config.  The repr never shows a secret."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    @classmethod
    def build(cls, username: str = "", password: str = "", auth: str = "", identity_token: str = "",
              registry_token: str = "") -> Credentials | None:
        """None when nothing is given; ``auth`` is base64("user:password") as in a docker config.json."""
        if auth and not username:
            try:
                username, _, password = base64.b64decode(auth, validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError) as exc:
                raise errors.InvalidArgument("auth.auth: not base64 of 'username:password'") from exc
        if not (username or password or identity_token or registry_token):
            return None
        return cls(username, password, identity_token, registry_token)

    def key(self) -> str:
        """A one-way key, so pulls with different credentials never share a download."""
        raw = "\0".join((self.username, self.password, self.identity_token, self.registry_token))
        return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class HostConfig:
    """The node admin's settings for one registry host (``registries`` config)."""

    insecure: bool = False  # plain HTTP allowed
    ca: str | None = None  # PEM trusted in addition to the system CAs
    credentials: Credentials | None = None
    configured: bool = False  # listed in the node's registry config: the admin named it, so it is trusted
    mirrors: tuple[str, ...] = ()  # host[:port] tried in order before this registry (containerdisk.resolve_hosts)


def is_loopback(host: str) -> bool:
    hostname = urlsplit(f"//{host}").hostname or ""
    if hostname in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(hostname).is_loopback
    except ValueError:
        return False


class RegistryClient:
    """Requests to one repository of one registry, authenticated on demand (401 challenge)."""

    def __init__(self, ref: Reference, creds: Credentials | None, host: HostConfig, policy: pol.SourcePolicy,
                 trusted: bool, timeout: float = 60.0, endpoint: str | None = None) -> None:
        """``endpoint``: the host[:port] to ask (a mirror) when it is not ``ref.host``; ``host`` is its config."""
        self.ref = ref
        self.endpoint = endpoint or ref.host
        self.creds = creds if creds is not None else host.credentials
        self.policy = policy
        self.trusted = trusted or host.configured  # the first hop only; redirects and realms are checked
        # a loopback registry speaks plain HTTP (as Docker and containerd assume) unless the admin gave it a CA
        scheme = "http" if host.insecure or (is_loopback(self.endpoint) and not host.ca) else "https"
        self.base = f"{scheme}://{self.endpoint}"
        self.profile = TransportProfile(name=f"registry {self.endpoint}", timeout=timeout,
                                        tls=TlsConfig(ca_certs=(host.ca,) if host.ca else ()))
        self.what = f"image {str(ref)!r}" + (f" (mirror {self.endpoint})" if endpoint else "")
        self._authorization: str | None = None

    def get(self, path: str, accept: str = "") -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """GET ``/v2/<repo>/<path>``: a 200 response (and its connection, which the caller closes)."""
        url = f"{self.base}/v2/{self.ref.repo}/{path}"
        resp, conn = self._send(url, accept, self._authorization)
        if resp.status == 401 and self._authorization is None:
            challenge = resp.getheader("WWW-Authenticate") or ""
            reason = _reason(resp)
            conn.close()
            self._authorization = self._authenticate(challenge, reason)
            resp, conn = self._send(url, accept, self._authorization)
        if resp.status != 200:
            status, reason = resp.status, _reason(resp)
            conn.close()
            raise self._status_error(status, reason, path)
        return resp, conn

    def _send(self, url: str, accept: str, authorization: str | None, form: dict[str, str] | None = None,
              ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """One GET, following redirects under the policy; Authorization only to the registry host itself."""
        trusted = self.trusted
        host = urlsplit(url).netloc
        for _hop in range(self.profile.max_redirects + 1):
            headers = {"User-Agent": f"virtlet/{__version__}", "Accept-Encoding": "identity",
                       "Host": urlsplit(url).netloc}
            if accept:
                headers["Accept"] = accept
            if authorization and urlsplit(url).netloc == host:
                headers["Authorization"] = authorization
            body = urlencode(form).encode() if form is not None else None
            if body is not None:
                headers["Content-Type"] = "application/x-www-form-urlencoded"
            conn = self._connect(url, trusted)
            try:
                parts = urlsplit(url)
                conn.request("POST" if body is not None else "GET",
                             (parts.path or "/") + (f"?{parts.query}" if parts.query else ""), body=body,
                             headers=headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise self._network(exc, url) from exc
            if resp.status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                location = resp.getheader("Location", "")
                conn.close()
                url = self._redirect(url, location)
                trusted = False  # the registry chose this URL (blob storage, a CDN): checked
                continue
            return resp, conn
        raise errors.FailedPrecondition(f"{self.what}: more than {self.profile.max_redirects} redirects")

    def _connect(self, url: str, trusted: bool) -> http.client.HTTPConnection:
        what = f"{self.what} ({urlsplit(url).netloc})"
        try:
            return ft._connection(url, self.profile, None if trusted else self.policy, what)
        except OSError as exc:
            raise self._network(exc, url) from exc

    def _redirect(self, url: str, location: str) -> str:
        nxt = urljoin(url, location)
        parts = urlsplit(nxt)
        if parts.scheme not in self.policy.schemes or not parts.hostname:
            raise errors.FailedPrecondition(f"{self.what}: the registry redirects to a non-http(s) URL")
        if urlsplit(url).scheme == "https" and parts.scheme == "http":
            raise errors.FailedPrecondition(
                f"{self.what}: the registry redirects from https to http, refused by the image source policy")
        return nxt

    def _network(self, exc: BaseException, url: str) -> errors.VirtletError:
        from virtlet.images.translate import Source

        return ft._network_error(exc, url, Source(str(self.ref), url, self.profile, "registry"))

    # -- authentication -------------------------------------------------------------------------------------

    def _authenticate(self, challenge: str, reason: str) -> str:
        scheme, _, params_text = challenge.strip().partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        creds = self.creds
        if scheme.lower() == "basic":
            if creds is None or not creds.username:
                raise self._denied("the registry requires a username and password and none was given", reason)
            return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        if scheme.lower() != "bearer" or "realm" not in params:
            raise self._denied(f"the registry asks for unsupported authentication {scheme[:40]!r}", reason)
        if creds is not None and creds.registry_token:
            return f"Bearer {creds.registry_token}"
        return f"Bearer {self._token(params)}"

    def _token(self, params: dict[str, str]) -> str:
        """A Bearer token from the challenge's realm (checked by the policy: the registry chose it)."""
        query = {"scope": params.get("scope") or f"repository:{self.ref.repo}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        realm = params["realm"]
        if urlsplit(realm).scheme not in self.policy.schemes:
            raise errors.FailedPrecondition(f"{self.what}: the token realm is not an http(s) URL")
        if urlsplit(realm).scheme == "http" and not (is_loopback(urlsplit(realm).netloc)
                                                     or self.base.startswith("http:")):
            raise errors.FailedPrecondition(f"{self.what}: the token realm is plain http on a TLS registry")
        creds = self.creds
        auth = None
        if creds is not None and creds.username and not creds.identity_token:
            auth = "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
        form = None
        if creds is not None and creds.identity_token:  # an OAuth2 refresh token: POSTed, never in a URL
            form = {**query, "grant_type": "refresh_token", "refresh_token": creds.identity_token,
                    "client_id": "virtlet"}
        url = f"{realm}{'&' if '?' in realm else '?'}{urlencode(query)}" if form is None else realm
        trusted = self.trusted and urlsplit(realm).netloc == self.endpoint
        resp, conn = self._send_token(url, auth, trusted, form)
        try:
            if resp.status != 200:
                raise self._denied(f"the token server answered {resp.status} {resp.reason}", _reason(resp))
            try:
                doc = json.loads(resp.read(MAX_SMALL_BODY))
                token = doc.get("token") or doc.get("access_token")
            except (ValueError, AttributeError) as exc:
                raise errors.FailedPrecondition(f"{self.what}: the token server's answer is not JSON") from exc
            if not isinstance(token, str) or not token:
                raise errors.FailedPrecondition(f"{self.what}: the token server's answer has no token")
            return token
        except (OSError, http.client.HTTPException) as exc:
            raise self._network(exc, realm) from exc
        finally:
            conn.close()

    def _send_token(self, url: str, auth: str | None, trusted: bool, form: dict[str, str] | None,
                    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        saved, self.trusted = self.trusted, trusted
        try:  # _send gives Authorization only to the host its URL starts with: here the realm's host
            return self._send(url, "application/json", auth, form)
        finally:
            self.trusted = saved

    def _denied(self, why: str, reason: str) -> errors.VirtletError:
        said = f" (the registry says: {reason})" if reason else ""
        return errors.PermissionDenied(
            f"{self.what}: {why}{said}; give the pod an imagePullSecret for {self.ref.host} or ask the node admin "
            "for node credentials (registries config)")

    def _status_error(self, status: int, reason: str, path: str) -> errors.VirtletError:
        said = f" (the registry says: {reason})" if reason else ""
        what = f"{self.what}: {self.endpoint} answered {status} for {path.split('/')[0]}{said}"
        if status == 401 or status == 403:
            return self._denied(f"{self.endpoint} refused the credentials ({status})", reason)
        if status in (404, 410):
            return errors.NotFound(f"{what}; check the repository, tag or digest")
        if status >= 500 or status == 429:
            return errors.Unavailable(f"{what}; the registry may recover, the pull will be retried")
        return errors.FailedPrecondition(what)


def _reason(resp: http.client.HTTPResponse) -> str:
    """The registry's own words from an error body (``errors[].message``), short and printable."""
    try:
        body = resp.read(64 << 10)
        doc = json.loads(body)
        text = "; ".join(str(e.get("message", e.get("code", ""))) for e in doc.get("errors", [])[:3])
    except (ValueError, AttributeError, OSError, http.client.HTTPException):
        return ""
    return "".join(c for c in text if c.isprintable())[:300]
