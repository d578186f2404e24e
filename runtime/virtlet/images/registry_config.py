"""The node's registry configuration (``image_registries_config``, default ``/etc/virtlet/registries.yaml``).

One YAML file, written by the node admin (keep it ``0600``, it holds passwords)::

    registries:
      registry.corp.example:            # host[:port] exactly as in image references
        auth:                           # node-level credentials, used when the pull brings none
          username: robot
          password: s3cret              # or auth: base64("user:password"), identityToken, registryToken
        ca: |                           # PEM CA trusted for this registry, besides the system CAs
          -----BEGIN CERTIFICATE-----
      127.0.0.1:5000: {}                # loopback registries speak plain HTTP anyway
      build.lan:5000: {insecure: true}  # plain HTTP allowed for this registry
      docker.io:
        mirrors: [mirror.lan:5000]      # asked first, in order; the registry itself when none has the image
      mirror.lan:5000:                  # a mirror's own scheme, CA and (node) credentials
        ca: |
          -----BEGIN CERTIFICATE-----

A loopback registry speaks plain HTTP unless its entry has a ``ca`` (then HTTPS with that CA).

A missing file means no registry settings.  The file is re-read when its mtime, size or inode changes.  A
broken file fails every registry pull with FailedPrecondition naming the file and key, never a value (values
may be secrets).  virtletd logs a warning when the file holds credentials and is readable by group or others.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

import yaml

from virtlet import errors
from virtlet.images.registry import Credentials, HostConfig

log = logging.getLogger(__name__)
_HOST_KEYS = {"auth", "ca", "insecure", "mirrors"}
_HOST = re.compile(r"^[A-Za-z0-9.-]{1,253}(?::[0-9]{1,5})?$")
_AUTH_KEYS = {"username": "username", "password": "password", "auth": "auth",
              "identityToken": "identity_token", "registryToken": "registry_token"}


class RegistryConfig:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._hosts: dict[str, HostConfig] = {}
        self._broken: str | None = None

    def lookup(self, host: str) -> HostConfig:
        if self.path is None:
            return HostConfig()
        with self._lock:
            try:
                st = os.stat(self.path)
                sig: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
            except FileNotFoundError:
                sig = None
            if sig != self._signature:
                self._signature = sig
                self._load(st.st_mode if sig else 0)
            if self._broken:
                raise errors.FailedPrecondition(
                    f"registry config {self.path} is invalid, fix it to pull from registries: {self._broken}")
            return self._hosts.get(host, HostConfig())

    def _load(self, mode: int) -> None:
        self._hosts, self._broken = {}, None
        if self._signature is None:
            return
        try:
            doc = yaml.safe_load(Path(str(self.path)).read_text()) or {}
            self._hosts = parse(doc)
        except (OSError, yaml.YAMLError) as exc:
            self._broken = f"cannot read it as YAML ({type(exc).__name__})"
            return
        except ValueError as exc:
            self._broken = str(exc)
            return
        if mode & 0o077 and any(h.credentials for h in self._hosts.values()):
            log.warning("registry config %s holds credentials and is readable by group or others (mode %o); "
                        "make it 0600", self.path, mode & 0o777)


def parse(doc: Any) -> dict[str, HostConfig]:
    """``ValueError`` naming the key (never a value) for anything malformed."""
    if not isinstance(doc, dict) or set(doc) - {"registries"}:
        raise ValueError("the file must be a map with the one key 'registries'")
    hosts = doc.get("registries") or {}
    if not isinstance(hosts, dict):
        raise ValueError("registries: must be a map of host[:port] to settings")
    out = {}
    for host, body in hosts.items():
        body = body or {}
        if not isinstance(body, dict) or set(body) - _HOST_KEYS:
            raise ValueError(f"registries.{host}: allowed keys are {', '.join(sorted(_HOST_KEYS))}")
        auth = body.get("auth") or {}
        if not isinstance(auth, dict) or set(auth) - set(_AUTH_KEYS) or \
                not all(isinstance(v, str) for v in auth.values()):
            raise ValueError(f"registries.{host}.auth: allowed keys are {', '.join(_AUTH_KEYS)} (strings)")
        ca = body.get("ca")
        if ca is not None and (not isinstance(ca, str) or "BEGIN CERTIFICATE" not in ca):
            raise ValueError(f"registries.{host}.ca: expected PEM certificate text")
        if not isinstance(body.get("insecure", False), bool):
            raise ValueError(f"registries.{host}.insecure: expected true or false")
        mirrors = body.get("mirrors") or []
        if not isinstance(mirrors, list) or len(mirrors) > 8 or \
                not all(isinstance(m, str) and _HOST.match(m) for m in mirrors):
            raise ValueError(f"registries.{host}.mirrors: expected a list of at most 8 host[:port]")
        try:
            creds = Credentials.build(**{_AUTH_KEYS[k]: v for k, v in auth.items()})
        except errors.InvalidArgument as exc:
            raise ValueError(f"registries.{host}.auth.auth: not base64 of 'username:password'") from exc
        out[str(host)] = HostConfig(bool(body.get("insecure", False)), ca, creds, configured=True,
                                    mirrors=tuple(mirrors))
    return out
