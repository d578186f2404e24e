"""The store with a fake fetcher (bytes from a dict): sharing, index, removal, start-up cleanup.

The real HTTP path is in tests/integration/test_image_pull.py.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.images import ImageStore
from virtlet.images.fetch import FetchInfo, Sink
from virtlet.images.translate import Source


class FakeFetcher:
    """Serves ``content[url]``; ``gate`` (when set) holds every fetch until released."""

    def __init__(self) -> None:
        self.content: dict[str, bytes] = {}
        self.calls: list[str] = []
        self.gate: threading.Event | None = None
        self.started = threading.Event()

    def fetch(self, source: Source, sink: Sink) -> FetchInfo:
        self.calls.append(source.url)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if source.url not in self.content:
            raise errors.NotFound(f"{source.url} answered 404")
        data = self.content[source.url]
        sink.expect(len(data))
        for off in range(0, len(data), 3 << 19):
            sink.write(memoryview(data)[off:off + (3 << 19)])
        return FetchInfo(source.url, "application/octet-stream")


def image_bytes(tmp_path: Path, fmt: str, size: str) -> bytes:
    p = tmp_path / f"img-{fmt}-{size}"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(p), size], check=True, timeout=60)
    return p.read_bytes()


@pytest.fixture
def fetcher(tmp_path: Path) -> FakeFetcher:
    f = FakeFetcher()
    f.content["http://h/q"] = image_bytes(tmp_path, "qcow2", "4M")
    f.content["http://h/r"] = image_bytes(tmp_path, "raw", "3M")
    return f


@pytest.fixture
def used() -> set[str]:
    return set()


@pytest.fixture
def store(tmp_path: Path, fetcher: FakeFetcher, used: set[str]) -> Iterator[ImageStore]:
    s = ImageStore(tmp_path / "images", tmp_path / "tr", "http", in_use=lambda: set(used),
                   fetchers={"http": fetcher})
    try:
        yield s
    finally:
        s.close()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_pull_indexes_and_status_forms(store: ImageStore, fetcher: FakeFetcher) -> None:
    rec = store.pull("virtlet.cloud/h/q:latest")
    assert rec.digest == sha(fetcher.content["http://h/q"]) and rec.names == ("h/q",)
    assert rec.size == len(fetcher.content["http://h/q"]) and rec.path.read_bytes() == fetcher.content["http://h/q"]
    hexd = rec.digest.removeprefix("sha256:")
    for ref in ("h/q", "h/q:v1", rec.digest, hexd, f"h/q@{rec.digest}", f"other/name@{rec.digest}"):
        assert store.status(ref) == rec, ref
    assert store.status("h/none") is None and store.status("sha256:" + "0" * 64) is None
    assert store.status("bad name") is None
    assert store.ref(rec, "h/q:latest") == f"h/q@{rec.digest}"


def test_list_filters(store: ImageStore) -> None:
    q, r = store.pull("h/q"), store.pull("h/r")
    assert [i.digest for i in store.list()] == [q.digest, r.digest]
    assert store.list(name="h/r") == [r]
    assert store.list(digest=q.digest) == [q] and store.list(digest=q.digest.removeprefix("sha256:")) == [q]
    assert store.list(name="h/r", digest=q.digest) == []


def test_two_names_one_digest(store: ImageStore, fetcher: FakeFetcher) -> None:
    fetcher.content["http://h/q2"] = fetcher.content["http://h/q"]
    a, b = store.pull("h/q"), store.pull("h/q2")
    assert a.digest == b.digest and b.names == ("h/q", "h/q2")
    assert len(list(store.data_dir.iterdir())) == 1


def test_concurrent_pulls_share_one_download(store: ImageStore, fetcher: FakeFetcher) -> None:
    fetcher.gate = threading.Event()
    results: list[object] = []

    def pull() -> None:
        try:
            results.append(store.pull("h/q").digest)
        except Exception as exc:
            results.append(exc)

    joined = threading.Semaphore(0)

    class Joins(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "joins the download" in record.getMessage():
                joined.release()

    handler = Joins()
    logger = logging.getLogger("virtlet.images.store")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        threads = [threading.Thread(target=pull) for _ in range(6)]
        threads[0].start()
        assert fetcher.started.wait(10)  # the leader is inside fetch, held by the gate
        for t in threads[1:]:
            t.start()
        for _ in threads[1:]:
            assert joined.acquire(timeout=10)  # every follower joined the leader's download
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    fetcher.gate.set()
    for t in threads:
        t.join(30)
    assert fetcher.calls == ["http://h/q"]
    assert results == [sha(fetcher.content["http://h/q"])] * 6


def test_shared_failure_reaches_every_waiter(store: ImageStore, fetcher: FakeFetcher) -> None:
    fetcher.gate = threading.Event()
    errs: list[BaseException] = []

    def pull() -> None:
        try:
            store.pull("h/missing")
        except errors.NotFound as exc:
            errs.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    assert fetcher.started.wait(10)
    fetcher.gate.set()
    for t in threads:
        t.join(30)
    assert len(errs) == 3 and store.list() == [] and list(store.tmp_dir.iterdir()) == []


def test_pinned_and_present_needs_no_download(store: ImageStore, fetcher: FakeFetcher) -> None:
    d = store.pull("h/q").digest
    store.pull(f"h/alias@{d}")
    assert fetcher.calls == ["http://h/q"]
    assert store.status("h/alias").digest == d  # type: ignore[union-attr]


def test_fallback_off_applies_to_pinned_names_too(tmp_path: Path, fetcher: FakeFetcher) -> None:
    from virtlet.images.policy import SourcePolicy

    s = ImageStore(tmp_path / "images", tmp_path / "tr", "http", fetchers={"http": fetcher},
                   policy=SourcePolicy(name_fallback=False))
    try:
        (tmp_path / "tr").mkdir()
        (tmp_path / "tr" / "t.yaml").write_text("translations:\n  - name: known\n    url: http://h/q\n")
        d = s.pull("known").digest
        with pytest.raises(errors.NotFound, match="no image translation matches"):
            s.pull(f"h/alias@{d}")
        assert s.status("h/alias") is None
    finally:
        s.close()


def test_pin_mismatch_leaves_nothing(store: ImageStore) -> None:
    with pytest.raises(errors.FailedPrecondition, match="not the pinned"):
        store.pull("h/q@sha256:" + "1" * 64)
    assert store.list() == [] and list(store.data_dir.iterdir()) == [] and list(store.tmp_dir.iterdir()) == []


def test_name_moves_to_new_content_and_old_data_goes(store: ImageStore, fetcher: FakeFetcher,
                                                     tmp_path: Path) -> None:
    old = store.pull("h/q")
    fetcher.content["http://h/q"] = image_bytes(tmp_path, "qcow2", "5M")
    new = store.pull("h/q")
    assert new.digest != old.digest and store.status(old.digest) is None and not old.path.exists()


def test_remove_is_idempotent_and_respects_in_use(store: ImageStore, used: set[str]) -> None:
    q = store.pull("h/q")
    used.add(q.digest)
    with pytest.raises(errors.FailedPrecondition, match="used by a container"):
        store.remove("h/q")
    kept = store.status("h/q")
    assert kept is not None and kept.names and q.path.exists()  # nothing removed
    used.clear()
    store.remove(q.digest)
    assert store.status(q.digest) is None and not q.path.exists()
    store.remove(q.digest)
    store.remove("h/never-pulled")


def test_cleanup_at_start(store: ImageStore, used: set[str]) -> None:
    q, r = store.pull("h/q"), store.pull("h/r")
    (store.tmp_dir / "abc.part").write_bytes(b"partial")
    (store.data_dir / ("f" * 64)).write_bytes(b"unindexed")
    used.add(r.digest)
    # nameless but in use (what an older virtletd's RemoveImage left): survives cleanup
    with sqlite3.connect(store.image_dir / "images.db") as db:
        db.execute("DELETE FROM names WHERE digest=?", (r.digest,))
    r_kept = store.status(r.digest)
    store.cleanup_at_start()
    assert list(store.tmp_dir.iterdir()) == []
    assert sorted(p.name for p in store.data_dir.iterdir()) == sorted(
        d.removeprefix("sha256:") for d in (q.digest, r.digest))
    assert store.status(r.digest) == r_kept
    used.clear()
    q.path.unlink()  # index row without data is forgotten
    store.cleanup_at_start()
    assert store.list() == [] and list(store.data_dir.iterdir()) == []


def test_fs_info(store: ImageStore) -> None:
    empty = store.fs_info()
    store.pull("h/r")
    info = store.fs_info()
    assert info.mountpoint and Path(info.mountpoint).is_dir()
    assert info.inodes_used == empty.inodes_used + 1 and info.used_bytes >= empty.used_bytes


def test_unknown_scheme_is_invalid_argument(store: ImageStore) -> None:
    tr = store.translator.directory
    tr.mkdir(exist_ok=True)
    (tr / "a.yaml").write_text("translations: [{name: x, url: 'https://h/x'}]\n")
    with pytest.raises(errors.InvalidArgument, match="only http and oci URLs"):
        store.pull("x")  # this store has only an http fetcher
