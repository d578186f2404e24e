"""GetContainerEvents through the proxy: the event streams of all backends merged into one.

What the kubelet's evented PLEG does with this stream decides the rules: it trusts the stream for every pod on
the node and relists only every 300 s while the stream is up; when the stream ends (with an error or not) it
relists at once and subscribes again (after 5 failed subscriptions it falls back to the one-second relist for
good).  A merged stream that silently misses a runtime's events would hide that runtime's pod changes for
minutes, so every gap ends the kubelet's stream:

- A backend that answers UNIMPLEMENTED (containerd 1.6) makes the whole call UNIMPLEMENTED, naming it: half
  the node's events are worse than none (the kubelet then keeps relisting every second).
- A backend stream that breaks or ends (the backend stopped or restarted) ends the stream with UNAVAILABLE
  naming the runtime; the kubelet relists and subscribes again.
- A secondary that is down when the stream starts is left out and asked again every ``EVENT_RETRY_S``; when
  it answers again the stream ends with UNAVAILABLE (its changes while down are unknown: the kubelet relists).
  A primary that is down fails the call, as every call of the primary does.
- Bounded: each stream has a queue of at most ``QUEUE_SIZE`` events; a kubelet that falls that far behind gets
  RESOURCE_EXHAUSTED (and relists) instead of the proxy buffering without limit; at most ``MAX_STREAMS``
  streams at once (each holds a server thread and one backend subscription per runtime).  Any end cancels
  the backend subscriptions.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy import rewrite
from virtlet.proxy.backends import Backend, BackendError, Backends
from virtlet.proxy.dispatch import RT
from virtlet.proxy.naming import PRIMARY, display

log = logging.getLogger("virtlet.proxy")

EVENT_RETRY_S = 1.0
HEADERS_WAIT_S = 2.0  # how long the stream's start waits for the backends to confirm their subscriptions
QUEUE_SIZE = 256
MAX_STREAMS = 8
_streams = threading.BoundedSemaphore(MAX_STREAMS)


class _Merge:
    """One kubelet stream: the bounded queue, the backend subscriptions, and the first reason to end."""

    def __init__(self) -> None:
        self.events: queue.Queue[api.ContainerEventResponse | None] = queue.Queue(maxsize=QUEUE_SIZE)
        self.stop = threading.Event()
        self.failure: errors.VirtletError | None = None
        self._lock = threading.Lock()
        self._calls: list[Any] = []
        self.subscribed: list[threading.Event] = []

    def end(self, failure: errors.VirtletError | None) -> None:
        """Stop every subscription; the first failure is the one the kubelet sees."""
        with self._lock:
            if self.failure is None and not self.stop.is_set():
                self.failure = failure
            self.stop.set()
            calls, self._calls = self._calls, []
        for call in calls:
            call.cancel()
        try:
            self.events.put_nowait(None)  # wake the sender (a full queue means it is not waiting anyway)
        except queue.Full:
            pass

    def started(self, call: Any) -> bool:
        with self._lock:
            if self.stop.is_set():
                call.cancel()
                return False
            self._calls.append(call)
            return True

    def put(self, event: api.ContainerEventResponse) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:
            self.end(errors.ResourceExhausted(
                f"GetContainerEvents: the client fell {QUEUE_SIZE} events behind and the proxy does not buffer "
                "more; subscribe again and relist"))

    def pump(self, backend: Backend, first: Any, subscribed: threading.Event) -> None:
        """Relay ``backend``'s events (``first`` is its subscription, or None when it was down at start)."""
        call = first
        if call is not None:
            try:
                call.initial_metadata()  # the backend's headers: it is subscribed (or the call failed)
            except grpc.RpcError:
                pass
        subscribed.set()
        while call is None:  # down at start: wait for it to come back, then end the stream (a gap)
            if self.stop.wait(EVENT_RETRY_S):
                return
            try:
                backend.version(EVENT_RETRY_S)
            except errors.VirtletError:
                continue
            self.end(BackendError(grpc.StatusCode.UNAVAILABLE, (
                f"{display(backend.name)} at {backend.address} answers again; its events while it was down are "
                "unknown: relist and subscribe again")))
            return
        try:
            for event in call:
                rewrite.container_event(backend.name, event)
                self.put(event)
            err: errors.VirtletError = BackendError(
                grpc.StatusCode.UNAVAILABLE, f"{display(backend.name)} at {backend.address} ended its event stream")
        except grpc.RpcError as exc:
            err = _relayed(backend, exc)
        if not self.stop.is_set():
            log.info("GetContainerEvents: %s", err)
        self.end(err)


def _relayed(backend: Backend, exc: grpc.RpcError) -> errors.VirtletError:
    relayed = backend.relay(exc)
    if relayed.code == grpc.StatusCode.UNIMPLEMENTED:
        return BackendError(relayed.code, (
            f"{display(backend.name)} at {backend.address} has no container events (GetContainerEvents is "
            "UNIMPLEMENTED there), so this node's events would be incomplete: relist instead"))
    if relayed.code == grpc.StatusCode.CANCELLED and isinstance(exc, grpc.Call):
        return BackendError(grpc.StatusCode.UNAVAILABLE, f"{display(backend.name)}: event stream cancelled")
    return relayed


def merged_events(backends: Backends, request: api.GetEventsRequest,
                  context: grpc.ServicerContext) -> Iterator[api.ContainerEventResponse]:
    """The merged stream (see the module docstring for when and how it ends)."""
    if not _streams.acquire(blocking=False):
        raise errors.ResourceExhausted(
            f"GetContainerEvents: {MAX_STREAMS} streams are open through this proxy already; close one (or relist)")
    merge = _Merge()
    try:
        firsts: dict[str, Any] = {}
        for backend in backends.by_name.values():
            try:
                firsts[backend.name] = backend.stream(RT, "GetContainerEvents", request)
            except errors.VirtletError:  # the version probe failed: down
                if backend.name == PRIMARY:
                    raise
                log.info("GetContainerEvents: %s is down; the stream ends when it is back", display(backend.name))
                firsts[backend.name] = None
        for call in firsts.values():
            if call is not None:
                merge.started(call)
        context.add_callback(lambda: merge.end(None))
        for backend in backends.by_name.values():
            merge.subscribed.append(threading.Event())
            threading.Thread(target=merge.pump, args=(backend, firsts[backend.name], merge.subscribed[-1]),
                             daemon=True, name=f"events-{backend.name or 'primary'}").start()
    except BaseException:
        merge.end(None)
        _streams.release()
        raise
    return _send(merge, context)


def _send(merge: _Merge, context: grpc.ServicerContext) -> Iterator[api.ContainerEventResponse]:
    try:
        # Headers once every backend confirmed its subscription (bounded: a backend that sends headers only
        # with its first event does not hold the stream): a client that waits for them misses no event of a
        # change it makes afterwards, as with virtletd itself.
        deadline = time.monotonic() + HEADERS_WAIT_S
        for subscribed in merge.subscribed:
            subscribed.wait(max(0.0, deadline - time.monotonic()))
        context.send_initial_metadata(())
        while context.is_active():
            if merge.failure is not None:
                raise merge.failure
            if merge.stop.is_set():
                return
            try:
                event = merge.events.get(timeout=EVENT_RETRY_S)
            except queue.Empty:
                continue
            if event is not None and merge.failure is None:
                yield event
    finally:
        merge.end(None)
        _streams.release()
