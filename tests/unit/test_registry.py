"""Registry references, credentials, the node's registry config, platform choice and the plain-HTTP rule."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from virtlet import errors
from virtlet.images import containerdisk, registry_config
from virtlet.images.policy import SourcePolicy
from virtlet.images.registry import Credentials, HostConfig, Reference, RegistryClient, parse_reference


@pytest.mark.parametrize("text, ref", [
    ("r.example/vm/debian:12", Reference("r.example", "vm/debian", "12", None)),
    ("r.example:5000/debian", Reference("r.example:5000", "debian", "latest", None)),
    ("127.0.0.1:5000/a/b@sha256:" + "a" * 64, Reference("127.0.0.1:5000", "a/b", None, "sha256:" + "a" * 64)),
    ("h/x:t@sha256:" + "b" * 64, Reference("h", "x", "t", "sha256:" + "b" * 64)),
])
def test_parse_reference(text: str, ref: Reference) -> None:
    assert parse_reference(text, "t") == ref
    assert str(ref).startswith(ref.name)


@pytest.mark.parametrize("text", ["debian", "h/UPPER", "h/a b", "h/x@sha256:12", "h/x:" + "t" * 200, "h//x",
                                  "h/x:-bad", "h:99999999/x"])
def test_bad_reference_is_invalid_argument(text: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="registry reference"):
        parse_reference(text, "t")


def test_credentials_hide_secrets_and_decode_auth() -> None:
    c = Credentials.build(auth=base64.b64encode(b"bob:pa:ss").decode())
    assert c is not None and (c.username, c.password) == ("bob", "pa:ss")
    assert "pa:ss" not in repr(c) and "pa:ss" not in str(c)
    assert Credentials.build() is None
    with pytest.raises(errors.InvalidArgument) as exc:
        Credentials.build(auth="not base64 secret!")
    assert "secret" not in str(exc.value)
    assert Credentials.build("u", "p").key() != Credentials.build("u", "q").key()  # type: ignore[union-attr]


def test_plain_http_only_for_loopback_and_insecure() -> None:
    def base(host: str, cfg: HostConfig | None = None) -> str:
        return RegistryClient(parse_reference(f"{host}/x", "t"), None, cfg or HostConfig(), SourcePolicy(),
                              False).base

    assert base("127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert base("localhost:5000") == "http://localhost:5000"
    assert base("r.example") == "https://r.example"
    assert base("10.0.0.1:5000") == "https://10.0.0.1:5000"
    assert base("build.lan:5000", HostConfig(insecure=True)) == "http://build.lan:5000"


def test_registry_config(tmp_path: Path) -> None:
    path = tmp_path / "registries.yaml"
    cfg = registry_config.RegistryConfig(path)
    assert cfg.lookup("r.example") == HostConfig()  # no file: nothing configured
    path.write_text("registries:\n  r.example:\n    auth: {username: u, password: topsecret}\n"
                    "  lan:5000: {insecure: true}\n")
    host = cfg.lookup("r.example")
    assert host.configured and host.credentials == Credentials("u", "topsecret")
    assert cfg.lookup("lan:5000").insecure and not cfg.lookup("other").configured
    path.write_text("registries:\n  r.example:\n    auth: {username: u, passwd: topsecret}\n")
    with pytest.raises(errors.FailedPrecondition, match=r"registries.r.example.auth") as exc:
        cfg.lookup("r.example")
    assert "topsecret" not in str(exc.value)


def test_registry_config_mirrors() -> None:
    hosts = registry_config.parse({"registries": {"r.example": {"mirrors": ["m1.lan:5000", "m2.lan"]}}})
    assert hosts["r.example"].mirrors == ("m1.lan:5000", "m2.lan")
    for bad in ("m1.lan", ["https://m1.lan"], ["m1.lan/path"], [1], [f"m{i}" for i in range(9)]):
        with pytest.raises(ValueError, match=r"registries.r.example.mirrors"):
            registry_config.parse({"registries": {"r.example": {"mirrors": bad}}})


def test_platform_choice() -> None:
    entries = [{"digest": "sha256:" + "1" * 64, "platform": {"os": "linux", "architecture": "arm64"}},
               {"digest": "sha256:" + "2" * 64, "platform": {"os": "linux", "architecture": "amd64"}}]
    assert containerdisk._platform(entries, "t") == "sha256:" + "2" * 64
    with pytest.raises(errors.NotFound, match="linux/arm64"):
        containerdisk._platform(entries[:1], "t")


def test_container_disk_id_cannot_be_an_http_image(tmp_path: Path) -> None:
    """A registry image's id is derived from its layer digest and compression; the only file whose sha256 it is
    would be that text, which validation refuses, so no HTTP pull can store other bytes under the id."""
    from virtlet.images import validate

    digest = "sha256:" + "ab" * 32
    ids = {containerdisk.image_id(containerdisk.Layer(digest, 1, mt)) for mt in (
        "application/vnd.oci.image.layer.v1.tar", "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd")}
    assert len(ids) == 3
    assert containerdisk.image_id(containerdisk.Layer(digest, 1, "application/vnd.docker.image.rootfs.diff.tar")) \
        in ids  # Docker's plain tar and OCI's decode alike
    for kind in ("tar", "gzip", "zstd"):
        text = f"virtlet containerDisk v1 {kind} {digest}".encode()
        assert "sha256:" + hashlib.sha256(text).hexdigest() in ids
        (tmp_path / kind).write_bytes(text)
        with pytest.raises(errors.InvalidArgument, match="text"):
            validate.inspect(tmp_path / kind)
