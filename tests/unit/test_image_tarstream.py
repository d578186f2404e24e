"""The streaming tar reader of containerDisk layers (``virtlet.images.tarstream``) and the sink's outer hash:
archives written by Python's tarfile in every format a layer builder uses, hostile and truncated archives."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from virtlet.images.progress import ProgressLog
from virtlet.images.sink import HashingFileSink
from virtlet.images.tarstream import MAX_META, SPARSE, TarError, TarStream, _size

LONG = "disk/" + "a-very-long-directory-name/" * 5 + "disk.qcow2"  # > 100 bytes: pax path or GNU long name


def _tar(files: dict[str, bytes], fmt: int = tarfile.PAX_FORMAT, dirs: bool = True) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        if dirs:
            info = tarfile.TarInfo("disk")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("disk/link")
        link.type, link.linkname = tarfile.SYMTYPE, "../etc/passwd"
        tar.addfile(link)
    return out.getvalue()


def _read(data: bytes, chunk: int = 1 << 20) -> tuple[dict[str, bytes], bytes]:
    """Members with content, and the concatenation of what on_meta got and the content, in stream order."""
    src = io.BytesIO(data)
    stream: list[bytes] = []
    tar = TarStream(lambda v: src.readinto(v), stream.append)
    found: dict[str, bytes] = {}
    while (m := tar.next()) is not None:
        if m.isreg():
            buf = bytearray(chunk)
            parts = []
            while n := tar.readinto(memoryview(buf)):
                parts.append(bytes(buf[:n]))
            found[m.name] = b"".join(parts)
            stream.extend(parts)
    tar.drain()
    return found, b"".join(stream)


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_and_every_byte_in_order(fmt: int) -> None:
    disk = os.urandom(3 * 512 + 17)
    files = {"etc/before": b"x" * 700, "disk/disk.img": disk, "etc/after": os.urandom(100)}
    if fmt != tarfile.USTAR_FORMAT:
        files[LONG] = b"long"
    data = _tar(files, fmt)
    found, stream = _read(data, chunk=1000)
    assert found == files
    assert stream == data  # so a hash over on_meta + content is the blob's hash


def test_unread_content_is_skipped_and_still_seen() -> None:
    data = _tar({"big": os.urandom(3 << 20), "disk/d": b"d" * 10})
    src = io.BytesIO(data)
    seen: list[bytes] = []
    tar = TarStream(lambda v: src.readinto(v), seen.append)
    names = []
    while (m := tar.next()) is not None:
        names.append(m.name)
    tar.drain()
    assert names == ["disk/", "big", "disk/d", "disk/link"]
    assert b"".join(seen) == data


def test_ustar_prefix_and_base256_size() -> None:
    name = "disk/" + "p" * 120 + "/img"  # ustar splits it into prefix and name
    data = _tar({name: b"abc"}, tarfile.USTAR_FORMAT, dirs=False)
    assert _read(data)[0] == {name: b"abc"}
    assert _size(bytes([0x80]) + (9 << 30).to_bytes(11, "big")) == 9 << 30  # GNU base-256: 9 GiB
    with pytest.raises(TarError, match="negative"):
        _size(b"\xff" * 12)


def test_corrupt_header_truncated_member_and_huge_pax_are_refused() -> None:
    data = bytearray(_tar({"disk/d": b"d" * 2000}))
    bad = bytes(data[:600]) + b"Z" + bytes(data[601:])  # a byte of the second header (after the dir's)
    with pytest.raises(TarError, match="checksum"):
        _read(bad)
    good = bytes(data)
    first = good.index(b"d" * 100)
    with pytest.raises(TarError, match="ends"):
        _read(good[:first + 1000])  # cut inside the member
    with pytest.raises(TarError, match="ends inside a header"):
        _read(good[:700])
    huge = io.BytesIO()
    with tarfile.open(fileobj=huge, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("disk/d")
        info.pax_headers = {"comment": "c" * (MAX_META + 10)}
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(TarError, match="header of"):
        _read(huge.getvalue())


def test_not_a_tar() -> None:
    with pytest.raises(TarError):
        _read(os.urandom(4096))


def test_sink_outer_hash_covers_outer_only_and_outer_commits(tmp_path: Path) -> None:
    """The sink's third worker hashes, in order, ``outer_only`` bytes and ``commit(outer=True)`` bytes; the image
    hash covers only commits; ``outer_digest`` resets for the next blob."""
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    sink = HashingFileSink(fd, ProgressLog("test", 3600), "test")
    try:
        sink.track_outer()
        assert 0 < sink._outer_q.maxsize <= 64  # type: ignore[union-attr]  # copies never pile up in memory
        head, body, tail = os.urandom(512), os.urandom(3 << 20), os.urandom(1000)
        sink.outer_only(head)
        for off in range(0, len(body), 1 << 20):
            part = body[off:off + (1 << 20)]
            with sink.buffer() as view:
                view[:len(part)] = part
            sink.commit(len(part), outer=True)
        sink.outer_only(tail)
        assert sink.outer_digest() == hashlib.sha256(head + body + tail).hexdigest()
        with sink.buffer() as view:  # a compressed layer's disk bytes: not part of the blob
            view[:3] = b"xyz"
        sink.commit(3)
        sink.outer_only(b"blob2")
        assert sink.outer_digest() == hashlib.sha256(b"blob2").hexdigest()
        assert sink.finish() == hashlib.sha256(body + b"xyz").hexdigest()
    finally:
        os.close(fd)
    assert (tmp_path / "out").read_bytes() == body + b"xyz"


def test_pax_sparse_member_is_reported_sparse() -> None:
    """GNU tar's pax sparse format stores a map before the data: reading it as the file would corrupt the disk."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("disk/d")
        info.size, info.pax_headers = 3, {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}
        tar.addfile(info, io.BytesIO(b"abc"))
    src = io.BytesIO(out.getvalue())
    tar_ = TarStream(lambda v: src.readinto(v), lambda _b: None)
    member = tar_.next()
    assert member is not None and member.type == SPARSE and not member.isreg()
