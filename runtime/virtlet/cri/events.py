"""GetContainerEvents: the stream of container lifecycle events the kubelet's evented PLEG subscribes to.

Every container state change is committed through the state store, whatever made it (CreateContainer,
StartContainer, StopContainer, RemoveContainer, a guest powering off or QEMU dying, seen through libvirt's
lifecycle events in ``virtlet.vm.exits``, and start-up recovery), so the store is where events come from
(``StateStore.container_listeners``, called in commit order).

Decisions (docs/metrics.md "Container events"):
- Each subscriber has its own queue of at most ``QUEUE_SIZE`` events; publishing never blocks.  A subscriber that
  falls that far behind is dropped: its stream ends with RESOURCE_EXHAUSTED (a gap in the events would leave the
  kubelet believing a stale state; an ended stream makes it relist, which is what the evented PLEG does on any
  stream error).  virtletd never waits for a slow client.
- At most ``MAX_SUBSCRIBERS`` streams at once (each holds one of the CRI server's worker threads); more answer
  RESOURCE_EXHAUSTED.
- A stream starts by sending its (empty) response headers once it is subscribed: a client that waits for them
  misses no event of a change it makes afterwards.  When virtletd stops, open streams end (OK) within a second
  instead of holding the stop for its whole grace period.
- The message is built once when the change commits (in the committing thread, only when someone subscribes):
  the pod sandbox status and container statuses as PodSandboxStatus reports them at that moment.  A DELETED
  event's container is no longer among the statuses.  Subscribers share the message, so the memory held is at
  most ``QUEUE_SIZE`` messages, however many subscribe.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.state import store as st

log = logging.getLogger(__name__)

QUEUE_SIZE = 256
MAX_SUBSCRIBERS = 8
POLL_SECONDS = 1.0  # how often a waiting stream checks that its client is still there

_TYPES = {"CREATED": api.CONTAINER_CREATED_EVENT, "STARTED": api.CONTAINER_STARTED_EVENT,
          "STOPPED": api.CONTAINER_STOPPED_EVENT, "DELETED": api.CONTAINER_DELETED_EVENT}


# a pod's statuses for an event: (sandbox status, container statuses), None when the sandbox is gone
Describe = Callable[[str], "tuple[api.PodSandboxStatus, list[api.ContainerStatus]] | None"]


class _Subscriber:
    def __init__(self) -> None:
        self.queue: queue.Queue[api.ContainerEventResponse] = queue.Queue(maxsize=QUEUE_SIZE)
        self.overflowed = False


class ContainerEvents:
    """The hub: one bounded queue per subscriber, fed by the store's container listener."""

    def __init__(self, store: st.StateStore, describe: Describe) -> None:
        self.describe = describe
        self._lock = threading.Lock()
        self._subscribers: list[_Subscriber] = []
        self.closed = threading.Event()
        store.container_listeners.append(self.publish)

    def close(self) -> None:
        """End every stream (virtletd stops)."""
        self.closed.set()

    def publish(self, rec: st.ContainerRecord, change: str) -> None:
        with self._lock:
            if not self._subscribers:
                return
        event = api.ContainerEventResponse(container_id=rec.id, container_event_type=_TYPES[change],
                                           created_at=st.now_ns())
        statuses = self.describe(rec.sandbox_id)
        if statuses is not None:  # the sandbox was removed meanwhile: the event still counts
            event.pod_sandbox_status.CopyFrom(statuses[0])
            event.containers_statuses.extend(statuses[1])
        with self._lock:
            for sub in self._subscribers:
                if sub.overflowed:
                    continue
                try:
                    sub.queue.put_nowait(event)
                except queue.Full:
                    sub.overflowed = True

    def subscribe(self) -> _Subscriber:
        with self._lock:
            if len(self._subscribers) >= MAX_SUBSCRIBERS:
                raise errors.ResourceExhausted(
                    f"GetContainerEvents: {MAX_SUBSCRIBERS} streams are open already; close one (or relist)")
            sub = _Subscriber()
            self._subscribers.append(sub)
            return sub

    def subscribers_count(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def unsubscribe(self, sub: _Subscriber) -> None:
        with self._lock:
            if sub in self._subscribers:
                self._subscribers.remove(sub)


class EventCalls:
    """GetContainerEvents, mixed into ``RuntimeServicer`` (which provides ``events``, made with
    ``_event_statuses``, and ``PodSandboxStatus``)."""

    events: ContainerEvents
    PodSandboxStatus: Callable[[api.PodSandboxStatusRequest, grpc.ServicerContext], api.PodSandboxStatusResponse]

    def GetContainerEvents(self, request: api.GetEventsRequest,
                           context: grpc.ServicerContext) -> Iterator[api.ContainerEventResponse]:
        sub = self.events.subscribe()  # at the call, not at the first event: nothing after it is missed
        context.send_initial_metadata(())
        return self._event_stream(sub, context)

    def _event_stream(self, sub: _Subscriber, context: grpc.ServicerContext) -> Iterator[api.ContainerEventResponse]:
        try:
            while context.is_active() and not self.events.closed.is_set():
                if sub.overflowed and sub.queue.empty():
                    raise errors.ResourceExhausted(
                        f"GetContainerEvents: the client fell {QUEUE_SIZE} events behind and events were lost; "
                        "subscribe again and relist")
                try:
                    event = sub.queue.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                yield event
        finally:
            self.events.unsubscribe(sub)

    def _event_statuses(self, sandbox_id: str) -> tuple[api.PodSandboxStatus, list[api.ContainerStatus]] | None:
        try:
            status = self.PodSandboxStatus(api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
                                           None)  # type: ignore[arg-type]  # it reads no context
        except errors.NotFound:
            return None
        return status.status, list(status.containers_statuses)
