"""A CNI runner: finds the network config, execs the plugins (ADD/DEL), parses their results.

It follows the CNI spec as the kubelet and containerd use it: the first valid config in the conf dir by sorted
file name (``.conflist``, ``.conf``, ``.json``), plugins executed in list order for ADD and in reverse for
DEL, ``prevResult`` chained, ``CNI_ARGS`` carrying the K8S_* pod identity and ``runtimeConfig`` carrying the
``portMappings``, ``dns``, ``bandwidth``, ``ips`` and ``mac`` capability args.  The config, the capability args
and the result of every ADD are cached on disk *before* and *after* the ADD, so DEL after a crash or a config
change still runs the network the pod got, with the arguments it got (portmap removes its rules only when DEL
names the port mappings again).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtlet import errors
from virtlet.network.model import SandboxNetSpec

log = logging.getLogger(__name__)

DEFAULT_BIN_DIRS = (Path("/opt/cni/bin"), Path("/usr/lib/cni"))
CONF_EXTENSIONS = (".conflist", ".conf", ".json")
# result layouts we understand: 0.3.x, 0.4.0 and 1.x share the interfaces/ips/routes/dns shape
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LOOPBACK_NETWORK = "cni-loopback"


@dataclass(frozen=True)
class NetworkConfig:
    """One network configuration list (a single-plugin ``.conf`` is turned into a list of one)."""

    name: str
    cni_version: str
    plugins: list[dict[str, Any]]
    source: str  # file it came from, for messages

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cniVersion": self.cni_version, "plugins": self.plugins,
                "source": self.source}

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> NetworkConfig:
        """Validate a parsed config file; raise ``ValueError`` saying what is wrong."""
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if "plugins" in raw:
            plugins = raw["plugins"]
            if not isinstance(plugins, list) or not plugins:
                raise ValueError("'plugins' must be a non-empty list")
        elif "type" in raw:
            plugins = [{k: v for k, v in raw.items() if k not in ("name", "cniVersion")}]
        else:
            raise ValueError("neither 'plugins' (a .conflist) nor 'type' (a .conf)")
        name = raw.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("'name' is missing")
        version = raw.get("cniVersion", "0.4.0" if "plugins" in raw else "")
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"cniVersion {version!r} is not supported "
                             f"(use one of {', '.join(SUPPORTED_VERSIONS)})")
        for i, plugin in enumerate(plugins):
            if not isinstance(plugin, dict) or not isinstance(plugin.get("type"), str) or not plugin["type"]:
                raise ValueError(f"plugin {i} has no 'type'")
            if "/" in plugin["type"]:
                raise ValueError(f"plugin type {plugin['type']!r} must be a bare name, not a path")
        return cls(name=name, cni_version=version, plugins=[dict(p) for p in plugins], source=source)


def find_plugin(plugin_type: str, bin_dirs: Sequence[Path]) -> Path | None:
    for d in bin_dirs:
        candidate = Path(d) / plugin_type
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


class CniConfigStore:
    """The CNI conf dir: picks the network every new pod joins, and reports readiness for CRI Status."""

    def __init__(self, conf_dir: Path, bin_dirs: Sequence[Path] = DEFAULT_BIN_DIRS) -> None:
        self.conf_dir = Path(conf_dir)
        self.bin_dirs = tuple(Path(d) for d in bin_dirs)

    def load(self) -> NetworkConfig:
        """The first valid network config by sorted file name; ``FailedPrecondition`` when there is none."""
        problems: list[str] = []
        files = sorted(p for p in self.conf_dir.iterdir() if p.suffix in CONF_EXTENSIONS and p.is_file()) \
            if self.conf_dir.is_dir() else []
        for path in files:
            try:
                return NetworkConfig.from_dict(json.loads(path.read_text()), str(path))
            except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
                log.warning("skipping CNI config %s: %s", path, exc)
                problems.append(f"{path.name}: {exc}")
        detail = f" (invalid: {'; '.join(problems)})" if problems else ""
        raise errors.FailedPrecondition(
            f"no valid CNI network config in {self.conf_dir} (looked for {', '.join(CONF_EXTENSIONS)} files)"
            f"{detail}; install a CNI network config there")

    def missing_plugins(self, net: NetworkConfig) -> list[str]:
        return [p["type"] for p in net.plugins if find_plugin(p["type"], self.bin_dirs) is None]

    def status(self) -> tuple[bool, str]:
        """(usable config present?, reason) for the NetworkReady condition of CRI Status."""
        try:
            net = self.load()
        except errors.VirtletError as exc:
            return False, str(exc)
        missing = self.missing_plugins(net)
        if missing:
            return False, (f"CNI network {net.name!r} ({net.source}) needs plugin(s) {', '.join(missing)} "
                           f"not found in {', '.join(map(str, self.bin_dirs))}")
        return True, f"CNI network {net.name!r} from {net.source}"


@dataclass
class CniResult:
    """A parsed ADD result (spec 0.3.x/0.4.0/1.x layout)."""

    cni_version: str
    interfaces: list[dict[str, Any]] = field(default_factory=list)
    ips: list[dict[str, Any]] = field(default_factory=list)
    routes: list[dict[str, Any]] = field(default_factory=list)
    dns: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, raw: Any) -> CniResult:
        if not isinstance(raw, dict):
            raise ValueError("result is not a JSON object")
        version = str(raw.get("cniVersion", ""))
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"result cniVersion {version!r} is not supported")
        interfaces = raw.get("interfaces") or []
        ips = raw.get("ips") or []
        routes = raw.get("routes") or []
        dns = raw.get("dns") or {}
        if not (isinstance(interfaces, list) and isinstance(ips, list) and isinstance(routes, list)
                and isinstance(dns, dict)):
            raise ValueError("result has malformed interfaces/ips/routes/dns")
        for ip in ips:
            if not isinstance(ip, dict) or "address" not in ip:
                raise ValueError("result has an IP entry without 'address'")
        return cls(cni_version=version, interfaces=list(interfaces), ips=list(ips), routes=list(routes),
                   dns=dict(dns), raw=raw)

    def sandbox_interfaces(self) -> list[tuple[int, dict[str, Any]]]:
        """(index in ``interfaces``, interface) for interfaces inside the pod netns, in result order.  The
        loopback plugin reports ``lo`` as a sandbox interface; it can never become a VM NIC."""
        return [(i, itf) for i, itf in enumerate(self.interfaces)
                if isinstance(itf, dict) and itf.get("sandbox") and itf.get("name") != "lo"]

    def ips_of(self, index: int) -> list[dict[str, Any]]:
        return [ip for ip in self.ips if ip.get("interface") == index]


class CniPluginError(errors.Internal):
    """A CNI plugin reported failure; the message carries the plugin's own error text."""


