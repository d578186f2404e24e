"""``virtletctl validate``: can this node run VM pods?  One line per check, a fix for each failure.

Run on the node (or by the roles at the end of site.yml).  Each check reads the same settings the daemons
use -- virtletd's ``--config`` file (``virtlet.config``) and the CRI proxy's (``virtlet.proxy.config``) -- so
a test can point it at a test virtletd and proxy.  Statuses: ``ok``; ``warn`` (VM pods run, but not as well
as they could: TCG instead of KVM, no proxy config on a node that uses none); ``FAIL`` (a VM pod would not
start).  The exit code is 1 when a check FAILs, else 0.

Decisions: the KVM check runs the same probe guest virtletd runs at start (``virtlet.vm.kvm``), so its
answer is the daemon's answer; TCG is a warning, not a failure (VM pods work, only slower), unless the
configuration says ``kvm: on``.  virtiofsd is required because directory volumes need it; a node without it
fails here rather than at the first pod that mounts one.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from virtlet import config as vconfig
from virtlet import errors, quantity
from virtlet.cri import versions
from virtlet.cri.gen import api_pb2 as api
from virtlet.network.cni import CniConfigStore
from virtlet.proxy import config as pconfig
from virtlet.vm import kvm

DEFAULT_CONFIG = Path("/etc/virtlet/virtlet.yaml")
DEFAULT_PROXY_CONFIG = Path("/etc/virtlet/criproxy.yaml")
DEFAULT_DROPIN = Path("/etc/systemd/system/kubelet.service.d/90-virtlet-criproxy.conf")
DEFAULT_VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")
VIRTIOFSD_PATHS = (Path("/usr/lib/qemu/virtiofsd"), Path("/usr/libexec/virtiofsd"))
DEFAULT_MIN_FREE = "10Gi"
RPC_TIMEOUT = 5.0

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Result:
    name: str
    status: str
    detail: str
    fix: str = ""

    def lines(self) -> list[str]:
        out = [f"{self.status:<4}  {self.name:<12} {self.detail}"]
        if self.fix and self.status != OK:
            out.append(f"{'':<4}  {'':<12} fix: {self.fix}")
        return out


@dataclass
class Options:
    config: Path | None = None
    proxy_config: Path | None = None
    kubelet_dropin: Path = DEFAULT_DROPIN
    virtlogd_socket: Path = DEFAULT_VIRTLOGD_SOCKET
    min_free: int = quantity.parse_bytes(DEFAULT_MIN_FREE, 2**63 - 1)
    kvm_timeout: float = kvm.DEFAULT_TIMEOUT_S
    skip: set[str] = field(default_factory=set)


def _load_config(opts: Options) -> tuple[vconfig.Config, Result]:
    path = opts.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    if path is None:
        return vconfig.Config(), Result("config", WARN, f"no {DEFAULT_CONFIG}: checking virtletd's defaults",
                                        "pass --config FILE if virtletd runs with another configuration")
    try:
        cfg = vconfig.load(["--config", str(path)], environ={})
    except errors.VirtletError as exc:
        return vconfig.Config(), Result("config", FAIL, str(exc), f"correct {path} (docs/configuration.md)")
    return cfg, Result("config", OK, f"virtletd settings from {path}")


def check_kvm(cfg: vconfig.Config, opts: Options) -> Result:
    try:
        decision = kvm.detect(cfg.kvm, opts.kvm_timeout)
    except errors.VirtletError as exc:
        return Result("kvm", FAIL, str(exc), "load the kvm module and pass /dev/kvm to virtletd, or set kvm: auto")
    if decision.domain_type == "kvm":
        return Result("kvm", OK, decision.reason)
    return Result("kvm", WARN, decision.reason,
                  "for KVM: enable virtualisation (VT-x/AMD-V, nested virtualisation on a cloud VM) and load "
                  "kvm_intel or kvm_amd; TCG works meanwhile")


def check_qemu(_cfg: vconfig.Config, _opts: Options) -> Result:
    try:
        qemu = kvm.find_emulator()
    except errors.FailedPrecondition as exc:
        return Result("qemu", FAIL, str(exc), "apt-get install qemu-system-x86")
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10, check=False)
        version = (out.stdout.splitlines() or ["version unknown"])[0]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Result("qemu", FAIL, f"{qemu} does not run: {exc}", "reinstall qemu-system-x86")
    return Result("qemu", OK, f"{qemu}: {version}")


def check_virtiofsd(_cfg: vconfig.Config, _opts: Options) -> Result:
    candidates = [*VIRTIOFSD_PATHS, *(Path(p) for p in [shutil.which("virtiofsd")] if p)]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return Result("virtiofsd", OK, str(path))
    return Result("virtiofsd", FAIL, f"no virtiofsd (looked at {', '.join(map(str, VIRTIOFSD_PATHS))} and PATH)",
                  "apt-get install qemu-system-common (Debian 12) or virtiofsd (Debian 13): directory volumes "
                  "need it")


def check_libvirt(cfg: vconfig.Config, _opts: Options) -> Result:
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    try:
        conn = libvirt.open(cfg.libvirt_uri)
    except libvirt.libvirtError as exc:
        return Result("libvirt", FAIL, f"cannot connect to {cfg.libvirt_uri}: {exc}",
                      "start libvirtd (systemctl start libvirtd; without systemd: tools/libvirt-daemons.sh start)")
    try:
        v = int(conn.getLibVersion())
    finally:
        conn.close()
    return Result("libvirt", OK, f"libvirt {v // 1000000}.{v // 1000 % 1000}.{v % 1000} answers at "
                                 f"{cfg.libvirt_uri}")


def check_virtlogd(cfg: vconfig.Config, opts: Options) -> Result:
    if not cfg.libvirt_uri.startswith("qemu"):
        return Result("virtlogd", OK, f"not used by {cfg.libvirt_uri}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(RPC_TIMEOUT)
    try:
        s.connect(str(opts.virtlogd_socket))
    except OSError as exc:
        return Result("virtlogd", FAIL, f"nothing answers at {opts.virtlogd_socket}: {exc.strerror or exc}",
                      "start virtlogd (systemctl start virtlogd.socket); QEMU's serial console log needs it")
    finally:
        s.close()
    return Result("virtlogd", OK, f"answers at {opts.virtlogd_socket}")


def check_cni(cfg: vconfig.Config, _opts: Options) -> Result:
    store = CniConfigStore(cfg.cni_conf_dir, cfg.cni_bin_dir)
    try:
        net = store.load()
    except errors.VirtletError as exc:
        return Result("cni", FAIL, str(exc), "run site.yml (cni role), or write a .conflist there")
    missing = store.missing_plugins(net)
    types = ", ".join(p["type"] for p in net.plugins)
    if missing:
        return Result("cni", FAIL, f"network {net.name!r} ({net.source}) needs plugin(s) {', '.join(missing)}, "
                                   f"not in {', '.join(map(str, cfg.cni_bin_dir))}",
                      "apt-get install containernetworking-plugins, or set cni_bin_dir")
    return Result("cni", OK, f"network {net.name!r} from {net.source}: plugins {types} found")


def _cri_status(address: str, what: str) -> tuple[api.VersionResponse, api.StatusResponse]:
    channel = grpc.insecure_channel(address if address.startswith("unix:") else f"unix://{address}")
    try:
        stub = versions.runtime_stub(channel, "v1")
        version = stub.Version(api.VersionRequest(), timeout=RPC_TIMEOUT)
        status = stub.Status(api.StatusRequest(), timeout=RPC_TIMEOUT)
        return version, status
    except grpc.RpcError as exc:
        details = (exc.details() or "").rsplit("error: ", 1)[-1]  # gRPC's last words: "No such file or directory"
        raise errors.Unavailable(f"{what} at {address} does not answer: {exc.code().name} ({details})") from exc
    finally:
        channel.close()


def _answers(address: str) -> bool:
    """True when a gRPC server accepts a connection at the unix socket (whatever it then answers)."""
    channel = grpc.insecure_channel(f"unix://{address}")
    try:
        grpc.channel_ready_future(channel).result(timeout=RPC_TIMEOUT)
        return True
    except grpc.FutureTimeoutError:
        return False
    finally:
        channel.close()


def check_virtletd(cfg: vconfig.Config, _opts: Options) -> Result:
    try:
        version, status = _cri_status(cfg.listen, "virtletd")
    except errors.VirtletError as exc:
        return Result("virtletd", FAIL, str(exc), "start virtletd (systemctl start virtletd; its log: "
                                                  "journalctl -u virtletd)")
    bad = [f"{c.type}: {c.reason} {c.message}".strip() for c in status.status.conditions if not c.status]
    if bad:
        return Result("virtletd", FAIL, f"{version.runtime_name} {version.runtime_version} is not ready: "
                                        + "; ".join(bad), "see the condition's message; journalctl -u virtletd")
    return Result("virtletd", OK, f"{version.runtime_name} {version.runtime_version} ready at {cfg.listen}")


def _proxy_config(opts: Options) -> pconfig.ProxyConfig | None:
    path = opts.proxy_config or (DEFAULT_PROXY_CONFIG if DEFAULT_PROXY_CONFIG.exists() else None)
    return pconfig.load(["--config", str(path)]) if path else None


def check_criproxy(_cfg: vconfig.Config, opts: Options) -> Result:
    try:
        pcfg = _proxy_config(opts)
    except errors.VirtletError as exc:
        return Result("criproxy", FAIL, str(exc), "correct the proxy's config (docs/criproxy.md)")
    if pcfg is None:
        return Result("criproxy", FAIL, f"no {DEFAULT_PROXY_CONFIG}",
                      "run site.yml (criproxy role), or pass --proxy-config FILE")
    try:
        version, status = _cri_status(str(pcfg.listen), "virtlet-criproxy")
    except errors.VirtletError as exc:
        if Path(pcfg.listen).is_socket() and _answers(str(pcfg.listen)):
            # the proxy is up; its Version goes to the primary runtime, which is not
            return Result("criproxy", FAIL, f"{pcfg.listen} answers, but its primary runtime {pcfg.primary} does "
                                            f"not ({exc})", "start the primary runtime (systemctl start containerd), "
                                                            "or correct `primary` in the proxy's config")
        return Result("criproxy", FAIL, str(exc), "start it (systemctl start virtlet-criproxy)")
    conds = {c.type: c for c in status.status.conditions}
    problems = []
    for name in pcfg.secondaries:
        c = conds.get(f"{name}/RuntimeReady")
        if c is None:
            problems.append(f"{name}: the proxy reports no {name}/RuntimeReady condition")
        elif not c.status:
            problems.append(f"{name}: {c.message or c.reason}")
    primary = f"{version.runtime_name} {version.runtime_version}"
    if problems:
        return Result("criproxy", FAIL, f"{pcfg.listen} reaches {primary} but not " + "; ".join(problems),
                      "start virtletd, and check secondaries in the proxy's config")
    return Result("criproxy", OK, f"{pcfg.listen} routes to {primary} (primary) and "
                                  f"{', '.join(pcfg.secondaries) or 'no secondary'}")


def check_kubelet(_cfg: vconfig.Config, opts: Options) -> Result:
    path = opts.kubelet_dropin
    try:
        text = path.read_text()
    except OSError as exc:
        return Result("kubelet", FAIL, f"no kubelet drop-in {path}: {exc.strerror}",
                      "run site.yml (criproxy role), then systemctl daemon-reload && systemctl restart kubelet")
    try:
        pcfg = _proxy_config(opts)
    except errors.VirtletError:
        pcfg = None
    listen = str(pcfg.listen if pcfg is not None else pconfig.ProxyConfig().listen)
    if f"--container-runtime-endpoint=unix://{listen}" not in text:
        return Result("kubelet", FAIL, f"{path} does not point the kubelet at unix://{listen}",
                      "run site.yml (criproxy role) to rewrite it, then restart the kubelet")
    return Result("kubelet", OK, f"{path} points the kubelet at unix://{listen}")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(cfg: vconfig.Config, opts: Options) -> Result:
    seen: dict[int, Path] = {}
    lows = []
    free_texts = []
    for path in (cfg.image_dir, cfg.state_dir):
        where = _existing(path)
        st = os.statvfs(where)
        if st.f_fsid in seen:
            continue
        seen[st.f_fsid] = path
        free = st.f_bavail * st.f_frsize
        free_texts.append(f"{free / 2**30:.1f} GiB free for {path}")
        if free < opts.min_free:
            lows.append(f"{path} has {free / 2**30:.1f} GiB free, below {opts.min_free / 2**30:.1f} GiB")
    if lows:
        return Result("disk", FAIL, "; ".join(lows),
                      "free space there (virtletctl dump-metadata lists images; crictl rmi removes unused ones) "
                      "or lower --min-free")
    return Result("disk", OK, "; ".join(free_texts))


CHECKS: dict[str, Callable[[vconfig.Config, Options], Result]] = {
    "kvm": check_kvm, "qemu": check_qemu, "virtiofsd": check_virtiofsd, "libvirt": check_libvirt,
    "virtlogd": check_virtlogd, "cni": check_cni, "virtletd": check_virtletd, "criproxy": check_criproxy,
    "kubelet": check_kubelet, "disk": check_disk,
}


def run(opts: Options) -> list[Result]:
    cfg, first = _load_config(opts)
    results = [first]
    for name, check in CHECKS.items():
        if name in opts.skip:
            results.append(Result(name, OK, "skipped (--skip)"))
            continue
        try:
            results.append(check(cfg, opts))
        except Exception as exc:  # a check that breaks is a failed check, not a traceback
            results.append(Result(name, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}",
                                  "report this with virtletctl diag dump"))
    return results


def render(results: Iterable[Result]) -> str:
    results = list(results)
    lines = [line for r in results for line in r.lines()]
    failed = [r.name for r in results if r.status == FAIL]
    lines.append(f"{len(failed)} check(s) failed: {', '.join(failed)}" if failed
                 else "this node can run VM pods")
    return "\n".join(lines) + "\n"
