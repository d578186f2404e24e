"""The Stream* list calls through a running virtletd (libvirt's test driver, real CNI): the same items as the
List* twins, in batches; filters and errors are the List* call's."""

from __future__ import annotations

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.integration.test_daemon_sandbox import _run
from virtlet.cri.gen import api_pb2 as api


def test_stream_lists_match_list_calls(virtletd: VirtletdProcess) -> None:
    rt = virtletd.runtime()
    ids = {_run(rt, name=f"pod{i}", uid=f"uid-{i}") for i in range(3)}
    try:
        chunks = list(rt.StreamPodSandboxes(api.StreamPodSandboxesRequest(), timeout=30))
        assert {s.id for c in chunks for s in c.pod_sandboxes} == ids
        listed = rt.ListPodSandbox(api.ListPodSandboxRequest(), timeout=30).items
        assert [s for c in chunks for s in c.pod_sandboxes] == list(listed)

        one = next(iter(ids))
        flt = api.PodSandboxFilter(id=one)
        [only] = list(rt.StreamPodSandboxes(api.StreamPodSandboxesRequest(filter=flt), timeout=30))
        assert [s.id for s in only.pod_sandboxes] == [one]

        stats = list(rt.StreamPodSandboxStats(api.StreamPodSandboxStatsRequest(), timeout=30))
        assert {s.attributes.id for c in stats for s in c.pod_sandbox_stats} == ids
        metrics = list(rt.StreamPodSandboxMetrics(api.StreamPodSandboxMetricsRequest(), timeout=30))
        assert {m.pod_sandbox_id for c in metrics for m in c.pod_sandbox_metrics} == ids

        # nothing to list: one empty message, not a stream that ends with nothing
        [empty] = list(rt.StreamContainers(api.StreamContainersRequest(), timeout=30))
        assert list(empty.containers) == []
        [no_stats] = list(rt.StreamContainerStats(api.StreamContainerStatsRequest(), timeout=30))
        assert list(no_stats.container_stats) == []
        images = list(virtletd.image().StreamImages(api.StreamImagesRequest(), timeout=30))
        assert len(images) == 1 and list(images[0].images) == []

        bad = api.PodSandboxFilter(label_selector={"bad key!": "x"})
        with pytest.raises(grpc.RpcError) as err:
            list(rt.StreamPodSandboxes(api.StreamPodSandboxesRequest(filter=bad), timeout=30))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        for sid in ids:
            rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=120)
            rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=120)
