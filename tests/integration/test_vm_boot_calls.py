"""Calls a kubelet (or the CRI validation suite) sends right after StartContainer, while the VM still boots
(issue 17): ExecSync waits for the guest agent to connect within its timeout, and StopContainer keeps pressing
the ACPI power button until the guest, once its handler is up, powers off."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_vm_lifecycle import Pod, _pull, served_tiny  # noqa: F401  (fixture)
from virtlet.cri.gen import api_pb2 as api

pytestmark = [pytest.mark.libvirt, pytest.mark.network]

STOP_TIMEOUT = 120  # the grace period given; a guest that gets the button once it can act is off far sooner


def test_exec_right_after_start_waits_for_the_agent(vm_virtletd: VirtletdProcess, world_dir: Path,
                                                    served_tiny: str) -> None:  # noqa: F811
    _pull(vm_virtletd, served_tiny)
    pod = Pod(vm_virtletd, world_dir, "vm-early-exec", image=served_tiny)
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        res = pod.rt.ExecSync(api.ExecSyncRequest(container_id=pod.container_id, cmd=["hostname"], timeout=180),
                              timeout=240)
        assert (res.exit_code, res.stdout) == (0, b"vm-early-exec\n"), res
        # a guest whose agent is gone: the call waits out its timeout, then says what is missing and how long
        # it waited (the command never ran)
        try:
            pod.rt.ExecSync(api.ExecSyncRequest(container_id=pod.container_id, timeout=10,
                                                cmd=["sh", "-c", "kill $(cat /run/qemu-ga.pid)"]), timeout=60)
        except grpc.RpcError as exc:  # the agent may die before it reports the exit
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            pod.rt.ExecSync(api.ExecSyncRequest(container_id=pod.container_id, cmd=["true"], timeout=3), timeout=60)
        assert time.monotonic() - start >= 3
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = err.value.details() or ""
        assert "guest agent does not answer" in details and "waited 3s" in details, details
    finally:
        pod.stop_and_remove()


def test_stop_right_after_start_powers_the_guest_off(vm_virtletd: VirtletdProcess, world_dir: Path,
                                                     served_tiny: str) -> None:  # noqa: F811
    _pull(vm_virtletd, served_tiny)
    pod = Pod(vm_virtletd, world_dir, "vm-early-stop", image=served_tiny)
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        start = time.monotonic()
        pod.rt.StopContainer(api.StopContainerRequest(container_id=pod.container_id, timeout=STOP_TIMEOUT),
                             timeout=STOP_TIMEOUT + 60)
        took = time.monotonic() - start
        st = pod.status().status
        assert st.state == api.CONTAINER_EXITED and (st.exit_code, st.reason) == (0, "Completed"), st
        assert took < STOP_TIMEOUT / 2, f"StopContainer took {took:.1f}s of its {STOP_TIMEOUT}s"
        assert any("reboot: Power down" in line for line in pod.log_lines()), pod.log_lines()[-20:]
    finally:
        pod.stop_and_remove()