def _port_mappings(spec: SandboxNetSpec) -> list[dict[str, Any]]:
    out = []
    for pm in spec.port_mappings:
        host_port = int(pm.get("host_port", pm.get("hostPort", 0)) or 0)
        if host_port <= 0:
            continue  # CNI portmap only handles mappings with a host port
        container_port = int(pm.get("container_port", pm.get("containerPort", 0)) or 0)
        entry: dict[str, Any] = {"hostPort": host_port, "containerPort": container_port,
                                 "protocol": str(pm.get("protocol", "TCP") or "TCP").lower()}
        host_ip = pm.get("host_ip", pm.get("hostIp", ""))
        if host_ip:
            entry["hostIP"] = host_ip
        out.append(entry)
    return out


def capability_args(sandbox: SandboxNetSpec) -> dict[str, Any]:
    """Every capability argument of the sandbox: ``portMappings`` and ``dns`` always (like containerd, so a
    plugin declaring them always sees the key), ``bandwidth``/``ips``/``mac`` when the pod's annotations ask."""
    caps: dict[str, Any] = {
        "portMappings": _port_mappings(sandbox),
        "dns": {"servers": list(sandbox.dns.get("servers", [])), "searches": list(sandbox.dns.get("searches", [])),
                "options": list(sandbox.dns.get("options", []))},
    }
    caps.update(sandbox.annotation_caps)
    return caps


