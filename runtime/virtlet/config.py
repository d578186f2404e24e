"""virtletd configuration: defaults < YAML file < ``VIRTLET_*`` environment < command-line flags.

Every setting has one row in ``SETTINGS``; the table in ``docs/configuration.md`` is generated from it
(``python -m virtlet.config --markdown``), so code and documentation cannot drift apart.  A bad value stops
the daemon at start with a message naming the key.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from virtlet import errors, quantity

LOG_LEVELS = ("debug", "info", "warning", "error")
KVM_MODES = ("auto", "on", "off")
SCHEMES = ("http", "https")


class ConfigError(errors.InvalidArgument):
    """A configuration value is invalid; the message names the key."""


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _path(key: str, value: Any) -> Path:
    return Path(_str(key, value))


def _choice(choices: Sequence[str]) -> Callable[[str, Any], str]:
    def parse(key: str, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return parse


def _path_list(key: str, value: Any) -> tuple[Path, ...]:
    if isinstance(value, str):
        items = [p for p in value.split(":") if p]
    elif isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        items = value
    else:
        raise ConfigError(f"{key}: expected a list of paths or a colon-separated string, got {value!r}")
    if not items:
        raise ConfigError(f"{key}: needs at least one directory")
    return tuple(Path(p) for p in items)


def _host_port(key: str, value: Any) -> str:
    text = _str(key, value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT (port 0-65535), got {value!r}")
    return text


def _optional_host_port(key: str, value: Any) -> str:
    return "" if value == "" else _host_port(key, value)


def _size(key: str, value: Any) -> int:
    try:
        return quantity.parse_bytes(str(value) if isinstance(value, int) else value, 2**63 - 1)
    except ValueError as exc:
        raise ConfigError(f"{key}: expected a size such as 64Gi: {exc}") from exc


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _seconds(key: str, value: Any) -> int:
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not text.isascii() or not text.isdigit() or not 0 <= int(text) <= 3600:
        raise ConfigError(f"{key}: expected whole seconds from 0 to 3600, got {value!r}")
    return int(text)


def _cidr_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise ConfigError(f"{key}: expected a list of CIDRs or a comma-separated string, got {value!r}")
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError as exc:
            raise ConfigError(f"{key}: {item!r} is not an address or CIDR such as 127.0.0.0/8") from exc
    return tuple(out)


def _listen(key: str, value: Any) -> str:
    text = _str(key, value)
    return text.removeprefix("unix://")


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    parse: Callable[[str, Any], Any]
    help: str

    @property
    def env(self) -> str:
        return "VIRTLET_" + self.key.upper()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


SETTINGS: tuple[Setting, ...] = (
    Setting("listen", "/run/virtlet.sock", _listen, "unix socket the CRI gRPC server listens on (mode 0660)"),
    Setting("state_dir", Path("/var/lib/virtlet"), _path, "state database and per-container files"),
    Setting("run_dir", Path("/run/virtlet"), _path, "runtime files: console sockets, DHCP servers, pid files"),
    Setting("libvirt_uri", "qemu:///system", _str, "libvirt connection URI"),
    Setting("image_dir", Path("/var/lib/virtlet/images"), _path, "content-addressed image store"),
    Setting("image_translations_dir", Path("/etc/virtlet/images"), _path,
            "directory of image name translation YAML files"),
    Setting("image_default_scheme", "https", _choice(SCHEMES), "scheme for untranslated image names"),
    Setting("image_source_allow", (), _cidr_list,
            "addresses (CIDRs, comma-separated) image downloads may reach although the deny list covers them "
            "(loopback, link-local, metadata); see docs/security.md"),
    Setting("image_max_size", 64 * 2**30, _size, "largest image download, in bytes or a quantity such as 64Gi"),
    Setting("image_name_fallback", True, _bool,
            "true: an image name no translation matches is fetched as <default scheme>://<name>; false: refused"),
    Setting("image_registries_config", Path("/etc/virtlet/registries.yaml"), _path,
            "YAML file of per-registry settings: node credentials, CA, insecure (plain HTTP); keep it 0600"),
    Setting("max_root_volume_size", 2**40, _size,
            "largest VirtletRootVolumeSize a pod may ask for, in bytes or a quantity such as 1Ti"),
    Setting("share_driver", "virtiofs", _choice(("virtiofs", "9p")),
            "how read-write directory volumes reach VMs: virtiofs (9p when virtiofsd is missing) or 9p; "
            "read-only ones always use 9p (docs/volumes.md)"),
    Setting("virtiofsd", Path("/usr/lib/qemu/virtiofsd"), _path, "the virtiofsd program libvirt starts per share"),
    Setting("cni_bin_dir", (Path("/opt/cni/bin"), Path("/usr/lib/cni")), _path_list,
            "CNI plugin directories (list, or colon-separated)"),
    Setting("cni_conf_dir", Path("/etc/cni/net.d"), _path, "CNI network configuration directory"),
    Setting("cni_extra_conf_dir", Path("/etc/cni/multus/net.d"), _path,
            "CNI network configs the k8s.v1.cni.cncf.io/networks annotation names (by their 'name'), node-wide "
            "in the dir, per namespace in <dir>/<namespace>/; see docs/networking.md"),
    Setting("stream_address", "127.0.0.1:10010", _host_port,
            "HOST:PORT of the streaming server (attach, port-forward)"),
    Setting("metrics_address", "127.0.0.1:9474", _optional_host_port,
            "HOST:PORT of the Prometheus /metrics endpoint (plain HTTP; loopback by default; empty: off); "
            "see docs/metrics.md"),
    Setting("kvm", "auto", _choice(KVM_MODES),
            "auto: use KVM when a test guest really runs, else TCG; on: require KVM; off: always TCG"),
    Setting("log_level", "info", _choice(LOG_LEVELS), "log verbosity"),
    Setting("shutdown_grace", 30, _seconds,
            "seconds SIGTERM waits for CRI calls in flight before virtletd exits anyway (exit code 1)"),
)
_BY_KEY = {s.key: s for s in SETTINGS}


@dataclass(frozen=True)
class Config:
    listen: str = "/run/virtlet.sock"
    state_dir: Path = Path("/var/lib/virtlet")
    run_dir: Path = Path("/run/virtlet")
    libvirt_uri: str = "qemu:///system"
    image_dir: Path = Path("/var/lib/virtlet/images")
    image_translations_dir: Path = Path("/etc/virtlet/images")
    image_default_scheme: str = "https"
    image_source_allow: tuple[str, ...] = ()
    image_max_size: int = 64 * 2**30
    image_name_fallback: bool = True
    image_registries_config: Path = Path("/etc/virtlet/registries.yaml")
    max_root_volume_size: int = 2**40
    share_driver: str = "virtiofs"
    virtiofsd: Path = Path("/usr/lib/qemu/virtiofsd")
    cni_bin_dir: tuple[Path, ...] = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
    cni_conf_dir: Path = Path("/etc/cni/net.d")
    cni_extra_conf_dir: Path = Path("/etc/cni/multus/net.d")
    stream_address: str = "127.0.0.1:10010"
    metrics_address: str = "127.0.0.1:9474"
    kvm: str = "auto"
    log_level: str = "info"
    shutdown_grace: int = 30
    config_file: Path | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(v) for v in value]
            out[f.name] = value
        return out


def _load_file(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config: file {path} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config: {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a YAML map of settings")
    unknown = sorted(k for k in data if str(k).replace("-", "_") not in _BY_KEY)
    if unknown:
        raise ConfigError(
            f"{unknown[0]}: unknown setting in {path} (known: {', '.join(sorted(_BY_KEY))})")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtletd", description="virtlet CRI runtime daemon for VM pods")
    parser.add_argument("--config", help="YAML configuration file (env VIRTLET_CONFIG)")
    for s in SETTINGS:
        parser.add_argument(s.flag, dest=s.key, default=None, help=f"{s.help} (env {s.env})")
    return parser


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the effective configuration; raises ConfigError naming the bad key."""
    environ = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    config_file = args.config or environ.get("VIRTLET_CONFIG")
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if config_file:
        for k, v in _load_file(Path(config_file)).items():
            raw[k], sources[k] = v, f"{config_file}: {k}"
    for s in SETTINGS:
        if s.env in environ:
            raw[s.key], sources[s.key] = environ[s.env], s.env
        flag_value = getattr(args, s.key)
        if flag_value is not None:
            raw[s.key], sources[s.key] = flag_value, s.flag
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if s.key in raw:
            values[s.key] = s.parse(sources[s.key], raw[s.key])
        else:
            values[s.key] = s.default
    return Config(config_file=Path(config_file) if config_file else None, **values)


def markdown_table() -> str:
    rows = ["| key (YAML) | flag | environment | default | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        if s.parse is _size:
            default = quantity.format_bytes(s.default)
        elif isinstance(s.default, tuple):
            default = ("," if s.parse is _cidr_list else ":").join(str(p) for p in s.default)
        else:
            default = str(s.default).lower() if isinstance(s.default, bool) else str(s.default)
        rows.append(f"| `{s.key}` | `{s.flag}` | `{s.env}` | `{default}` | {s.help} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - documentation helper
    if "--markdown" in sys.argv:
        print(markdown_table())
