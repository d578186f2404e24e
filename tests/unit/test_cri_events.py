"""GetContainerEvents' hub: events from the state store in commit order, bounded per subscriber, capped streams."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from virtlet import errors
from virtlet.cri import events as ev
from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.runtime_service import RuntimeServicer
from virtlet.sandbox.manager import SandboxManager
from virtlet.state import store as st


class Context:
    def __init__(self) -> None:
        self.active = True

    def is_active(self) -> bool:
        return self.active

    def send_initial_metadata(self, metadata: Any) -> None:
        pass


@pytest.fixture
def rt(tmp_path: Path) -> RuntimeServicer:
    store = st.StateStore(tmp_path / "v.db")
    store.add_sandbox(st.SandboxRecord(id="s1", name="pod", namespace="ns", uid="u", attempt=0,
                                       state=st.SANDBOX_READY, created_at=st.now_ns(), runtime_handler="virtlet",
                                       netns=""))
    return RuntimeServicer(SandboxManager(store), lambda: [])


def _container(rt: RuntimeServicer, cid: str) -> None:
    rt.store.add_container(st.ContainerRecord(
        id=cid, sandbox_id="s1", name="vm", attempt=0, state=st.CONTAINER_CREATED, created_at=st.now_ns(),
        image="img", image_ref="sha256:ab", log_path="vm/0.log"))


def test_lifecycle_events_in_order_with_statuses(rt: RuntimeServicer) -> None:
    stream = rt.GetContainerEvents(api.GetEventsRequest(), Context())  # type: ignore[arg-type]
    _container(rt, "c1")
    rt.store.update_container("c1", state=st.CONTAINER_RUNNING, started_at=st.now_ns())
    rt.store.update_container("c1", extra={"x": 1})  # no state change: no event
    rt.store.update_container("c1", state=st.CONTAINER_EXITED, finished_at=st.now_ns())
    rt.store.delete_container("c1")
    got = list(itertools.islice(stream, 4))
    assert [e.container_event_type for e in got] == [
        api.CONTAINER_CREATED_EVENT, api.CONTAINER_STARTED_EVENT, api.CONTAINER_STOPPED_EVENT,
        api.CONTAINER_DELETED_EVENT]
    assert all(e.container_id == "c1" and e.pod_sandbox_status.id == "s1" for e in got)
    assert got[0].created_at <= got[1].created_at <= got[2].created_at
    assert [c.id for c in got[2].containers_statuses] == ["c1"]
    assert list(got[3].containers_statuses) == []
    assert rt.events.subscribers_count() == 1
    stream.close()  # type: ignore[attr-defined]
    assert rt.events.subscribers_count() == 0


def test_slow_subscriber_is_dropped_not_waited_for(rt: RuntimeServicer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ev, "QUEUE_SIZE", 3)
    slow = rt.GetContainerEvents(api.GetEventsRequest(), Context())  # type: ignore[arg-type]
    _container(rt, "c1")
    rt.store.update_container("c1", state=st.CONTAINER_RUNNING)
    rt.store.update_container("c1", state=st.CONTAINER_EXITED)
    rt.store.delete_container("c1")  # the 4th event: the queue is full; publishing did not block
    _container(rt, "c2")
    got = [next(slow) for _ in range(3)]  # what was queued is still delivered, then the stream ends
    assert [e.container_event_type for e in got] == [
        api.CONTAINER_CREATED_EVENT, api.CONTAINER_STARTED_EVENT, api.CONTAINER_STOPPED_EVENT]
    with pytest.raises(errors.ResourceExhausted, match="fell 3 events behind"):
        next(slow)
    assert rt.events.subscribers_count() == 0


def test_subscribers_are_capped_and_close_ends_streams(rt: RuntimeServicer) -> None:
    subs = [rt.events.subscribe() for _ in range(ev.MAX_SUBSCRIBERS)]
    with pytest.raises(errors.ResourceExhausted, match="streams are open"):
        rt.events.subscribe()
    for sub in subs:
        rt.events.unsubscribe(sub)
    rt.events.close()
    assert list(rt.GetContainerEvents(api.GetEventsRequest(), Context())) == []  # type: ignore[arg-type]
