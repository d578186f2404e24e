"""The image source policy: deny/allow decisions, and that a checked name is connected to by the checked
address (one lookup per hop, so a DNS answer that changes between check and connect is never used)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.http_server import ImageHttpServer
from virtlet import errors
from virtlet.images.fetch import FetchInfo, HttpFetcher
from virtlet.images.policy import SourcePolicy
from virtlet.images.translate import DEFAULT_PROFILE, Source


@pytest.mark.parametrize("address", ["127.0.0.1", "127.255.0.9", "::1", "169.254.169.254", "169.254.1.1",
                                     "fe80::1", "0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:169.254.169.254"])
def test_denied_by_default(address: str) -> None:
    assert SourcePolicy().denied(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "10.1.2.3", "192.168.0.1", "2001:db8::1", "fe00::1"])
def test_allowed_by_default(address: str) -> None:
    assert SourcePolicy().denied(ipaddress.ip_address(address)) is None


def test_allow_list_overrides() -> None:
    p = SourcePolicy.build(allow=["127.0.0.0/8", "169.254.10.0/24"])
    assert p.denied(ipaddress.ip_address("127.0.0.1")) is None
    assert p.denied(ipaddress.ip_address("169.254.10.9")) is None
    assert "metadata" in str(p.denied(ipaddress.ip_address("169.254.169.254")))
    assert p.denied(ipaddress.ip_address("::1")) is not None


def test_one_denied_address_refuses_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(host: str, port: int, *a: Any, **kw: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    with pytest.raises(errors.PermissionDenied, match="169.254.169.254"):
        SourcePolicy().resolve("two.example", 80, "image 'x'")


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self._buf = bytearray(1 << 16)

    def expect(self, total: int | None) -> None:
        pass

    def write(self, data: memoryview) -> None:
        self.data += data

    def buffer(self) -> memoryview:
        return memoryview(self._buf)

    def commit(self, n: int) -> None:
        self.data += self._buf[:n]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ImageHttpServer]:
    (tmp_path / "img").write_bytes(b"\0" * 1000)
    with ImageHttpServer(tmp_path) as srv:
        yield srv


def test_connects_to_the_checked_address(server: ImageHttpServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the first answer passes the check, any later one would point at the metadata address;
    the download must use the first."""
    answers = iter(["127.0.0.1"])
    lookups: list[str] = []
    real = socket.getaddrinfo

    def rebinding(host: str, port: int, *a: Any, **kw: Any) -> Any:
        if host != "rebind.test":
            return real(host, port, *a, **kw)
        lookups.append(host)
        ip = next(answers, "169.254.169.254")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    fetcher = HttpFetcher(SourcePolicy.build(allow=["127.0.0.0/8"]))
    sink = _Sink()
    info = fetcher.fetch(Source("x", f"http://rebind.test:{server.port}/files/img", DEFAULT_PROFILE, "test"),
                         sink)
    assert info == FetchInfo(f"http://rebind.test:{server.port}/files/img", "application/octet-stream")
    assert bytes(sink.data) == b"\0" * 1000
    assert lookups == ["rebind.test"]  # looked up once; the connection used that answer


def test_trusted_source_is_not_checked(server: ImageHttpServer) -> None:
    fetcher = HttpFetcher(SourcePolicy())
    src = Source("x", server.url("files/img"), DEFAULT_PROFILE, "test")
    with pytest.raises(errors.PermissionDenied):
        fetcher.fetch(src, _Sink())
    fetcher.fetch(Source("x", server.url("files/img"), DEFAULT_PROFILE, "test", trusted=True), _Sink())
