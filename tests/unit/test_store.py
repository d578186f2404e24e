"""The state store: transitions, one live container per sandbox, persistence and schema version."""

import json
import sqlite3
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.network.model import NicInfo, PodNetworkInfo, Route
from virtlet.state import store as st


def _sandbox(sid: str = "s1", **kw: object) -> st.SandboxRecord:
    base = dict(id=sid, name="pod", namespace="default", uid="u1", attempt=0, state=st.SANDBOX_CREATING,
                created_at=st.now_ns(), runtime_handler="", netns=f"/var/run/netns/{sid}",
                labels={"app": "x"}, annotations={"a": "b"}, hostname="pod-host", log_directory="/var/log/pods/p")
    base.update(kw)
    return st.SandboxRecord(**base)  # type: ignore[arg-type]


def _network(sid: str) -> PodNetworkInfo:
    return PodNetworkInfo(
        sandbox_id=sid, netns_path=f"/var/run/netns/{sid}", dns_servers=["10.96.0.10"], dns_searches=["svc"],
        dns_options=["ndots:5"], dhcp_pid=7, nics=[NicInfo(
            index=0, mac="0a:58:0a:00:00:02", mtu=1450, ip="10.0.0.2", prefix=24, gateway="10.0.0.1",
            routes=[Route(dst="0.0.0.0/0", gw="10.0.0.1")], veth="eth0", bridge="vmbr0", tap=f"vt{sid}0",
            ipv6=["fd00::2/64"])])


def _container(cid: str = "c1", sid: str = "s1", **kw: object) -> st.ContainerRecord:
    base = dict(id=cid, sandbox_id=sid, name="vm", attempt=0, state=st.CONTAINER_CREATED, created_at=st.now_ns(),
                image="host/img.qcow2", image_ref="sha256:ab", log_path="/x.log")
    base.update(kw)
    return st.ContainerRecord(**base)  # type: ignore[arg-type]


def test_roundtrip_and_reopen(tmp_path: Path) -> None:
    db = st.StateStore(tmp_path / "v.db")
    db.add_sandbox(_sandbox())
    assert db.get_sandbox("s1").network is None  # type: ignore[union-attr]  # not set up yet
    db.update_sandbox("s1", state=st.SANDBOX_READY, network=_network("s1"))
    db.close()
    db = st.StateStore(tmp_path / "v.db")
    rec = db.require_sandbox("s1")
    assert rec.state == st.SANDBOX_READY and rec.network == _network("s1")
    assert isinstance(rec.network, PodNetworkInfo) and rec.network.pod_ips == ["10.0.0.2", "fd00::2"]
    assert rec.network.nics[0].routes == [Route(dst="0.0.0.0/0", gw="10.0.0.1")]
    assert rec.labels == {"app": "x"} and rec.hostname == "pod-host" and rec.log_directory == "/var/log/pods/p"
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


def test_network_json_holds_no_copy_of_the_hostname_or_pod_ips(tmp_path: Path) -> None:
    """One source per fact: the host name is the record's column, the pod IPs are derived from the NICs."""
    db = st.StateStore(tmp_path / "v.db")
    db.add_sandbox(_sandbox())
    db.update_sandbox("s1", state=st.SANDBOX_READY, network=_network("s1"))
    raw = json.loads(db._db.execute("SELECT network FROM sandboxes WHERE id='s1'").fetchone()[0])
    assert "hostname" not in raw and "pod_ips" not in raw and raw["nics"][0]["tap"] == "vts10"
    assert "config" not in [r[1] for r in db._db.execute("PRAGMA table_info(sandboxes)")]


def test_lists_are_served_again_until_a_commit_and_follow_every_commit(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The kubelet lists every second; a list with no commit since the last one is not read and decoded again,
    and every commit (by virtletd's writer or by another process) is seen by the next list."""
    db = st.StateStore(tmp_path / "v.db")
    db.add_sandbox(_sandbox("s1"))
    db.update_sandbox("s1", state=st.SANDBOX_READY, network=_network("s1"))
    decoded: list[str] = []
    real = st._decode_row

    def counting(cls: type, row: object) -> object:
        decoded.append(cls.__name__)
        return real(cls, row)  # type: ignore[type-var]

    monkeypatch.setattr(st, "_decode_row", counting)
    first = db.list_sandboxes()
    assert [r.id for r in first] == ["s1"] and decoded == ["SandboxRecord"]
    first.clear()  # each caller gets its own list
    assert [r.id for r in db.list_sandboxes()] == ["s1"] and decoded == ["SandboxRecord"]  # not read again
    db.add_sandbox(_sandbox("s2", uid="u2"))
    assert [r.id for r in db.list_sandboxes()] == ["s1", "s2"]
    db.add_container(_container("c1", "s1"))
    assert [c.id for c in db.list_containers()] == ["c1"]
    db.update_container("c1", state=st.CONTAINER_RUNNING)
    assert db.list_containers()[0].state == st.CONTAINER_RUNNING
    assert db.list_containers("s1")[0].state == st.CONTAINER_RUNNING
    other = sqlite3.connect(str(tmp_path / "v.db"), isolation_level=None)  # another process's commit
    try:
        other.execute("UPDATE sandboxes SET hostname='changed' WHERE id='s2'")
    finally:
        other.close()
    assert [r.hostname for r in db.list_sandboxes()] == ["pod-host", "changed"]
    db.update_container("c1", state=st.CONTAINER_EXITED)
    db.delete_container("c1")
    db.delete_sandbox("s2")
    assert db.list_containers() == [] and [r.id for r in db.list_sandboxes()] == ["s1"]
