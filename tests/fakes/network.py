"""The one fake of the host's pod networking for unit tests: network namespaces, CNI ADD/DEL with the DHCP server
they start, and the VM's taps.  It records every step in ``log`` (shared with the fake VM parts), so a test can
assert the order of steps across the sandbox and VM managers.

- ``FakeNetns`` stands in for ``virtlet.network.netns`` (``create``/``delete``/``exists``/``path``; idempotent as
  the real module): install it with ``monkeypatch.setattr(virtlet.sandbox.manager, "netns", fake_netns)``.
- ``FakePodNetwork`` is the sandbox manager's ``NetworkHook`` (setup = CNI ADD in the netns + DHCP server,
  teardown = CNI DEL, reattach = DHCP server again) and holds the taps of each sandbox: ``taps[sid]`` is "host"
  (made in the host netns before QEMU starts), "pod" (moved into the pod netns on the bridge) or absent.
- ``FakeVmParts`` is the VM manager's ``VmParts``: ``prepare`` writes an overlay and an ISO in the container
  directory and designs a domain XML whose metadata names the overlay (so recovery can tell the domain is ours);
  the tap hooks go to the ``FakePodNetwork``; log writers are ``FakeLogWriter``.

Failures: ``fail["setup"|"teardown"|"reattach"|"prepare"|"taps_before_start"|"after_start"|"netns.create"|...]``
holds an exception to raise at that step (until deleted).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtlet import errors
from virtlet.network.model import NicInfo, PodNetworkInfo
from virtlet.state import store as st
from virtlet.vm import designer

NETNS_DIR = Path("/var/run/netns")


class Log(list[str]):
    """Steps in the order they happened, e.g. ``["netns.create s1", "cni.add s1", ...]``."""

    def of(self, key: str) -> list[str]:
        return [step.split(" ")[0] for step in self if step.endswith(" " + key)]


class FakeNetns:
    def __init__(self, log: Log, fail: dict[str, BaseException]) -> None:
        self.log = log
        self.fail = fail
        self.names: set[str] = set()

    def path(self, name: str) -> Path:
        return NETNS_DIR / name

    def create(self, name: str) -> Path:
        if "netns.create" in self.fail:
            raise self.fail["netns.create"]
        self.names.add(name)
        self.log.append(f"netns.create {name}")
        return self.path(name)

    def delete(self, name: str) -> None:
        if "netns.delete" in self.fail:
            raise self.fail["netns.delete"]
        if name in self.names:
            self.names.discard(name)
            self.log.append(f"netns.delete {name}")

    def exists(self, name: str) -> bool:
        return name in self.names


class FakePodNetwork:
    def __init__(self) -> None:
        self.log = Log()
        self.fail: dict[str, BaseException] = {}
        self.netns = FakeNetns(self.log, self.fail)
        self.cni: set[str] = set()  # sandboxes with CNI ADD done (veth in the netns, IP reserved)
        self.dhcp: set[str] = set()  # sandboxes whose DHCP server runs in this virtletd
        self.taps: dict[str, str] = {}  # sandbox id -> "host" | "pod"
        self._lock = threading.Lock()

    def _step(self, what: str, sid: str) -> None:
        if what in self.fail:
            raise self.fail[what]
        self.log.append(f"{what} {sid}")

    # -- NetworkHook (sandbox manager) ------------------------------------------------------------------
    def setup(self, rec: st.SandboxRecord, spec: Any) -> PodNetworkInfo:
        assert self.netns.exists(rec.id), "CNI ADD needs the pod's netns"
        self._step("setup", rec.id)
        self.cni.add(rec.id)
        self.dhcp.add(rec.id)
        nic = NicInfo(index=0, mac="52:54:00:00:00:01", mtu=1500, ip="10.250.0.2", prefix=24, gateway="10.250.0.1",
                      routes=[], veth="eth0", bridge="br-fake", tap=f"tap{rec.id[:8]}")
        return PodNetworkInfo(sandbox_id=rec.id, netns_path=rec.netns, nics=[nic], dns_servers=[], dns_searches=[],
                              dns_options=[])

    def teardown(self, rec: st.SandboxRecord) -> None:
        self._step("teardown", rec.id)
        self.dhcp.discard(rec.id)
        self.taps.pop(rec.id, None)
        self.cni.discard(rec.id)

    def reattach(self, rec: st.SandboxRecord) -> None:
        self._step("reattach", rec.id)
        self.dhcp.add(rec.id)

    # -- taps (VM parts) --------------------------------------------------------------------------------
    def taps_before_start(self, sid: str) -> None:
        self._step("taps_before_start", sid)
        self.taps[sid] = "host"

    def after_start(self, sid: str) -> None:
        self._step("after_start", sid)
        self.taps[sid] = "pod"

    def after_exit(self, sid: str) -> None:
        self._step("after_exit", sid)
        self.taps.pop(sid, None)

    def leftovers(self) -> dict[str, Any]:
        """Everything of the pod network still on the host (empty when all pods are gone)."""
        return {k: v for k, v in {"netns": set(self.netns.names), "cni": set(self.cni), "dhcp": set(self.dhcp),
                                  "taps": dict(self.taps)}.items() if v}


@dataclass(frozen=True)
class FakeImage:
    path: Path
    digest: str = "sha256:" + "ab" * 32
    format: str = "qcow2"


class FakeLogWriter:
    def __init__(self, raw: Path, cri_log: Path, state: Path) -> None:
        self.raw, self.cri_log, self.state = raw, cri_log, state
        self.running = False
        self.reopened = 0

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def reopen(self) -> None:
        self.reopened += 1


class FakeVmParts:
    def __init__(self, network: FakePodNetwork, images: dict[str, FakeImage] | None = None) -> None:
        self.network = network
        self.images = images if images is not None else {}
        self.writers: list[FakeLogWriter] = []
        self.host_cpus = 2

    def image_status(self, name: str) -> FakeImage | None:
        return self.images.get(name)

    def validate(self, spec: Any, sandbox: st.SandboxRecord) -> None:
        """A container annotation ``fake/invalid`` is refused, as the real parts refuse a bad annotation."""
        if "fake/invalid" in spec.annotations:
            raise errors.InvalidArgument(f"annotation fake/invalid: {spec.annotations['fake/invalid']!r}")

    def prepare(self, cid: str, spec: Any, sandbox: st.SandboxRecord, image: Any, cdir: Path,
                console_sock: Path, define: Callable[[str], None]) -> dict[str, Any]:
        self.validate(spec, sandbox)
        self.network._step("prepare", sandbox.id)
        root, seed = cdir / "root.qcow2", cdir / "config.iso"
        root.write_bytes(b"overlay")
        seed.write_bytes(b"iso")
        xml = (f"<domain type='qemu'><name>{designer.domain_name(cid)}</name><metadata>"
               f"<virtlet:virtlet xmlns:virtlet='{designer.VIRTLET_XMLNS}'>"
               f"<virtlet:overlay>{root}</virtlet:overlay></virtlet:virtlet></metadata></domain>")
        define(xml)
        return {"root": str(root), "config_drive": str(seed)}

    def taps_before_start(self, sandbox: st.SandboxRecord) -> None:
        self.network.taps_before_start(sandbox.id)

    def after_start(self, sandbox: st.SandboxRecord) -> None:
        self.network.after_start(sandbox.id)

    def after_exit(self, sandbox: st.SandboxRecord) -> None:
        self.network.after_exit(sandbox.id)

    def log_writer(self, raw: Path, cri_log: Path, state: Path) -> FakeLogWriter:
        writer = FakeLogWriter(raw, cri_log, state)
        self.writers.append(writer)
        return writer

    def running_writers(self) -> list[Path]:
        return [w.cri_log for w in self.writers if w.running]
