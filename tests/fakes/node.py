"""A node for state-machine unit tests: the real ``StateStore`` (a temp file), ``SandboxManager`` and ``VmManager``
over the shared fake libvirt (``tests/fakes/libvirt.py``) and fake pod network (``tests/fakes/network.py``).

``Node.virtletd()`` makes the managers of one virtletd process; ``kill_at(failpoint, call)`` runs a call until it
reaches a failpoint and leaves it frozen there, as ``VIRTLET_FAILPOINT`` + SIGKILL does to a real virtletd: the
store, the domains, the netns and the files stay as that step left them, the old process's event subscription is
dropped, and a new ``virtletd()`` (whose ``recover`` runs as at start-up) takes over.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fakes.libvirt import FakeConnection
from tests.fakes.network import FakeImage, FakePodNetwork, FakeVmParts
from virtlet import failpoints
from virtlet.sandbox import manager as sandbox_manager
from virtlet.sandbox.manager import SandboxManager, SandboxSpec
from virtlet.state import store as st
from virtlet.vm.libvirt_host import LibvirtHost
from virtlet.vm.manager import ContainerSpec, VmManager

IMAGE = "fake.example/tiny:1"


@dataclass
class Virtletd:
    store: st.StateStore
    host: LibvirtHost
    sandboxes: SandboxManager
    vms: VmManager

    def recover(self) -> None:
        """What the daemon does at start-up (``daemon.py``): sandboxes first, then VMs."""
        self.sandboxes.recover()
        self.vms.recover()

    def remove_sandbox(self, sid: str) -> None:
        self.sandboxes.remove(sid)


class Frozen:
    """A call stopped at a failpoint in its own thread (the 'killed' virtletd)."""

    def __init__(self, thread: threading.Thread, release: threading.Event) -> None:
        self.thread = thread
        self.release = release


class Node:
    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp = tmp
        self.conn = FakeConnection()
        self.net = FakePodNetwork()
        self.image = FakeImage(path=tmp / "image.qcow2")
        self.parts = FakeVmParts(self.net, {IMAGE: self.image})
        self.log_dir = tmp / "pods"
        monkeypatch.setattr(sandbox_manager, "netns", self.net.netns)
        self._frozen: list[Frozen] = []
        self._freeze_at: dict[str, threading.Event] = {}
        self._reached: dict[str, threading.Event] = {}
        real_hit = failpoints.hit

        def hit(name: str) -> None:
            assert name in failpoints.NAMES, name
            release = self._freeze_at.get(name)
            if release is not None and threading.current_thread().name == f"killed-at-{name}":
                self._reached[name].set()
                release.wait()
                raise _Killed(name)
            real_hit(name)

        monkeypatch.setattr(failpoints, "hit", hit)
        self.d = self.virtletd()

    def virtletd(self) -> Virtletd:
        store = st.StateStore(self.tmp / "virtlet.db")
        host = LibvirtHost("fake:///", open_connection=self.conn.open)
        vms = VmManager(store, host, self.parts, state_dir=self.tmp / "state", run_dir=self.tmp / "run")
        sandboxes = SandboxManager(store, self.net, containers=vms)  # wired as daemon.py does
        host.connect()
        return Virtletd(store, host, sandboxes, vms)

    def restart(self, while_down: Callable[[], Any] | None = None) -> Virtletd:
        """Kill the current virtletd between calls (its log writers die with it), run ``while_down``, start a new
        one and run its start-up recovery."""
        self._kill()
        if while_down is not None:
            while_down()
        self.d = self.virtletd()
        self.d.recover()
        return self.d

    def _kill(self) -> None:
        self.d.host.close()  # the dead process's libvirt connection (and its event callback) is gone
        self.d.vms.shutdown()  # its log writers are gone with it

    def kill_at(self, failpoint: str, call: Callable[[], Any]) -> Virtletd:
        """Run ``call`` on the current virtletd until ``failpoint``, 'SIGKILL' it there, start a new virtletd and
        run its start-up recovery; returns the new one (also ``self.d``)."""
        release, reached = threading.Event(), threading.Event()
        self._freeze_at[failpoint] = release
        self._reached[failpoint] = reached
        outcome: list[BaseException] = []

        def run() -> None:
            try:
                call()
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=run, name=f"killed-at-{failpoint}", daemon=True)
        thread.start()
        while not reached.wait(0.05):
            if not thread.is_alive():
                raise AssertionError(f"{failpoint} was never reached: {outcome}")
        self._frozen.append(Frozen(thread, release))
        self._kill()
        self.d = self.virtletd()
        self.d.recover()
        return self.d

    def close(self) -> None:
        """Let frozen calls end (their own clean-up then runs on a world no test looks at) and join them."""
        for frozen in self._frozen:
            frozen.release.set()
            frozen.thread.join(10)
        self.d.vms.shutdown()
        self.d.host.close()

    # -- building blocks --------------------------------------------------------------------------------
    def sandbox_spec(self, name: str = "pod", attempt: int = 0) -> SandboxSpec:
        return SandboxSpec(name=name, namespace="default", uid=f"uid-{name}", attempt=attempt, hostname=name,
                           runtime_handler="virtlet", log_directory=str(self.log_dir / name))

    def container_spec(self, sid: str, attempt: int = 0) -> ContainerSpec:
        return ContainerSpec(sandbox_id=sid, name="vm", attempt=attempt, image=IMAGE, log_path=f"vm/{attempt}.log")

    def run_sandbox(self, name: str = "pod") -> str:
        return self.d.sandboxes.run(self.sandbox_spec(name)).id

    def running_container(self, name: str = "pod") -> tuple[str, str]:
        sid = self.run_sandbox(name)
        cid = self.d.vms.create(self.container_spec(sid)).id
        self.d.vms.start(cid)
        return sid, cid

    def domain(self, cid: str) -> Any:
        return self.conn.domains.get(VmManager.domain_name(cid))

    def wait_exit_handlers(self) -> None:
        """Join the threads that turn libvirt's stop events into container states."""
        for thread in threading.enumerate():
            if thread.name.startswith("exit-"):
                thread.join(10)

    def leftovers(self) -> dict[str, Any]:
        """Everything of any pod still on the node (domains, netns, CNI, taps, files, records)."""
        found: dict[str, Any] = dict(self.net.leftovers())
        if self.conn.domains:
            found["domains"] = sorted(self.conn.domains)
        files = sorted(p.name for p in (self.tmp / "state" / "containers").iterdir())
        if files:
            found["container dirs"] = files
        if self.d.store.list_sandboxes():
            found["sandboxes"] = [s.id for s in self.d.store.list_sandboxes()]
        if self.d.store.list_containers():
            found["containers"] = [c.id for c in self.d.store.list_containers()]
        return found


class _Killed(BaseException):
    """Ends a frozen call when the test is over."""


@contextmanager
def node(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    n = Node(tmp, monkeypatch)
    try:
        yield n
    finally:
        n.close()
