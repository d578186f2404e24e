"""virtlet.preconditions: one check and one message per condition, the RPC named."""

from __future__ import annotations

import pytest

from virtlet import errors, preconditions
from virtlet.state import store as st


def test_require_cmd() -> None:
    preconditions.require_cmd("Exec", ["ls", "-l"])
    for cmd in ([], [""], ("",)):
        with pytest.raises(errors.InvalidArgument, match=r"^ExecSync: cmd is required \(the program"):
            preconditions.require_cmd("ExecSync", cmd)


def test_require_stdio() -> None:
    preconditions.require_stdio("Attach", False, False, True)
    with pytest.raises(errors.InvalidArgument, match="^Exec: at least one of stdin, stdout and stderr"):
        preconditions.require_stdio("Exec", False, False, False)


@pytest.mark.parametrize("state", [st.CONTAINER_CREATED, st.CONTAINER_EXITED, st.CONTAINER_UNKNOWN])
def test_container_running(state: str) -> None:
    preconditions.container_running("Attach", "c1", st.CONTAINER_RUNNING)
    with pytest.raises(errors.FailedPrecondition) as exc:
        preconditions.container_running("Attach", "c1", state)
    assert str(exc.value) == f"Attach: container c1 is {state}; only a running VM accepts Attach"


@pytest.mark.parametrize("state", [st.SANDBOX_CREATING, st.SANDBOX_NOTREADY])
def test_sandbox_ready(state: str) -> None:
    preconditions.sandbox_ready("PortForward", "s1", st.SANDBOX_READY)
    with pytest.raises(errors.FailedPrecondition) as exc:
        preconditions.sandbox_ready("CreateContainer", "s1", state)
    assert str(exc.value) == f"CreateContainer: pod sandbox s1 is {state}; only a READY sandbox accepts CreateContainer"
