"""Batches of the Stream* list calls: whole items, under the byte budget, one empty batch for an empty list."""

from __future__ import annotations

from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.stream_lists import batches


def test_batches_cut_by_encoded_size() -> None:
    items = [api.PodSandbox(id=f"{i:064x}") for i in range(10)]
    size = items[0].ByteSize()
    got = list(batches(items, limit=3 * size))
    assert [len(b) for b in got] == [3, 3, 3, 1]
    assert [i for b in got for i in b] == items


def test_oversized_item_goes_alone_and_empty_list_is_one_batch() -> None:
    big = api.PodSandbox(id="x" * 100)
    assert list(batches([big, big], limit=10)) == [[big], [big]]
    assert list(batches([], limit=10)) == [[]]
