"""virtlet-criproxy configuration: defaults < YAML file (``--config``) < command-line flags.

A bad value stops the proxy at start with a message naming the key, so a typo in a node's config is found at
deploy time rather than as pods landing on the wrong runtime.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from virtlet import errors
from virtlet.proxy.naming import ID_SEPARATOR

LOG_LEVELS = ("debug", "info", "warning", "error")
VIRTLET_RUNTIME = "virtlet.cloud"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
KEYS = ("listen", "primary", "secondaries", "virtlet_handler", "log_level", "list_timeout", "probe_timeout",
        "state_dir")


class ConfigError(errors.InvalidArgument):
    """A configuration value is invalid; the message names the key."""


@dataclass(frozen=True)
class ProxyConfig:
    listen: Path = Path("/run/criproxy.sock")
    primary: str = "unix:///run/containerd/containerd.sock"
    secondaries: Mapping[str, str] = field(default_factory=lambda: {VIRTLET_RUNTIME: "unix:///run/virtlet.sock"})
    virtlet_handler: str = "virtlet"
    log_level: str = "info"
    list_timeout: float = 2.0
    probe_timeout: float = 5.0
    state_dir: Path = Path("/var/lib/virtlet-criproxy")

    @property
    def handlers(self) -> dict[str, str]:
        """RuntimeClass handler -> secondary runtime name."""
        return {self.virtlet_handler: VIRTLET_RUNTIME} if self.virtlet_handler else {}


def _address(key: str, value: Any) -> str:
    """``unix:///abs/path`` (a bare absolute path is accepted and normalised)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected unix:///absolute/path, got {value!r}")
    path = value.removeprefix("unix://")
    if not path.startswith("/"):
        raise ConfigError(f"{key}: expected unix:///absolute/path, got {value!r}")
    return f"unix://{path}"


def _secondaries(key: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a map of runtime name to unix:///socket, got {value!r}")
    out = {}
    for name, address in value.items():
        if not isinstance(name, str) or not _NAME.match(name) or ID_SEPARATOR in name:
            raise ConfigError(f"{key}: runtime name {name!r} must be lowercase letters, digits, '.' and '-' "
                              f"(like virtlet.cloud) without {ID_SEPARATOR!r}")
        out[name] = _address(f"{key}.{name}", address)
    return out


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 600:
        raise ConfigError(f"{key}: expected seconds between 0 and 600, got {value!r}")
    return float(value)


def from_mapping(data: Mapping[str, Any], base: ProxyConfig | None = None) -> ProxyConfig:
    """A config from ``base`` (the defaults) overridden by ``data``; unknown keys are refused."""
    base = base or ProxyConfig()
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown setting; known: {', '.join(KEYS)}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "listen":
            values[key] = Path(_address(key, value).removeprefix("unix://"))
        elif key == "primary":
            values[key] = _address(key, value)
        elif key == "secondaries":
            values[key] = _secondaries(key, value if value is not None else {})
        elif key == "virtlet_handler":
            if not isinstance(value, str):
                raise ConfigError(f"virtlet_handler: expected a handler name or '', got {value!r}")
            values[key] = value
        elif key == "state_dir":
            if not isinstance(value, str) or not value.startswith("/"):
                raise ConfigError(f"state_dir: expected an absolute directory path, got {value!r}")
            values[key] = Path(value)
        elif key == "log_level":
            if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
                raise ConfigError(f"log_level: expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
            values[key] = value.lower()
        else:
            values[key] = _seconds(key, value)
    merged = {**base.__dict__, **values}
    cfg = ProxyConfig(**merged)
    if cfg.virtlet_handler and VIRTLET_RUNTIME not in cfg.secondaries:
        raise ConfigError(f"virtlet_handler: routes to {VIRTLET_RUNTIME} but secondaries has no "
                          f"{VIRTLET_RUNTIME} entry; add it or set virtlet_handler to ''")
    if str(cfg.listen) in {a.removeprefix("unix://") for a in (cfg.primary, *cfg.secondaries.values())}:
        raise ConfigError(f"listen: {cfg.listen} is also a backend address")
    return cfg


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="virtlet-criproxy", description=(
        "CRI proxy: serves the kubelet on one socket, runs VM pods on virtletd and all other pods on the "
        "primary runtime (containerd)."))
    ap.add_argument("--config", type=Path, help="YAML file with the settings below (flags win)")
    ap.add_argument("--listen", help="socket to serve CRI on (default /run/criproxy.sock)")
    ap.add_argument("--primary", help="primary runtime (default unix:///run/containerd/containerd.sock)")
    ap.add_argument("--secondary", action="append", metavar="NAME=ADDRESS",
                    help="secondary runtime, repeatable (default virtlet.cloud=unix:///run/virtlet.sock)")
    ap.add_argument("--virtlet-handler", help="RuntimeClass handler for virtlet.cloud (default virtlet)")
    ap.add_argument("--log-level", help=f"one of {', '.join(LOG_LEVELS)} (default info)")
    ap.add_argument("--list-timeout", type=float, help="seconds a secondary may take in a list (default 2)")
    ap.add_argument("--probe-timeout", type=float, help="seconds for the CRI version probe (default 5)")
    ap.add_argument("--state-dir", help="directory for the id index and last-known lists "
                                        "(default /var/lib/virtlet-criproxy)")
    return ap


def load(argv: Sequence[str] | None = None) -> ProxyConfig:
    """Parse flags, read the YAML file they name, validate everything (ConfigError names the bad key)."""
    args = parser().parse_args(argv)
    cfg = ProxyConfig()
    if args.config is not None:
        try:
            data = yaml.safe_load(args.config.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"config: cannot read {args.config}: {exc.strerror}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {args.config} is not valid YAML: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ConfigError(f"config: {args.config} must hold a map of settings")
        cfg = from_mapping(data, cfg)
    flags: dict[str, Any] = {k: v for k, v in (
        ("listen", args.listen), ("primary", args.primary), ("virtlet_handler", args.virtlet_handler),
        ("log_level", args.log_level), ("list_timeout", args.list_timeout),
        ("probe_timeout", args.probe_timeout), ("state_dir", args.state_dir)) if v is not None}
    if args.secondary:
        pairs: dict[str, str] = {}
        for item in args.secondary:
            name, sep, address = item.partition("=")
            if not sep:
                raise ConfigError(f"secondaries: --secondary expects NAME=ADDRESS, got {item!r}")
            pairs[name] = address
        flags["secondaries"] = pairs
    return from_mapping(flags, cfg) if flags else cfg
