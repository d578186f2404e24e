"""A VM pod as a Job: the guest reports its own exit code on its ``cloud.virtlet.exit`` virtio-serial port before
it powers off, and ContainerStatus reports that code (real libvirtd + QEMU/TCG, the tiny image's ``virtlet-exit``
and the documented ``echo exit-code N > /dev/virtio-ports/cloud.virtlet.exit``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_vm_lifecycle import BOOT_TIMEOUT, MARKER, Pod, _pull, served_tiny  # noqa: F401  (fixture)
from virtlet.cri.gen import api_pb2 as api

pytestmark = [pytest.mark.libvirt, pytest.mark.network]


def _job(daemon: VirtletdProcess, world: Path, image: str, name: str, runcmd: list[str]) -> Pod:
    _pull(daemon, image)
    pod = Pod(daemon, world, name, image=image, memory=128 << 20,
              annotations={"VirtletCloudInitUserData": json.dumps({"runcmd": runcmd})})
    pod.run_sandbox()
    pod.create()
    pod.start()
    return pod


@pytest.mark.parametrize(("code", "reason"), [(3, "Error"), (0, "Completed")])
def test_guest_reports_its_exit_code(vm_virtletd: VirtletdProcess, world_dir: Path,
                                     served_tiny: str, code: int, reason: str) -> None:  # noqa: F811
    pod = _job(vm_virtletd, world_dir, served_tiny, f"vm-job-{code}", [f"virtlet-exit {code}"])
    try:
        st = pod.wait_state(api.CONTAINER_EXITED, timeout=BOOT_TIMEOUT)
        assert (st.exit_code, st.reason) == (code, reason), st
        assert f"the guest reported exit code {code}" in st.message, st
        pod.wait_log(f"reported exit code {code}", timeout=10)
        # the kubelet's restart of a Job pod with restartPolicy OnFailure: the next container starts afresh, and
        # a report of the last run never counts for it (nothing reported yet: RUNNING)
        first = pod.container_id
        pod.create(attempt=1)
        pod.start()
        assert pod.status().status.state == api.CONTAINER_RUNNING
        pod.rt.RemoveContainer(api.RemoveContainerRequest(container_id=first), timeout=120)
    finally:
        pod.stop_and_remove()


def test_kill_after_grace_is_137_whatever_the_guest_wrote(vm_virtletd: VirtletdProcess, world_dir: Path,
                                                          served_tiny: str) -> None:  # noqa: F811
    """The documented way for any image (udev's /dev/virtio-ports link) writes a code, but the guest ignores the
    ACPI button and is destroyed at the end of the grace period: 137, as for a SIGKILL."""
    pod = _job(vm_virtletd, world_dir, served_tiny, "vm-job-kill", [
        "echo exit-code 5 > /dev/virtio-ports/cloud.virtlet.exit && echo EXIT-WRITTEN", "virtlet-ignore-acpi"])
    try:
        pod.wait_log(MARKER)
        pod.wait_log("EXIT-WRITTEN", timeout=60)
        pod.wait_log("ACPI power button will be ignored", timeout=60)
        pod.rt.StopContainer(api.StopContainerRequest(container_id=pod.container_id, timeout=3), timeout=120)
        st = pod.status().status
        assert (st.state, st.exit_code, st.reason) == (api.CONTAINER_EXITED, 137, "Error"), st
        assert "grace period of 3s" in st.message, st
    finally:
        pod.stop_and_remove()
