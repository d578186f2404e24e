"""The image source policy and image-name hardening through the CRI ImageService of a running virtletd.

Every test talks gRPC to a real virtletd (libvirt's test driver) that pulls from real HTTP(S) servers on
127.0.0.1.  Loopback is on the default deny list, so these servers stand in for "an internal address a pod
author should not reach"; ``--image-source-allow 127.0.0.0/8`` makes them ordinary image servers again.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.helpers.daemon import VirtletdProcess
from tests.helpers.http_server import ImageHttpServer, make_pki
from tests.integration.conftest import NetnsGuard, running_virtletd
from virtlet.cri.gen import api_pb2 as api

ALLOW_LOOPBACK = ["--image-source-allow", "127.0.0.0/8"]
Start = Callable[..., VirtletdProcess]


@pytest.fixture
def start(world_dir: Path, loopback_cni: Path, netns_guard: NetnsGuard) -> Iterator[Start]:
    """``start(*flags)``: a virtletd (test driver, loopback-only CNI) with these extra flags."""
    with contextlib.ExitStack() as stack:
        def run(*flags: str) -> VirtletdProcess:
            (world_dir / "translations").mkdir(exist_ok=True)
            return stack.enter_context(running_virtletd(
                world_dir, netns_guard, loopback_cni,
                ["--libvirt-uri", "test:///default", "--kvm", "off", "--image-default-scheme", "http", *flags]))
        yield run


@pytest.fixture
def qcow2(image_server: Any) -> str:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image_server.root / "a.qcow2"), "16M"],
                   check=True)
    return "a.qcow2"


def pull(daemon: VirtletdProcess, name: str, timeout: float = 60) -> str:
    return str(daemon.image().PullImage(api.PullImageRequest(image=api.ImageSpec(image=name)),
                                        timeout=timeout).image_ref)


def refused(daemon: VirtletdProcess, name: str, code: grpc.StatusCode, *fragments: str,
            within: float | None = None) -> str:
    data, tmp = daemon.base / "images" / "data", daemon.base / "images" / "tmp"
    before = sorted(data.iterdir()) if data.exists() else []
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        pull(daemon, name)
    took = time.monotonic() - t0
    err: Any = info.value
    assert err.code() == code, f"{name!r}: {err.code()} {err.details()}"
    for f in fragments:
        assert f in err.details(), err.details()
    if within is not None:
        assert took < within, f"{name!r} took {took:.2f} s"
    assert sorted(data.iterdir()) == before, "a refused pull changed the store"
    assert list(tmp.iterdir()) == [], "a refused pull left a partial download"
    return str(err.details())


def translate(daemon: VirtletdProcess, entries: dict[str, str], **transport: Any) -> None:
    doc: dict[str, Any] = {"translations": [
        {"name": n, "url": u, **({"transport": "t"} if transport else {})} for n, u in entries.items()]}
    if transport:
        doc["transports"] = {"t": transport}
    (daemon.base / "translations" / "t.yaml").write_text(yaml.safe_dump(doc))


# -- names ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "fragment"), [
    ("example.com/a[b.img", "'['"),
    ("example.com:99999/img", "port"),
    ("example.com:abc/img", "port"),
    ("example.com/a\0b", "'\\x00'"),
    ("exämple.com/img", "'ä'"),
    ("example.com/a b", "' '"),
    ("example.com/" + "a" * 5000, "longer than 1024"),
    ("example.com/img@sha256:1234", "sha256:<64"),
    ("example.com/img@", "sha256:<64"),
    ("example.com/../etc/passwd", "'..'"),
    ("example.com/%2e%2e/x", "'..'"),
    ("user@example.com/img", "sha256:<64"),
    ("example.com/%zz", "%XX"),
    ("example.com/#frag", "'#'"),
])
def test_bad_names_are_invalid_argument(start: Start, name: str, fragment: str) -> None:
    daemon = start()
    refused(daemon, name, grpc.StatusCode.INVALID_ARGUMENT, "image name", fragment, within=1.0)
    img = daemon.image()  # the other image calls answer, without INTERNAL
    assert not img.ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=name)), timeout=5).HasField("image")
    img.RemoveImage(api.RemoveImageRequest(image=api.ImageSpec(image=name)), timeout=5)
    img.ListImages(api.ListImagesRequest(filter=api.ImageFilter(image=api.ImageSpec(image=name))), timeout=5)


# -- untrusted addresses ------------------------------------------------------------------------------------

def test_untranslated_names_cannot_reach_denied_addresses(start: Start, image_server: Any, qcow2: str) -> None:
    daemon = start()
    port = image_server.port
    for name, address in ((image_server.name(f"files/{qcow2}"), "127.0.0.1"),
                          (f"localhost:{port}/files/{qcow2}", "127.0.0.1"),
                          (f"127.9.9.9:{port}/x", "127.9.9.9"),
                          ("169.254.169.254/latest/meta-data/iam", "169.254.169.254"),
                          (f"0.0.0.0:{port}/files/{qcow2}", "0.0.0.0")):
        msg = refused(daemon, name, grpc.StatusCode.PERMISSION_DENIED, f"resolves to {address}",
                      "image source policy", "image_source_allow", within=5.0)
        assert "translation" in msg
    assert image_server.count(f"files/{qcow2}") == 0  # not a single request reached the server


def test_allow_list_overrides_the_deny_list(start: Start, image_server: Any, qcow2: str) -> None:
    daemon = start("--image-source-allow", "10.0.0.0/8,127.0.0.1/32")
    assert pull(daemon, image_server.name(f"files/{qcow2}")).startswith("sha256:")
    refused(daemon, f"127.0.0.2:{image_server.port}/files/{qcow2}", grpc.StatusCode.PERMISSION_DENIED,
            "127.0.0.2")


def test_translation_is_trusted_but_its_redirects_are_checked(start: Start, image_server: Any,
                                                             qcow2: str) -> None:
    daemon = start()
    translate(daemon, {"trusted/a": image_server.url(f"files/{qcow2}"),
                       "trusted/redirected": image_server.url(f"redirect/{qcow2}"),
                       "trusted/metadata": image_server.url("goto?to=http://169.254.169.254/latest/")})
    assert pull(daemon, "trusted/a").startswith("sha256:")
    refused(daemon, "trusted/redirected", grpc.StatusCode.PERMISSION_DENIED, "resolves to 127.0.0.1",
            "a redirect")
    refused(daemon, "trusted/metadata", grpc.StatusCode.PERMISSION_DENIED, "169.254.169.254", within=5.0)
    assert image_server.count(f"files/{qcow2}") == 1  # the refused redirect was never followed


def test_regexp_that_lets_the_name_choose_the_host_is_not_trusted(start: Start, image_server: Any,
                                                                 qcow2: str) -> None:
    daemon = start()
    (daemon.base / "translations" / "any.yaml").write_text(
        "translations:\n  - regexp: 'any/(.*)'\n    url: 'http://$1'\n")
    refused(daemon, f"any/127.0.0.1:{image_server.port}/files/{qcow2}", grpc.StatusCode.PERMISSION_DENIED,
            "resolves to 127.0.0.1")


def test_https_to_http_redirect_refused(start: Start, world_dir: Path, image_server: Any, qcow2: str) -> None:
    pki = make_pki(world_dir / "pki")
    with ImageHttpServer(image_server.root, tls=pki) as tls_server:
        daemon = start(*ALLOW_LOOPBACK)
        translate(daemon, {
            "secure/a": tls_server.url(f"files/{qcow2}"),
            "secure/down": tls_server.url(f"goto?to={image_server.url('files/' + qcow2)}"),
            "secure/file": tls_server.url("goto?to=file:///etc/passwd")},
            tls={"certificates": [{"cert": pki.pem(pki.ca_cert)}]})
        assert pull(daemon, "secure/a").startswith("sha256:")
        refused(daemon, "secure/down", grpc.StatusCode.FAILED_PRECONDITION, "from https to http")
        refused(daemon, "secure/file", grpc.StatusCode.FAILED_PRECONDITION, "file:///etc/passwd",
                "only http and https")
    assert image_server.count(f"files/{qcow2}") == 0


# -- size and fallback --------------------------------------------------------------------------------------

def test_maximum_image_size(start: Start, image_server: Any) -> None:
    with open(image_server.root / "big.raw", "wb") as f:  # 8 MiB raw image with non-text content
        f.write(b"\x00\x01" * (4 << 20))
    daemon = start(*ALLOW_LOOPBACK, "--image-max-size", "1Mi")
    refused(daemon, image_server.name("files/big.raw"), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "maximum image size 1Mi", "Content-Length is 8388608", "image_max_size", within=5.0)
    refused(daemon, image_server.name("nolength/big.raw"), grpc.StatusCode.RESOURCE_EXHAUSTED,
            "maximum image size 1Mi", "passed 1048576 bytes and was stopped")
    with open(image_server.root / "small.raw", "wb") as f:
        f.write(b"\x00\x01" * (1 << 19))  # exactly 1 MiB: allowed
    assert pull(daemon, image_server.name("nolength/small.raw"))


def test_name_fallback_off(start: Start, image_server: Any, qcow2: str) -> None:
    daemon = start(*ALLOW_LOOPBACK, "--image-name-fallback", "false")
    translate(daemon, {"known/a": image_server.url(f"files/{qcow2}")})
    name = image_server.name(f"files/{qcow2}")
    refused(daemon, name, grpc.StatusCode.NOT_FOUND, "no image translation matches", repr(name),
            "image_name_fallback", within=1.0)
    assert pull(daemon, "virtlet.cloud/known/a:latest").startswith("sha256:")
