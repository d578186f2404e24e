"""The state store: transitions, one live container per sandbox, persistence and schema version."""

from pathlib import Path

import pytest

from virtlet import errors
from virtlet.state import store as st


def _sandbox(sid: str = "s1", **kw: object) -> st.SandboxRecord:
    base = dict(id=sid, name="pod", namespace="default", uid="u1", attempt=0, state=st.SANDBOX_CREATING,
                created_at=st.now_ns(), runtime_handler="", netns=f"/var/run/netns/{sid}",
                labels={"app": "x"}, annotations={"a": "b"}, config=b"\x01\x02")
    base.update(kw)
    return st.SandboxRecord(**base)  # type: ignore[arg-type]


def _container(cid: str = "c1", sid: str = "s1", **kw: object) -> st.ContainerRecord:
    base = dict(id=cid, sandbox_id=sid, name="vm", attempt=0, state=st.CONTAINER_CREATED, created_at=st.now_ns(),
                image="host/img.qcow2", image_ref="sha256:ab", log_path="/x.log")
    base.update(kw)
    return st.ContainerRecord(**base)  # type: ignore[arg-type]


def test_roundtrip_and_reopen(tmp_path: Path) -> None:
    db = st.StateStore(tmp_path / "v.db")
    db.add_sandbox(_sandbox())
    db.update_sandbox("s1", state=st.SANDBOX_READY, network={"pod_ips": ["10.0.0.2"]})
    db.close()
    db = st.StateStore(tmp_path / "v.db")
    rec = db.require_sandbox("s1")
    assert rec.state == st.SANDBOX_READY and rec.network == {"pod_ips": ["10.0.0.2"]}
    assert rec.labels == {"app": "x"} and rec.config == b"\x01\x02"
    assert db.schema_version() == st.SCHEMA_VERSION
    assert db._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_creating_sandbox_is_invisible_to_require(tmp_path: Path) -> None:
    db = st.StateStore(tmp_path / "v.db")
    db.add_sandbox(_sandbox())
    with pytest.raises(errors.NotFound):
        db.require_sandbox("s1")


def test_illegal_transition(tmp_path: Path) -> None:
    db = st.StateStore(tmp_path / "v.db")
    db.add_sandbox(_sandbox(state=st.SANDBOX_NOTREADY))
    with pytest.raises(errors.FailedPrecondition, match="cannot go from NOTREADY to READY"):
        db.update_sandbox("s1", state=st.SANDBOX_READY)


def test_one_live_container_per_sandbox(tmp_path: Path) -> None:
    db = st.StateStore(tmp_path / "v.db")
    db.add_sandbox(_sandbox(state=st.SANDBOX_READY))
    db.add_container(_container("c1"))
    with pytest.raises(errors.FailedPrecondition, match="exactly one container"):
        db.add_container(_container("c2"))
    db.update_container("c1", state=st.CONTAINER_EXITED, exit_code=0)
    db.add_container(_container("c2", attempt=1))  # a restart after exit is allowed
    assert [c.id for c in db.list_containers("s1")] == ["c1", "c2"]
    with pytest.raises(errors.FailedPrecondition, match="remove them first"):
        db.delete_sandbox("s1")


def test_container_needs_ready_sandbox(tmp_path: Path) -> None:
    db = st.StateStore(tmp_path / "v.db")
    with pytest.raises(errors.NotFound):
        db.add_container(_container())
    db.add_sandbox(_sandbox(state=st.SANDBOX_NOTREADY))
    with pytest.raises(errors.FailedPrecondition, match="READY sandbox"):
        db.add_container(_container())


def test_newer_schema_refused(tmp_path: Path) -> None:
    db = st.StateStore(tmp_path / "v.db")
    db._db.execute(f"PRAGMA user_version = {st.SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(errors.FailedPrecondition, match="newer than this virtletd"):
        st.StateStore(tmp_path / "v.db")


def test_duplicate_pod_attempt_refused(tmp_path: Path) -> None:
    db = st.StateStore(tmp_path / "v.db")
    db.add_sandbox(_sandbox("s1", state=st.SANDBOX_READY))
    with pytest.raises(errors.AlreadyExists):
        db.add_sandbox(_sandbox("s2"))


def test_duplicate_pod_attempt_refused_until_removed(tmp_path: Path) -> None:
    """As containerd: the (name, namespace, uid, attempt) stays reserved while the sandbox exists in any state."""
    db = st.StateStore(tmp_path / "v.db")
    db.add_sandbox(_sandbox("s1", state=st.SANDBOX_READY))
    db.update_sandbox("s1", state=st.SANDBOX_NOTREADY)
    with pytest.raises(errors.AlreadyExists, match="is reserved for 's1'"):
        db.add_sandbox(_sandbox("s2"))
    db.delete_sandbox("s1")
    db.add_sandbox(_sandbox("s2"))
