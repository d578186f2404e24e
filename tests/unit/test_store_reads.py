"""Reads of the state store do not wait for a writer (pod starts in parallel commit with an fsync each), and
every read sees what was committed before it, from any thread, also after a reopen."""

from __future__ import annotations

import threading
from pathlib import Path

from virtlet.state import store as st


def _sandbox(sid: str) -> st.SandboxRecord:
    return st.SandboxRecord(id=sid, name=f"pod-{sid}", namespace="default", uid=f"u-{sid}", attempt=0,
                            state=st.SANDBOX_CREATING, created_at=st.now_ns(), runtime_handler="",
                            netns=f"/var/run/netns/{sid}")


def _container(cid: str, sid: str) -> st.ContainerRecord:
    return st.ContainerRecord(id=cid, sandbox_id=sid, name="vm", attempt=0, state=st.CONTAINER_CREATED,
                              created_at=st.now_ns(), image="img", image_ref="sha256:ab", log_path="vm.log")


def test_reads_answer_while_a_write_transaction_is_open(tmp_path: Path) -> None:
    db = st.StateStore(tmp_path / "s.db")
    db.add_sandbox(_sandbox("s1"))
    db.update_sandbox("s1", state=st.SANDBOX_READY)
    in_tx, release = threading.Event(), threading.Event()

    def slow_writer() -> None:
        with db._tx() as conn:  # a commit that takes long (an fsync on a busy disk)
            conn.execute("UPDATE sandboxes SET hostname='changing' WHERE id='s1'")
            in_tx.set()
            release.wait(30)

    writer = threading.Thread(target=slow_writer)
    writer.start()
    try:
        assert in_tx.wait(30)
        seen: list[object] = []
        reader = threading.Thread(target=lambda: seen.extend([db.get_sandbox("s1"), db.list_sandboxes(),
                                                              db.list_containers("s1")]))
        reader.start()
        reader.join(30)
        assert not reader.is_alive(), "a read waited for the open write transaction"
        rec = seen[0]
        assert isinstance(rec, st.SandboxRecord) and rec.hostname == ""  # the uncommitted change is not seen
        assert [r.id for r in seen[1]] == ["s1"] and seen[2] == []  # type: ignore[attr-defined]
    finally:
        release.set()
        writer.join(30)
    assert db.require_sandbox("s1").hostname == "changing"  # committed: seen at once by the next read


def test_every_committed_write_is_read_back_at_once_from_other_threads(tmp_path: Path) -> None:
    db = st.StateStore(tmp_path / "s.db")
    errors: list[str] = []

    def pod(n: int) -> None:
        sid, cid = f"s{n}", f"c{n}"
        db.add_sandbox(_sandbox(sid))
        db.update_sandbox(sid, state=st.SANDBOX_READY)
        if db.require_sandbox(sid).state != st.SANDBOX_READY:
            errors.append(f"{sid} not READY after its commit")
        db.add_container(_container(cid, sid))
        db.update_container(cid, state=st.CONTAINER_RUNNING)
        got = db.get_container(cid)
        if got is None or got.state != st.CONTAINER_RUNNING:
            errors.append(f"{cid} not RUNNING after its commit")

    threads = [threading.Thread(target=pod, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(r.id for r in db.list_sandboxes()) == sorted(f"s{n}" for n in range(10))
    assert len(db.list_containers()) == 10
    db.close()
    reopened = st.StateStore(tmp_path / "s.db")
    assert len(reopened.list_containers()) == 10 and all(
        c.state == st.CONTAINER_RUNNING for c in reopened.list_containers())
