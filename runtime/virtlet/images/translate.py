"""Image name -> URL and transport profile, from the YAML translation configs in one directory.

Each ``*.yaml``/``*.yml`` file is one config::

    prefix: mirror                 # optional: the config applies to "mirror/<rest>" and matches <rest>
    translations:
      - name: cirros               # exact name
        url: https://example.com/cirros.img
        transport: corp            # optional profile of this file
      - regexp: 'ubuntu/(\\d+)'    # whole-name match; $1 / ${1} / ${group} in url
        url: https://example.com/ubuntu-$1.img
    transports:
      corp: {timeout: 30000, maxRedirects: 5, proxy: http://proxy:3128,
             tls: {certificates: [{cert: PEM}, {cert: PEM, key: PEM}], serverName: x, insecure: false}}

Precedence is total and independent of dict order (an old Virtlet bug): every exact ``name`` beats every
``regexp``; among equals, files in sorted file-name order, then entries in file order.  Files are re-read
only when the set of (file name, mtime, size, inode) changes.  A broken file fails resolution with
FailedPrecondition naming it, rather than silently falling back to ``https://<name>`` (maybe another host).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from virtlet import errors
from virtlet.images.transport import (
    DEFAULT_MAX_REDIRECTS,
    DEFAULT_TIMEOUT_S,
    TlsConfig,
    TransportProfile,
    ssl_context,
)

log = logging.getLogger(__name__)

DEFAULT_PROFILE = TransportProfile()
_CONFIG_KEYS = {"prefix", "translations", "transports"}
_TRANSLATION_KEYS = {"name", "regexp", "url", "transport"}
_TRANSPORT_KEYS = {"timeout", "maxRedirects", "proxy", "tls"}
_TLS_KEYS = {"certificates", "serverName", "insecure"}
_GROUP_REF = re.compile(r"\$(\$|\d+|\{(\w+)\})")


@dataclass(frozen=True)
class Source:
    """Where an image comes from; ``origin`` says which rule chose it (for error messages)."""

    name: str
    url: str
    transport: TransportProfile
    origin: str
    trusted: bool = False  # True: the URL is the first URL of an admin-written translation (not checked)


@dataclass(frozen=True)
class _Rule:
    prefix: str
    exact: str | None
    pattern: re.Pattern[str] | None
    url: str
    transport: TransportProfile
    origin: str

    def apply(self, name: str) -> str | None:
        if self.prefix:
            if not name.startswith(self.prefix + "/"):
                return None
            name = name[len(self.prefix) + 1:]
        if self.exact is not None:
            return self.url if name == self.exact else None
        assert self.pattern is not None
        m = self.pattern.fullmatch(name)
        return _expand(self.url, m) if m else None


def _expand(template: str, m: re.Match[str]) -> str:
    """Replace ``$1``, ``${1}``, ``${group}`` with the match's groups (missing -> empty); ``$$`` is ``$``."""

    def sub(g: re.Match[str]) -> str:
        token = g.group(2) or g.group(1)
        if token == "$":
            return "$"
        try:
            return m.group(int(token) if token.isdigit() else token) or ""
        except IndexError:
            return ""

    return _GROUP_REF.sub(sub, template)


def _warn_if_key_is_readable(path: Path, rules: list[_Rule]) -> None:
    """Log a warning when a file holding a TLS client key can be read by others than its owner (the Ansible
    role writes 0600 in a 0700 directory).  Only a warning: refusing would stop every pull on the node."""
    if not any(r.transport.tls.client_certs for r in rules):
        return
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return
    if mode & 0o077:
        log.warning("image translation config %s holds a TLS client key but has mode %04o: anyone in its "
                    "group or on the node may read the key; chmod 0600 it (and 0700 its directory)",
                    path, mode)


def _host_is_fixed(template: str) -> bool:
    """True when a translation URL template's scheme and host contain no ``$`` group reference."""
    try:
        parts = urlsplit(template)
    except ValueError:
        return False
    return "$" not in parts.scheme and "$" not in parts.netloc


class ConfigError(ValueError):
    pass


