"""Fixtures that start real daemons and clean up everything they made, also on failure."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import VirtletdProcess
from virtlet.network import netns

_OUR_NETNS = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A temp dir that libvirt's QEMU user can traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="virtlet-test-", dir="/var/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class NetnsGuard:
    """Finds network namespaces of sandboxes that a test's daemons made and did not remove.

    Only namespaces whose sandbox id appears in one of ``logs`` count: other test runs on the same machine
    (parallel sessions) must not be blamed or touched."""

    def __init__(self) -> None:
        self.before = set(netns.list_names())
        self.logs: list[Path] = []

    def leaked(self) -> list[str]:
        text = "".join(p.read_text(errors="replace") for p in self.logs if p.exists())
        return [n for n in set(netns.list_names()) - self.before if _OUR_NETNS.match(n) and n in text]


@pytest.fixture
def netns_guard() -> Iterator[NetnsGuard]:
    """Fails the test when it leaves a virtlet network namespace behind, and removes it anyway."""
    guard = NetnsGuard()
    yield guard
    leaked = guard.leaked()
    for name in leaked:
        netns.delete(name)
    assert not leaked, f"network namespaces leaked: {leaked}"


@pytest.fixture
def loopback_cni(world_dir: Path) -> Path:
    """A CNI conf dir with a loopback-only network: enough for NetworkReady, gives pods no address."""
    conf = world_dir / "cni"
    conf.mkdir()
    (conf / "10-lo.conflist").write_text(
        '{"cniVersion": "1.0.0", "name": "virtlet-test-lo", "plugins": [{"type": "loopback"}]}\n')
    return conf


@contextlib.contextmanager
def running_virtletd(world_dir: Path, netns_guard: NetnsGuard, cni_conf: Path, flags: list[str],
                     guard: DomainGuard | None = None) -> Iterator[VirtletdProcess]:
    """virtletd on a temp socket and state dir with the world's image dirs; on the way out every sandbox it
    still has is removed before it stops (leak checks then see only what the test itself lost)."""
    daemon = VirtletdProcess(world_dir, [
        *flags, "--cni-conf-dir", str(cni_conf), "--image-dir", str(world_dir / "images"),
        "--image-translations-dir", str(world_dir / "translations")])
    netns_guard.logs.append(daemon.log_path)
    if guard is not None:
        guard.logs.append(daemon.log_path)
        guard.state_dirs.append(daemon.state_dir)
    daemon.start()
    try:
        yield daemon
    finally:
        _remove_all_sandboxes(daemon)
        daemon.stop()


@pytest.fixture
def virtletd(world_dir: Path, bridge_cni: Path, netns_guard: NetnsGuard) -> Iterator[VirtletdProcess]:
    """virtletd with libvirt's in-process test driver (no VMs) and a real CNI bridge network."""
    with running_virtletd(world_dir, netns_guard, bridge_cni, ["--libvirt-uri", "test:///default", "--kvm", "off"]) \
            as daemon:
        yield daemon


def _remove_all_sandboxes(daemon: VirtletdProcess) -> None:
    from virtlet.cri.gen import api_pb2 as api

    try:
        # Restart only a daemon that is gone (a test killed it).  A live one that misses the 2 s health check on a
        # loaded machine must not get a second virtletd on its socket and state dir (the first one would be
        # orphaned, still running, while stop() ends only the second).
        if daemon.proc is None or daemon.proc.poll() is not None:
            daemon.start()
        rt = daemon.runtime()
        for sb in rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=10).items:
            rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sb.id), timeout=120)
            rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sb.id), timeout=120)
    except Exception as exc:  # pragma: no cover - cleanup must not hide the test's own failure
        print(f"cleanup of sandboxes failed: {exc}\n{daemon.log()}")


# -- real VMs -----------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
# VIRTLET_GUEST_CACHE: a private image cache (a branch that changes guest-images/ builds there, not in the shared one)
GUEST_IMAGES = Path(os.environ.get("VIRTLET_GUEST_CACHE") or REPO / ".cache" / "guest-images")


