"""The leak check of the real-VM fixture blames a daemon only for its own domains.

Regression for the ``libvirt domains leaked`` at the teardown of test_full_image_real_cloud_init on a loaded
machine: the guard took any domain whose id appeared in the daemon's log for the daemon's own, and a daemon logs
other daemons' domains (start-up recovery reads every virtlet domain on the host; "cannot read domain X" when one
vanishes under it).  With other test runs booting VMs meanwhile, one of their domains was blamed on this test.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers.daemon import VirtletdProcess
from tests.integration.conftest import DomainGuard
from tests.integration.test_vm_lifecycle import Pod, _pull
from tests.integration.test_vm_lifecycle import served_tiny as served_tiny
from virtlet.cri.gen import api_pb2 as api


def test_guard_blames_only_the_daemon_whose_domain_it_is(vm_virtletd: VirtletdProcess, world_dir: Path,
                                                         served_tiny: str, tmp_path: Path) -> None:
    _pull(vm_virtletd, served_tiny)
    pod = Pod(vm_virtletd, world_dir, "vm-guard", image=served_tiny)
    pod.run_sandbox()
    pod.create()  # a defined domain is enough: the guard lists inactive ones too
    domain = f"virtlet-{pod.container_id}"
    try:
        # another daemon, on its own state dir, that named this domain in its log at start-up
        other_log = tmp_path / "other-virtletd.log"
        other_log.write_text(f"WARNING virtlet.vm.manager: cannot read domain {domain}: Domain not found\n")
        other = DomainGuard()
        other.logs.append(other_log)
        other.state_dirs.append(tmp_path / "state")
        assert domain not in other.leaked()
        mine = DomainGuard()
        mine.logs.append(vm_virtletd.log_path)
        mine.state_dirs.append(vm_virtletd.state_dir)
        assert domain in mine.leaked()
    finally:
        pod.rt.RemoveContainer(api.RemoveContainerRequest(container_id=pod.container_id), timeout=120)
        pod.container_id = ""
        pod.stop_and_remove()