class Translator:
    """Resolves names; thread-safe; cheap per call (one directory scan, re-parse only on change)."""

    def __init__(self, directory: Path, default_scheme: str = "https",
                 schemes: Collection[str] = ("http", "https"), fallback: bool = True) -> None:
        if default_scheme not in ("http", "https"):
            raise ValueError(f"default scheme must be http or https, not {default_scheme!r}")
        self.directory = Path(directory)
        self.default_scheme = default_scheme
        self.schemes = tuple(schemes)
        self.fallback = fallback
        self._lock = threading.Lock()
        self._signature: tuple[tuple[str, int, int, int], ...] | None = None
        self._exact: list[_Rule] = []
        self._regexps: list[_Rule] = []
        self._broken: dict[str, str] = {}

    def resolve(self, name: str) -> Source:
        """The source of a normalised name (no tag, no digest)."""
        exact, regexps, broken = self._rules()
        if broken:
            detail = "; ".join(f"{f}: {e}" for f, e in sorted(broken.items()))
            raise errors.FailedPrecondition(
                f"image translation configs in {self.directory} are invalid, fix them to pull: {detail}")
        for rule in (*exact, *regexps):
            url = rule.apply(name)
            if url is not None:
                # Trusted only when the template fixes the host: "https://$1" lets the name pick it.
                trusted = _host_is_fixed(rule.url)
                return self._checked(Source(name, url, rule.transport, rule.origin, trusted=trusted))
        if not self.fallback:
            raise errors.NotFound(
                f"image {name!r}: no image translation matches this name, and names without a translation are "
                f"not fetched on this node (image_name_fallback is false); the node admin must add a "
                f"translation for {name!r} to a file in {self.directory}")
        return self._checked(Source(name, f"{self.default_scheme}://{name}", DEFAULT_PROFILE,
                                    f"no translation matched, default scheme {self.default_scheme}"))

    def _checked(self, src: Source) -> Source:
        try:
            parts = urlsplit(src.url)
            ok = parts.scheme in self.schemes and bool(parts.hostname)
            parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
        except ValueError as exc:
            raise errors.InvalidArgument(
                f"image {src.name!r} translates to {src.url!r} ({src.origin}), which is not a valid URL: "
                f"{exc}") from exc
        if not ok:
            raise errors.InvalidArgument(
                f"image {src.name!r} translates to {src.url!r} ({src.origin}); only "
                f"{' and '.join(self.schemes)} URLs with a host are allowed")
        return src

    def _rules(self) -> tuple[list[_Rule], list[_Rule], dict[str, str]]:
        with self._lock:
            sig = self._scan()
            if sig != self._signature:
                self._load([entry[0] for entry in sig])
                self._signature = sig
            return self._exact, self._regexps, self._broken

    def _scan(self) -> tuple[tuple[str, int, int, int], ...]:
        out = []
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    if e.name.endswith((".yaml", ".yml")) and e.is_file():
                        st = e.stat()
                        out.append((e.name, st.st_mtime_ns, st.st_size, st.st_ino))
        except FileNotFoundError:
            pass
        return tuple(sorted(out))

    def _load(self, files: list[str]) -> None:
        exact: list[_Rule] = []
        regexps: list[_Rule] = []
        broken: dict[str, str] = {}
        for fname in files:
            path = self.directory / fname
            try:
                rules = parse_config(yaml.safe_load(path.read_text()), str(path))
            except (OSError, yaml.YAMLError, ConfigError) as exc:
                broken[str(path)] = str(exc).replace("\n", " ")
                continue
            _warn_if_key_is_readable(path, rules)
            exact += [r for r in rules if r.exact is not None]
            regexps += [r for r in rules if r.exact is None]
        log.info("image translations loaded from %s: %d names, %d regexps, %d broken files",
                 self.directory, len(exact), len(regexps), len(broken))
        for f, e in broken.items():
            log.error("image translation config %s is invalid: %s", f, e)
        self._exact, self._regexps, self._broken = exact, regexps, broken