class CniRunner:
    """Runs ADD/DEL of the configured network for one sandbox."""

    def __init__(self, store: CniConfigStore, cache_dir: Path, ifname: str = "eth0", timeout: float = 120.0,
                 loopback: bool = True) -> None:
        self.store = store
        self.cache_dir = Path(cache_dir)
        self.ifname = ifname
        self.timeout = timeout
        # like containerd, also run the "loopback" plugin when installed (netns.create raised lo already)
        self.loopback = loopback

    # -- public API -----------------------------------------------------------------------------------
    def add(self, sandbox: SandboxNetSpec) -> CniResult:
        """CNI ADD; on any failure runs CNI DEL and raises with the plugin's error text."""
        net = self.store.load()
        missing = self.store.missing_plugins(net)
        if missing:
            raise errors.FailedPrecondition(
                f"CNI network {net.name!r} ({net.source}) needs plugin(s) {', '.join(missing)}, not found in "
                f"{', '.join(map(str, self.store.bin_dirs))}")
        caps = capability_args(sandbox)
        self._write_cache(sandbox.sandbox_id, {"config": net.to_dict(), "capabilityArgs": caps, "result": None})
        try:
            if self._loopback_plugin():
                self._exec_list(self._loopback_net(net), "ADD", sandbox, None, {})
            raw = self._exec_list(net, "ADD", sandbox, None, caps)
            if raw is None:
                raise CniPluginError(f"CNI network {net.name!r}: the last plugin returned no result")
            try:
                result = CniResult.parse(raw)
            except ValueError as exc:
                raise CniPluginError(f"CNI network {net.name!r} returned an unusable result: {exc}") from exc
            self._write_cache(sandbox.sandbox_id, {"config": net.to_dict(), "capabilityArgs": caps,
                                                   "result": raw})
            return result
        except BaseException:
            try:
                self.delete(sandbox)
            except Exception:
                log.exception("CNI DEL after a failed ADD of sandbox %s failed", sandbox.sandbox_id)
            raise

    def delete(self, sandbox: SandboxNetSpec) -> None:
        """CNI DEL with the config cached at ADD time; a sandbox without a cache entry is already clean."""
        cached = self._read_cache(sandbox.sandbox_id)
        if cached is None:
            return
        net = NetworkConfig.from_dict(cached["config"], cached["config"].get("source", "cache"))
        # the arguments of the ADD (a cache of an older virtletd has none: then the caller's, as before)
        caps = cached.get("capabilityArgs")
        if not isinstance(caps, dict):
            caps = capability_args(sandbox)
        self._exec_list(net, "DEL", sandbox, cached.get("result"), caps)
        if self._loopback_plugin():
            self._exec_list(self._loopback_net(net), "DEL", sandbox, None, {})
        self._cache_path(sandbox.sandbox_id).unlink(missing_ok=True)

    def cached_result(self, sandbox_id: str) -> CniResult | None:
        cached = self._read_cache(sandbox_id)
        if cached is None or cached.get("result") is None:
            return None
        return CniResult.parse(cached["result"])

    # -- internals ------------------------------------------------------------------------------------
    def _loopback_plugin(self) -> Path | None:
        return find_plugin("loopback", self.store.bin_dirs) if self.loopback else None

    @staticmethod
    def _loopback_net(net: NetworkConfig) -> NetworkConfig:
        return NetworkConfig(name=LOOPBACK_NETWORK, cni_version=net.cni_version,
                             plugins=[{"type": "loopback"}], source="built-in")

    def _cache_path(self, sandbox_id: str) -> Path:
        return self.cache_dir / f"{sandbox_id}.json"

    def _write_cache(self, sandbox_id: str, data: dict[str, Any]) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self._cache_path(sandbox_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def _read_cache(self, sandbox_id: str) -> dict[str, Any] | None:
        try:
            cached: dict[str, Any] = json.loads(self._cache_path(sandbox_id).read_text())
            return cached
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise errors.Internal(f"CNI cache {self._cache_path(sandbox_id)} is corrupt: {exc}") from exc

    def _exec_list(self, net: NetworkConfig, command: str, sandbox: SandboxNetSpec,
                   prev_result: dict[str, Any] | None, caps: dict[str, Any]) -> dict[str, Any] | None:
        plugins = net.plugins if command == "ADD" else list(reversed(net.plugins))
        for plugin in plugins:
            conf = self._plugin_conf(net, plugin, prev_result, caps)
            out = self._exec(plugin["type"], command, conf, sandbox, net.name)
            if command == "ADD":
                prev_result = out if out is not None else prev_result
        return prev_result

    @staticmethod
    def _plugin_conf(net: NetworkConfig, plugin: dict[str, Any], prev_result: dict[str, Any] | None,
                     caps: dict[str, Any]) -> dict[str, Any]:
        conf = dict(plugin)
        conf["name"] = net.name
        conf["cniVersion"] = net.cni_version
        if prev_result is not None:
            conf["prevResult"] = prev_result
        declared = plugin.get("capabilities") or {}
        # only the capabilities the plugin declares, as libcni does
        runtime_config = {k: v for k, v in caps.items() if isinstance(declared, dict) and declared.get(k)}
        if runtime_config:
            conf["runtimeConfig"] = runtime_config
        return conf

    def _env(self, command: str, sandbox: SandboxNetSpec) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update({
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": sandbox.sandbox_id,
            "CNI_NETNS": sandbox.netns_path,
            "CNI_IFNAME": self.ifname,
            "CNI_PATH": os.pathsep.join(map(str, self.store.bin_dirs)),
            "CNI_ARGS": ";".join([
                "IgnoreUnknown=1",
                f"K8S_POD_NAMESPACE={sandbox.pod_namespace}",
                f"K8S_POD_NAME={sandbox.pod_name}",
                f"K8S_POD_INFRA_CONTAINER_ID={sandbox.sandbox_id}",
                f"K8S_POD_UID={sandbox.pod_uid}",
            ]),
        })
        return env

    def _exec(self, plugin_type: str, command: str, conf: dict[str, Any], sandbox: SandboxNetSpec,
              net_name: str) -> dict[str, Any] | None:
        binary = find_plugin(plugin_type, self.store.bin_dirs)
        where = (f"CNI plugin {plugin_type!r} ({command} of network {net_name!r}, "
                 f"sandbox {sandbox.sandbox_id})")
        if binary is None:
            raise errors.FailedPrecondition(
                f"{where}: not found in {', '.join(map(str, self.store.bin_dirs))}")
        try:
            proc = subprocess.run([str(binary)], input=json.dumps(conf), capture_output=True, text=True,
                                  env=self._env(command, sandbox), timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise errors.DeadlineExceeded(f"{where}: no answer within {self.timeout:.0f}s") from exc
        except OSError as exc:
            raise CniPluginError(f"{where}: cannot execute {binary}: {exc}") from exc
        parsed: Any = None
        if proc.stdout.strip():
            try:
                parsed = json.loads(proc.stdout)
            except ValueError:
                parsed = None
        if proc.returncode != 0:
            raise CniPluginError(f"{where} failed: {_plugin_error_text(parsed, proc)}")
        if command != "ADD":
            return None
        if not isinstance(parsed, dict):
            raise CniPluginError(f"{where} printed no JSON result: {proc.stdout.strip()[:300]!r}")
        return parsed


def _plugin_error_text(parsed: Any, proc: subprocess.CompletedProcess[str]) -> str:
    if isinstance(parsed, dict) and parsed.get("msg"):
        text = str(parsed["msg"])
        if parsed.get("details"):
            text += f": {parsed['details']}"
        if parsed.get("code") is not None:
            text += f" (code {parsed['code']})"
        return text
    text = (proc.stderr.strip() or proc.stdout.strip())[-500:]
    return text or f"exit status {proc.returncode} and no message"
