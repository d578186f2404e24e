"""Registry hosts through the real virtletd over gRPC: mirrors tried in order with fallback to the registry
itself, and a registry on TLS with a CA the test made (the registries config's ``ca``).  Three real
``docker-registry`` instances on loopback: the origin, an empty mirror and a TLS mirror holding another disk."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.helpers.registry import REGISTRY_BIN, Pusher, Registry, make_tls
from tests.integration.conftest import NetnsGuard, running_virtletd
from virtlet.cri.gen import api_pb2 as api

pytestmark = pytest.mark.skipif(not os.path.exists(REGISTRY_BIN), reason="docker-registry is not installed")


@pytest.fixture
def registries(world_dir: Path, tiny_image: Path) -> Iterator[tuple[Registry, Registry, Registry, Path, Path]]:
    base = world_dir / "registries"
    ca, cert, key = make_tls(base / "tls")
    other_ca, _, _ = make_tls(base / "tls-other", "other")
    other_disk = base / "other.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(other_disk), "8M"], check=True)
    with Registry(base / "origin") as origin, Registry(base / "empty") as empty, \
            Registry(base / "tls", tls=(cert, key)) as secure:
        Pusher(origin.host).container_disk("vm/tiny", "v1", tiny_image)
        Pusher(secure.host, ca=ca).container_disk("vm/tiny", "v1", other_disk)
        yield origin, empty, secure, ca, other_ca


def _pull(daemon: object, name: str) -> str:
    req = api.PullImageRequest(image=api.ImageSpec(image=name, runtime_handler="virtlet"))
    return str(daemon.image().PullImage(req, timeout=300).image_ref)  # type: ignore[attr-defined]


def _config(path: Path, text: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.rename(path)  # a new inode: virtletd re-reads it


def _indent(pem: Path) -> str:
    return "".join(f"      {line}\n" for line in pem.read_text().splitlines())


def test_mirrors_in_order_with_fallback_and_a_custom_ca(
        world_dir: Path, netns_guard: NetnsGuard, loopback_cni: Path, tiny_image: Path,
        registries: tuple[Registry, Registry, Registry, Path, Path]) -> None:
    origin, empty, secure, ca, other_ca = registries
    tiny_id, other_id = origin.disk_image_id("vm/tiny:v1"), secure.disk_image_id("vm/tiny:v1")
    config = world_dir / "registries.yaml"
    _config(config, f"registries:\n  '{origin.host}':\n    mirrors: ['{empty.host}']\n")
    with running_virtletd(world_dir, netns_guard, loopback_cni, [
            "--libvirt-uri", "test:///default", "--kvm", "off", "--image-registries-config", str(config)]) as daemon:
        # the mirror lacks the image: the origin serves it
        assert _pull(daemon, f"{origin.host}/vm/tiny:v1") == tiny_id
        assert f"mirror {empty.host}" in daemon.log()

        # a TLS mirror with the CA the test made, after the empty one: the mirror serves (another disk)
        _config(config, f"registries:\n  '{origin.host}':\n    mirrors: ['{empty.host}', '{secure.host}']\n"
                        f"  '{secure.host}':\n    ca: |\n{_indent(ca)}")
        assert _pull(daemon, f"{origin.host}/vm/tiny:v1") == other_id
        assert _pull(daemon, f"{secure.host}/vm/tiny:v1") == other_id  # the TLS registry itself, by its CA

        # a CA that did not sign the registry's certificate: refused, and the mirror falls back to the origin
        _config(config, f"registries:\n  '{origin.host}':\n    mirrors: ['{secure.host}']\n"
                        f"  '{secure.host}':\n    ca: |\n{_indent(other_ca)}")
        with pytest.raises(grpc.RpcError) as exc:
            _pull(daemon, f"{secure.host}/vm/tiny:v1")
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION, exc.value.details()
        assert secure.host in exc.value.details()
        assert _pull(daemon, f"{origin.host}/vm/tiny:v1") == tiny_id

        # a malformed mirrors entry fails registry pulls with the key named
        _config(config, f"registries:\n  '{origin.host}':\n    mirrors: 'not-a-list'\n")
        with pytest.raises(grpc.RpcError) as exc:
            _pull(daemon, f"{origin.host}/vm/tiny:v1")
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "mirrors" in exc.value.details()


def test_zstd_layer(world_dir: Path, netns_guard: NetnsGuard, loopback_cni: Path, tiny_image: Path) -> None:
    """A containerDisk whose layer is zstd-compressed (``+zstd``, what newer build tools publish) is pulled."""
    pytest.importorskip("zstandard", reason="zstandard (a project dependency) is not installed")
    config = world_dir / "registries.yaml"
    (world_dir / "zstd-registry").mkdir()
    with Registry(world_dir / "zstd-registry") as reg:
        digest = Pusher(reg.host).container_disk("vm/tiny", "zstd", tiny_image, zstd=True)
        _config(config, f"registries:\n  '{reg.host}': {{}}\n")
        with running_virtletd(world_dir, netns_guard, loopback_cni, [
                "--libvirt-uri", "test:///default", "--kvm", "off", "--image-registries-config",
                str(config)]) as daemon:
            image_id = _pull(daemon, f"{reg.host}/vm/tiny:zstd")
            assert image_id == reg.disk_image_id(digest)
            stored = world_dir / "images" / "data" / image_id.removeprefix("sha256:")
            assert stored.read_bytes() == tiny_image.read_bytes()
            listed = daemon.image().ListImages(api.ListImagesRequest()).images
            assert [list(i.repo_digests) for i in listed] == [[f"{reg.host}/vm/tiny@{digest}"]]
