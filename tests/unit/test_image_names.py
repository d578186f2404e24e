"""Image name normalisation: prefix and tags dropped, ports kept, digests pinned."""

import pytest

from virtlet import errors
from virtlet.images import names
from virtlet.images.names import ImageName


@pytest.mark.parametrize(("raw", "want"), [
    ("example.com/img.qcow2", ImageName("example.com/img.qcow2")),
    ("virtlet.cloud/example.com/img.qcow2", ImageName("example.com/img.qcow2")),
    ("example.com/img.qcow2:latest", ImageName("example.com/img.qcow2")),
    ("example.com:8080/a/img", ImageName("example.com:8080/a/img")),
    ("example.com:8080/a/img:v1", ImageName("example.com:8080/a/img")),
    ("cirros:latest", ImageName("cirros")),
    ("host:8080", ImageName("host:8080")),
    ("h/a%20b?x=1&y=2", ImageName("h/a%20b?x=1&y=2")),
    ("h/a..b/.c/d.", ImageName("h/a..b/.c/d.")),
    ("example.com/img@sha256:" + "a" * 64, ImageName("example.com/img", "sha256:" + "a" * 64)),
    ("example.com/img:tag@sha256:" + "b" * 64, ImageName("example.com/img", "sha256:" + "b" * 64)),
])
def test_parse(raw: str, want: ImageName) -> None:
    assert names.parse(raw) == want


@pytest.mark.parametrize("raw", ["", "   ", "a b/c", "example.com/img@sha256:xyz",
                                 "example.com/img@md5:" + "a" * 32, "a[b/c", "[::1]:80/x", "h:99999/x",
                                 "h:0/x", "h:abc/x", "h:99999", "a\0b/c", "ü.example/x", "a/" + "b" * 1100,
                                 "h/../x", "h/./x", "h/%2E%2e/x", "h/%g0", "u@h/x", "h/a#b", "h/a\\b",
                                 "h:1:2/x", "h/\u00b2"])
def test_parse_rejects(raw: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="image"):
        names.parse(raw)


def test_digest_of() -> None:
    h = "c" * 64
    assert names.digest_of(h) == names.digest_of(f"sha256:{h}") == f"sha256:{h}"
    assert names.digest_of("example.com/img") is None
    assert names.digest_of(f"example.com/img@sha256:{h}") is None