def parse_config(doc: Any, origin: str) -> list[_Rule]:
    """Rules of one config document, in file order; ConfigError names the bad key."""
    if doc is None:
        return []
    _mapping(doc, "the file", _CONFIG_KEYS)
    prefix = doc.get("prefix") or ""
    if not isinstance(prefix, str):
        raise ConfigError("prefix must be a string")
    prefix = prefix.strip("/")
    profiles = {"": DEFAULT_PROFILE}
    for pname, body in (_mapping(doc.get("transports") or {}, "transports", None)).items():
        profiles[str(pname)] = _profile(str(pname), body)
    rules = []
    items = doc.get("translations") or []
    if not isinstance(items, list):
        raise ConfigError("translations must be a list")
    for i, t in enumerate(items):
        where = f"translations[{i}]"
        _mapping(t, where, _TRANSLATION_KEYS)
        if ("name" in t) == ("regexp" in t):
            raise ConfigError(f"{where}: give exactly one of 'name' or 'regexp'")
        url = t.get("url")
        if not isinstance(url, str) or not url:
            raise ConfigError(f"{where}: 'url' must be a non-empty string")
        tname = str(t.get("transport") or "")
        if tname not in profiles:
            raise ConfigError(f"{where}: transport {tname!r} is not defined in this file's 'transports'")
        pattern = None
        if "regexp" in t:
            try:
                pattern = re.compile(str(t["regexp"]))
            except re.error as exc:
                raise ConfigError(f"{where}: bad regexp {t['regexp']!r}: {exc}") from exc
        label = f"{origin} {where} " + (f"name {t['name']!r}" if "name" in t else f"regexp {t['regexp']!r}")
        exact = str(t["name"]) if "name" in t else None
        rules.append(_Rule(prefix, exact, pattern, url, profiles[tname], label))
    return rules


def _mapping(value: Any, where: str, allowed: set[str] | None) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping")
    if allowed is not None:
        unknown = sorted(set(map(str, value)) - allowed)
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    return value


def _profile(name: str, body: Any) -> TransportProfile:
    where = f"transports.{name}"
    _mapping(body, where, _TRANSPORT_KEYS)
    timeout_ms = body.get("timeout", DEFAULT_TIMEOUT_S * 1000)
    max_redirects = body.get("maxRedirects", DEFAULT_MAX_REDIRECTS)
    if not isinstance(timeout_ms, int | float) or isinstance(timeout_ms, bool) or timeout_ms <= 0:
        raise ConfigError(f"{where}.timeout must be a positive number of milliseconds")
    if not isinstance(max_redirects, int) or isinstance(max_redirects, bool) or max_redirects < 0:
        raise ConfigError(f"{where}.maxRedirects must be an integer >= 0")
    proxy = body.get("proxy") or None
    if proxy is not None:
        p = urlsplit(str(proxy))
        if p.scheme != "http" or not p.hostname:
            raise ConfigError(f"{where}.proxy must be an http://host:port URL, not {proxy!r}")
        proxy = str(proxy)
    tls = _tls(where + ".tls", body.get("tls") or {})
    return TransportProfile(name, timeout_ms / 1000.0, max_redirects, proxy, tls)


def _tls(where: str, body: Any) -> TlsConfig:
    _mapping(body, where, _TLS_KEYS)
    cas: list[str] = []
    clients: list[tuple[str, str]] = []
    certs = body.get("certificates") or []
    if not isinstance(certs, list):
        raise ConfigError(f"{where}.certificates must be a list")
    for i, c in enumerate(certs):
        _mapping(c, f"{where}.certificates[{i}]", {"cert", "key"})
        if not isinstance(c.get("cert"), str):
            raise ConfigError(f"{where}.certificates[{i}].cert must be PEM text")
        if c.get("key"):
            clients.append((c["cert"], str(c["key"])))
        else:
            cas.append(c["cert"])
    server_name = body.get("serverName") or None
    tls = TlsConfig(tuple(cas), tuple(clients), str(server_name) if server_name else None,
                    bool(body.get("insecure", False)))
    try:
        ssl_context(tls)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise ConfigError(f"{where}: certificates are not usable PEM: {exc}") from exc
    return tls