def guest_image(kind: str) -> Path:
    """Path of a built guest image (``guest-images/build.sh KIND`` builds it when missing or stale)."""
    import subprocess

    subprocess.run(["bash", str(REPO / "guest-images" / "build.sh"), kind], check=True, stdout=subprocess.DEVNULL)
    path = GUEST_IMAGES / f"{kind}.qcow2"
    assert path.exists(), f"guest-images/build.sh {kind} did not produce {path}"
    return path


@pytest.fixture(scope="session")
def libvirt_daemons() -> Iterator[None]:
    """virtlogd + libvirtd running (started by tools/libvirt-daemons.sh when not yet running)."""
    import subprocess

    subprocess.run(["bash", str(REPO / "tools" / "libvirt-daemons.sh"), "start"], check=True)
    yield


@pytest.fixture(scope="session")
def tiny_image() -> Path:
    override = os.environ.get("VIRTLET_TINY_IMAGE")  # a prebuilt image, for quick local runs
    return Path(override) if override else guest_image("tiny")


@pytest.fixture
def image_server(world_dir: Path) -> Iterator[Any]:
    """A real HTTP server on 127.0.0.1 serving ``world_dir/www``."""
    from tests.helpers.http_server import ImageHttpServer

    root = world_dir / "www"
    root.mkdir()
    with ImageHttpServer(root) as server:
        yield server


def small_translated_image(world_dir: Path, image_server: Any, name: str) -> str:
    """A 16 MiB empty qcow2 served over real HTTP (``image_server``) and named ``name`` by a translation file (the
    admin's, so trusted); returns the image name a pod uses, ``virtlet.cloud/<name>``."""
    import subprocess

    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(world_dir / "www" / "vm.qcow2"), "16M"],
                   check=True)
    tdir = world_dir / "translations"
    tdir.mkdir(exist_ok=True)
    (tdir / f"{name.replace('/', '-')}.yaml").write_text(
        f"translations:\n  - name: {name}\n    url: http://127.0.0.1:{image_server.port}/files/vm.qcow2\n")
    return f"virtlet.cloud/{name}"


@contextlib.contextmanager
def bridge_network(world_dir: Path, tag: str, v4_subnet: str | None, v6_subnet: str | None = None,
                   file: str | None = None) -> Iterator[Path]:
    """A CNI conf dir ``cni-<tag>`` with a bridge + host-local network (IPv4, dual-stack with ``v6_subnet``, or
    IPv6-only without ``v4_subnet``; default routes for each family) named ``<tag>-<world dir>`` on a bridge named
    after the test's world dir; the bridge and the leases go at the end."""
    import json
    import subprocess

    name = f"{tag}-{world_dir.name[-8:]}"
    bridge = f"{tag[:2]}b{world_dir.name[-8:]}"[:15]
    conf = world_dir / f"cni-{tag}"
    conf.mkdir()
    ranges = ([[{"subnet": v4_subnet}]] if v4_subnet else []) + ([[{"subnet": v6_subnet}]] if v6_subnet else [])
    routes = ([{"dst": "0.0.0.0/0"}] if v4_subnet else []) + ([{"dst": "::/0"}] if v6_subnet else [])
    (conf / (file or f"10-{tag}.conflist")).write_text(json.dumps({
        "cniVersion": "1.0.0", "name": name, "plugins": [
            {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
             "ipam": {"type": "host-local", "ranges": ranges, "routes": routes}},
            {"type": "loopback"}]}))
    try:
        yield conf
    finally:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        shutil.rmtree(f"/var/lib/cni/networks/{name}", ignore_errors=True)


