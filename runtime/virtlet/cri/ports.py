"""What the CRI servicers need from the layers below, as named Protocols.

``daemon.py`` passes the real parts (``virtlet.vm.manager.VmManager``, ``virtlet.stream.service.StreamingService``)
to the servicer's constructor; unit tests pass small fakes with the same methods.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # types only: importing the servicer module still loads no libvirt code
    from virtlet.state import store as st
    from virtlet.vm import guest_agent as ga
    from virtlet.vm import stats as vmstats
    from virtlet.vm.manager import ContainerSpec, ResourceUpdate


class Containers(Protocol):
    """The VMs of the node (``VmManager``): the container calls of the RuntimeService."""

    def create(self, spec: ContainerSpec) -> st.ContainerRecord: ...

    def start(self, cid: str) -> None: ...

    def stop(self, cid: str, timeout: int) -> None: ...

    def remove(self, cid: str) -> None: ...

    def reopen_log(self, cid: str) -> None: ...

    def qemu_pid(self, cid: str) -> int: ...

    def domain_xml(self, cid: str) -> str: ...

    def container_stats(self, rec: st.ContainerRecord) -> vmstats.ContainerSample: ...

    def sandbox_stats(self, rec: st.SandboxRecord) -> vmstats.SandboxSample: ...

    def guest_agent(self, cid: str) -> ga.GuestAgent: ...

    def update_resources(self, cid: str, upd: ResourceUpdate) -> dict[str, int | str]: ...


class StreamingUrls(Protocol):
    """The streaming server (``StreamingService``): checks a request and issues the URL the kubelet connects to."""

    def attach_url(self, container_id: str, *, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> str: ...

    def exec_url(self, container_id: str, cmd: list[str], *, stdin: bool, stdout: bool, stderr: bool,
                 tty: bool = False) -> str: ...

    def port_forward_url(self, sandbox_id: str, ports: Iterable[int]) -> str: ...
