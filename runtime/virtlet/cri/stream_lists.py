"""The ``Stream*`` list calls: the same answers as their ``List*`` twins, sent as a server stream of batches, so
a node with more pods than fit one 16 MiB message can still be listed.

Decision: each response message carries whole items up to ``CHUNK_BYTES`` of encoded items (an item larger than
that goes alone); the stream ends after the last batch; an empty list is one empty message (a client sees the
call answered, not a stream that ended with nothing).  Filters, validation and errors are the ``List*`` call's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from virtlet.cri.gen import api_pb2 as api

CHUNK_BYTES = 4 * 1024 * 1024

_Item = TypeVar("_Item")


def batches(items: Sequence[_Item], limit: int = CHUNK_BYTES) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    size = 0
    for item in items:
        n = item.ByteSize()  # type: ignore[attr-defined]
        if batch and size + n > limit:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    yield batch  # the last one, or the one empty batch of an empty list


def stream(items: Sequence[_Item], make: Callable[[list[_Item]], Any]) -> Iterable[Any]:
    return (make(b) for b in batches(items))


class StreamListCalls:
    """The RuntimeService ``Stream*`` calls, mixed into ``RuntimeServicer`` (which has the ``List*`` calls)."""

    ListPodSandbox: Callable[[api.ListPodSandboxRequest, grpc.ServicerContext], api.ListPodSandboxResponse]
    ListContainers: Callable[[api.ListContainersRequest, grpc.ServicerContext], api.ListContainersResponse]
    ListContainerStats: Callable[[api.ListContainerStatsRequest, grpc.ServicerContext],
                                 api.ListContainerStatsResponse]
    ListPodSandboxStats: Callable[[api.ListPodSandboxStatsRequest, grpc.ServicerContext],
                                  api.ListPodSandboxStatsResponse]
    ListPodSandboxMetrics: Callable[[api.ListPodSandboxMetricsRequest, grpc.ServicerContext],
                                    api.ListPodSandboxMetricsResponse]

    def StreamPodSandboxes(self, request: api.StreamPodSandboxesRequest,
                           context: grpc.ServicerContext) -> Iterable[api.StreamPodSandboxesResponse]:
        items = self.ListPodSandbox(api.ListPodSandboxRequest(filter=request.filter), context).items
        return stream(items, lambda b: api.StreamPodSandboxesResponse(pod_sandboxes=b))

    def StreamContainers(self, request: api.StreamContainersRequest,
                         context: grpc.ServicerContext) -> Iterable[api.StreamContainersResponse]:
        items = self.ListContainers(api.ListContainersRequest(filter=request.filter), context).containers
        return stream(items, lambda b: api.StreamContainersResponse(containers=b))

    def StreamContainerStats(self, request: api.StreamContainerStatsRequest,
                             context: grpc.ServicerContext) -> Iterable[api.StreamContainerStatsResponse]:
        items = self.ListContainerStats(api.ListContainerStatsRequest(filter=request.filter), context).stats
        return stream(items, lambda b: api.StreamContainerStatsResponse(container_stats=b))

    def StreamPodSandboxStats(self, request: api.StreamPodSandboxStatsRequest,
                              context: grpc.ServicerContext) -> Iterable[api.StreamPodSandboxStatsResponse]:
        items = self.ListPodSandboxStats(api.ListPodSandboxStatsRequest(filter=request.filter), context).stats
        return stream(items, lambda b: api.StreamPodSandboxStatsResponse(pod_sandbox_stats=b))

    def StreamPodSandboxMetrics(self, request: api.StreamPodSandboxMetricsRequest,
                                context: grpc.ServicerContext) -> Iterable[api.StreamPodSandboxMetricsResponse]:
        items = self.ListPodSandboxMetrics(api.ListPodSandboxMetricsRequest(), context).pod_metrics
        return stream(items, lambda b: api.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=b))
