"""GetContainerEvents through the proxy: the event streams of all backends merged into one."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy import rewrite
from virtlet.proxy.backends import Backend, Backends
from virtlet.proxy.dispatch import RT
from virtlet.proxy.naming import display

log = logging.getLogger("virtlet.proxy")

EVENT_RETRY_S = 1.0


def merged_events(backends: Backends, request: api.GetEventsRequest,
                  context: grpc.ServicerContext) -> Iterator[api.ContainerEventResponse]:
    """Merges the event streams of all backends; a backend whose stream breaks is re-subscribed every
    second until the kubelet goes away; one that does not implement events is left out."""
    events: queue.Queue[api.ContainerEventResponse] = queue.Queue()
    stop = threading.Event()
    calls: list[Any] = []
    lock = threading.Lock()

    def pump(backend: Backend) -> None:
        while not stop.is_set():
            try:
                call = backend.stream(RT, "GetContainerEvents", request)
                with lock:
                    calls.append(call)
                if stop.is_set():
                    call.cancel()
                for event in call:
                    rewrite.container_event(backend.name, event)
                    events.put(event)
            except grpc.RpcError as exc:
                if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.info("%s does not implement GetContainerEvents", display(backend.name))
                    return
            except errors.VirtletError:
                pass
            stop.wait(EVENT_RETRY_S)

    def finish() -> None:
        stop.set()
        with lock:
            for call in calls:
                call.cancel()

    context.add_callback(finish)
    threads = [threading.Thread(target=pump, args=(b,), daemon=True, name=f"events-{b.name or 'primary'}")
               for b in backends.by_name.values()]
    for t in threads:
        t.start()
    try:
        while context.is_active():
            try:
                yield events.get(timeout=EVENT_RETRY_S)
            except queue.Empty:
                continue
    finally:
        finish()