@pytest.fixture
def bridge_cni(world_dir: Path) -> Iterator[Path]:
    """A CNI conf dir with a bridge + host-local network on a test-only bridge and subnet."""
    import random

    # (its conf dir, file, network and bridge names are what older tests read: cni-bridge/10-bridge.conflist,
    # vtest-*, vtb*)
    with bridge_network(world_dir, "vtest", f"10.99.{random.randint(1, 250)}.0/24", file="10-bridge.conflist") as conf:
        yield conf


class DomainGuard:
    """Fails a test that leaves a libvirt domain of its daemon behind (and removes it).

    A domain is a daemon's when its virtlet metadata puts its overlay under that daemon's state dir (the rule
    virtletd's own start-up cleanup uses, ``VmRecovery._is_ours``).  Why not "its id appears in the daemon's
    log", as before: on a machine where other test runs boot VMs at the same time, a daemon names other
    daemons' domains in its log (start-up recovery reads every domain; "cannot read domain X" when one vanishes
    under it), and such a domain, still running at this test's teardown, was blamed on this test: the
    ``libvirt domains leaked`` at the teardown of test_full_image_real_cloud_init under load.  The log is still
    the fallback for a domain whose metadata cannot be read (a half-made one)."""

    def __init__(self) -> None:
        self.logs: list[Path] = []
        self.state_dirs: list[Path] = []

    def owns(self, name: str, xml: str, log_text: str) -> bool:
        from virtlet.vm import designer

        try:
            meta = designer.virtlet_metadata(xml) if xml else None
        except Exception:  # unreadable XML: fall back to the log
            meta = None
        overlay = (meta or {}).get("overlay", "")
        if overlay:
            return any(Path(overlay).is_relative_to(d / "containers") for d in self.state_dirs)
        text = "\n".join(line for line in log_text.splitlines() if "leaving domain" not in line)
        return name.removeprefix("virtlet-") in text

    def leaked(self) -> list[str]:
        import subprocess

        out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                             text=True).stdout.split()
        text = "".join(p.read_text(errors="replace") for p in self.logs if p.exists())
        mine = []
        for name in (d for d in out if d.startswith("virtlet-")):
            xml = subprocess.run(["virsh", "-c", "qemu:///system", "dumpxml", name], capture_output=True,
                                 text=True).stdout
            if xml and self.owns(name, xml, text):  # no XML: the domain went away meanwhile
                mine.append(name)
        return mine


VM_FLAGS = ["--kvm", "off", "--image-default-scheme", "http", "--log-level", "debug",
            "--image-source-allow", "127.0.0.0/8"]  # loopback: untranslated names of image_server


@contextlib.contextmanager
def qemu_virtletd(world_dir: Path, netns_guard: NetnsGuard, cni_conf: Path,
                  extra_flags: list[str] | None = None) -> Iterator[VirtletdProcess]:
    """``running_virtletd`` on the real libvirtd (TCG) with ``VM_FLAGS`` (+ ``extra_flags``); fails the test when
    it leaves a libvirt domain behind, and removes it anyway."""
    import subprocess

    guard = DomainGuard()
    try:
        with running_virtletd(world_dir, netns_guard, cni_conf, [*VM_FLAGS, *(extra_flags or [])], guard) as daemon:
            yield daemon
    finally:
        leaked = guard.leaked()
        for name in leaked:
            subprocess.run(["virsh", "destroy", name], capture_output=True)
            subprocess.run(["virsh", "undefine", name], capture_output=True)
        assert not leaked, f"libvirt domains leaked: {leaked}"


@pytest.fixture
def vm_virtletd(world_dir: Path, bridge_cni: Path, netns_guard: NetnsGuard, libvirt_daemons: None,
                ) -> Iterator[VirtletdProcess]:
    """virtletd on the real libvirtd (TCG), a real CNI bridge network and an HTTP image source; loopback is
    allowed as an image source, so tests pull ``image_server.name(...)`` without a translation."""
    with qemu_virtletd(world_dir, netns_guard, bridge_cni) as daemon:
        yield daemon
