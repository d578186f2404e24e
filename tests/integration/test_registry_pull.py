"""Registry pulls through the real virtletd over gRPC, from a real registry (Debian's docker-registry,
distribution v2) on loopback: htpasswd Basic auth, a Bearer token server, containerDisk images pushed from the
project's tiny guest image (OCI and Docker manifests, an index), and the failure cases."""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from tests.helpers.registry import OCI_MANIFEST, REGISTRY_BIN, Pusher, Registry, TokenServer, basic
from tests.integration.conftest import NetnsGuard, running_virtletd
from virtlet.cri.gen import api_pb2 as api

pytestmark = pytest.mark.skipif(not os.path.exists(REGISTRY_BIN), reason="docker-registry is not installed")

USER, PASSWORD = "alice", "pw-Zq81-secret"
OTHER_PASSWORD = "pw-wrong-Xk2"


def _pull(daemon: VirtletdProcess, name: str, auth: api.AuthConfig | None = None) -> str:
    req = api.PullImageRequest(image=api.ImageSpec(image=name, runtime_handler="virtlet"), auth=auth)
    return str(daemon.image().PullImage(req, timeout=300).image_ref)


def _pull_error(daemon: VirtletdProcess, name: str, auth: api.AuthConfig | None = None) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        _pull(daemon, name, auth)
    return exc.value


def _nothing_stored(daemon: VirtletdProcess, world: Path) -> None:
    assert list(daemon.image().ListImages(api.ListImagesRequest()).images) == []
    assert list((world / "images" / "data").iterdir()) == []
    assert list((world / "images" / "tmp").iterdir()) == []


def _secret_free(world: Path, *secrets: str) -> None:
    """No secret in the daemon's log, state db or image store (the registry's own files are not ours)."""
    for path in [world / "virtletd.log", *(world / "state").rglob("*"), *(world / "images").rglob("*")]:
        if path.is_file() and path.stat().st_size < (64 << 20):
            data = path.read_bytes()
            for s in secrets:
                assert s.encode() not in data, f"secret found in {path}"
                assert base64.b64encode(f"{USER}:{s}".encode()) not in data, f"secret found in {path}"


@pytest.fixture
def tiny(tiny_image: Path) -> Path:
    return tiny_image


@pytest.fixture
def basic_registry(world_dir: Path, tiny: Path) -> Iterator[tuple[Registry, dict[str, str]]]:
    base = world_dir / "registry"
    base.mkdir()
    with Registry(base, users={USER: PASSWORD}) as reg:
        push = Pusher(reg.host, basic(USER, PASSWORD))
        digests = {"v1": push.container_disk("vm/tiny", "v1", tiny)}
        digests["plain"] = push.container_disk("vm/tiny", "plain", tiny, compress=False, docker=True)
        other = push.container_disk("vm/tiny", "arm", tiny, extra={"disk-not/x": b"x"})
        digests["multi"] = push.index("vm/tiny", "multi", {"linux/arm64": other, "linux/amd64": digests["v1"]})
        digests["broken"] = push.container_disk("vm/broken", "v1", tiny, extra={"etc/pad": os.urandom(4096)})
        yield reg, digests


def _daemon(world_dir: Path, netns_guard: NetnsGuard, loopback_cni: Path, registries: str,
            extra: list[str] | None = None) -> Any:
    config = world_dir / "registries.yaml"
    config.write_text(registries)
    config.chmod(0o600)
    return running_virtletd(world_dir, netns_guard, loopback_cni, [
        "--libvirt-uri", "test:///default", "--kvm", "off", "--image-registries-config", str(config),
        *(extra or [])])


def test_basic_auth_pull_cache_and_errors(world_dir: Path, netns_guard: NetnsGuard, loopback_cni: Path,
                                          basic_registry: tuple[Registry, dict[str, str]]) -> None:
    reg, digests = basic_registry
    ref = f"{reg.host}/vm/tiny"
    right = api.AuthConfig(username=USER, password=PASSWORD)
    with _daemon(world_dir, netns_guard, loopback_cni, f"registries:\n  '{reg.host}': {{}}\n") as daemon:
        err = _pull_error(daemon, f"{ref}:v1")
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        assert "requires a username and password" in err.details() and "imagePullSecret" in err.details()
        _nothing_stored(daemon, world_dir)
        wrong_auth = base64.b64encode(f"{USER}:{OTHER_PASSWORD}".encode()).decode()
        err = _pull_error(daemon, f"{ref}:v1", api.AuthConfig(auth=wrong_auth))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
        assert "authentication required" in err.details()  # the registry's own reason
        assert OTHER_PASSWORD not in err.details()
        _nothing_stored(daemon, world_dir)

        results: list[str] = []
        threads = [threading.Thread(target=lambda: results.append(_pull(daemon, f"{ref}:v1", right)))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(results)) == 1 and results[0].startswith("sha256:")  # the image id, as containerd
        image_id = results[0]
        assert image_id == reg.disk_image_id(digests["v1"])  # derived from the layer digest, not a 2nd hash
        assert daemon.log().count("pulling image") == 1  # three concurrent pulls, one download
        listed = daemon.image().ListImages(api.ListImagesRequest()).images
        assert [i.id for i in listed] == [image_id]
        assert list(listed[0].repo_tags) == [f"{ref}:v1"]
        assert list(listed[0].repo_digests) == [f"{ref}@{digests['v1']}"]
        status = daemon.image().ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=f"{ref}:v1")))
        assert status.image.id == image_id

        assert _pull(daemon, f"{ref}@{digests['v1']}") == image_id  # pinned and present: no registry call
        assert _pull(daemon, f"{ref}:v1", right) == image_id  # the manifest is asked for, no blob
        assert daemon.log().count("pulling image") == 1
        # an index: linux/amd64 is chosen; same manifest as v1 -> same image, nothing downloaded
        assert _pull(daemon, f"{ref}:multi", right) == image_id
        plain_id = _pull(daemon, f"{ref}:plain", right)  # Docker schema 2, uncompressed layer: another layer
        assert plain_id == reg.disk_image_id(digests["plain"]) != image_id
        assert daemon.log().count("pulling image") == 2
        plain = daemon.image().ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=plain_id))).image
        assert (world_dir / "images" / "data" / plain_id.removeprefix("sha256:")).read_bytes() == reg_tiny_bytes()
        assert plain.size == len(reg_tiny_bytes())

        err = _pull_error(daemon, f"{ref}@sha256:{'0' * 64}", right)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        err = _pull_error(daemon, f"{reg.host}/vm/nothing-here:v1", right)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        err = _pull_error(daemon, f"{reg.host}/Bad Name", right)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()

        manifest_layers = _truncate_layer(reg, "vm/broken", digests["broken"])
        assert manifest_layers
        before = {p.name for p in (world_dir / "images" / "data").iterdir()}
        err = _pull_error(daemon, f"{reg.host}/vm/broken:v1", right)
        assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION), err.details()
        assert "blob" in err.details() or "closed" in err.details(), err.details()
        assert {p.name for p in (world_dir / "images" / "data").iterdir()} == before
        assert list((world_dir / "images" / "tmp").iterdir()) == []
    _secret_free(world_dir, PASSWORD, OTHER_PASSWORD)


_TINY: bytes | None = None


def reg_tiny_bytes() -> bytes:
    global _TINY
    if _TINY is None:
        from tests.integration.conftest import GUEST_IMAGES

        _TINY = (Path(os.environ.get("VIRTLET_TINY_IMAGE", GUEST_IMAGES / "tiny.qcow2"))).read_bytes()
    return _TINY


def _truncate_layer(reg: Registry, repo: str, manifest_digest: str) -> list[str]:
    """Cut the (gzip) layer blob of a pushed image in the registry's storage to half its size."""
    import json

    doc = json.loads(reg.blob_path(manifest_digest).read_bytes())
    layers = [layer["digest"] for layer in doc["layers"]]
    path = reg.blob_path(layers[0])
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return layers


def test_node_credentials_translation_and_bearer(world_dir: Path, netns_guard: NetnsGuard, loopback_cni: Path,
                                                 tiny: Path) -> None:
    """A translation to an oci:// URL with node credentials from the registries config, through a registry
    that uses the Bearer token flow (WWW-Authenticate realm/service/scope)."""
    base = world_dir / "registry"
    base.mkdir()
    with TokenServer(base, {USER: PASSWORD}) as tokens, Registry(base, token=tokens) as reg:
        pusher = Pusher(reg.host, "Bearer " + tokens.sign(USER, "repository:vm/tiny:pull,push"))
        digest = pusher.container_disk("vm/tiny", "v1", tiny)
        (world_dir / "translations").mkdir()
        (world_dir / "translations" / "reg.yaml").write_text(
            f"translations:\n  - name: disks/tiny\n    url: oci://{reg.host}/vm/tiny:v1\n")
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        config = f"registries:\n  '{reg.host}':\n    auth: {{auth: '{auth}'}}\n"
        # the token realm is chosen by the registry, so the image source policy checks it: loopback allowed
        with _daemon(world_dir, netns_guard, loopback_cni, config,
                     ["--image-source-allow", "127.0.0.0/8"]) as daemon:
            image_id = str(daemon.image().PullImage(api.PullImageRequest(
                image=api.ImageSpec(image="virtlet.cloud/disks/tiny:latest")), timeout=300).image_ref)
            assert image_id == reg.disk_image_id(digest)
            assert any("scope=repository%3Avm%2Ftiny%3Apull" in r for r in tokens.requests), tokens.requests
            listed = daemon.image().ListImages(api.ListImagesRequest()).images
            assert f"{reg.host}/vm/tiny@{digest}" in listed[0].repo_digests
            # a pull's own credentials win over the node's: wrong ones fail with the token server's reason
            err = _pull_error(daemon, f"{reg.host}/vm/tiny:v1", api.AuthConfig(username=USER,
                                                                                 password=OTHER_PASSWORD))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
            assert "bad credentials" in err.details()
            # a registry token (from an imagePullSecret) is used as the Bearer token directly
            token = tokens.sign(USER, "repository:vm/tiny:pull")
            daemon.image().RemoveImage(api.RemoveImageRequest(image=api.ImageSpec(image=image_id)))
            assert _pull(daemon, f"{reg.host}/vm/tiny:v1", api.AuthConfig(registry_token=token)) == image_id
            # an identity token (OAuth2 refresh token) is POSTed to the realm, never put in a URL
            daemon.image().RemoveImage(api.RemoveImageRequest(image=api.ImageSpec(image=image_id)))
            auth_id = api.AuthConfig(identity_token=tokens.refresh_token)
            assert _pull(daemon, f"{reg.host}/vm/tiny:v1", auth_id) == image_id
            assert not any(tokens.refresh_token in r for r in tokens.requests)
            err = _pull_error(daemon, f"{reg.host}/vm/tiny:v1", api.AuthConfig(identity_token="refresh-wrong"))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "bad refresh token" in err.details()
    _secret_free(world_dir, tokens.refresh_token)
    _secret_free(world_dir, PASSWORD, OTHER_PASSWORD)


@pytest.mark.libvirt
@pytest.mark.network
def test_vm_boots_from_registry_image(vm_virtletd: VirtletdProcess, world_dir: Path,
                                      basic_registry: tuple[Registry, dict[str, str]]) -> None:
    """One VM pod (real QEMU) from a containerDisk pulled with an imagePullSecret; the daemon runs at debug
    level, which logs request bodies: the password must still not appear."""
    from tests.integration.test_vm_lifecycle import MARKER, Pod

    reg, digests = basic_registry
    name = f"{reg.host}/vm/tiny:v1"
    image_id = _pull(vm_virtletd, name, api.AuthConfig(username=USER, password=PASSWORD))
    pod = Pod(vm_virtletd, world_dir, "vm-registry", image=name)
    try:
        pod.run_sandbox()
        pod.create()
        pod.start()
        pod.wait_log(MARKER)
        st = pod.status().status
        assert st.image_ref == image_id, st
    finally:
        pod.stop_and_remove()
    _secret_free(world_dir, PASSWORD)


def test_image_source_policy_applies_to_registries(world_dir: Path, netns_guard: NetnsGuard, loopback_cni: Path,
                                                   tiny: Path) -> None:
    """A plain reference chosen by a pod author is checked like an untranslated name (loopback denied); a
    registry the admin listed is trusted, but the token realm it names is the registry's choice: checked."""
    base = world_dir / "registry"
    base.mkdir()
    with TokenServer(base, {USER: PASSWORD}) as tokens, Registry(base, token=tokens) as reg:
        Pusher(reg.host, "Bearer " + tokens.sign(USER, "repository:vm/tiny:pull,push")).container_disk(
            "vm/tiny", "v1", tiny)
        right = api.AuthConfig(username=USER, password=PASSWORD)
        with _daemon(world_dir, netns_guard, loopback_cni, "registries: {}\n") as daemon:
            err = _pull_error(daemon, f"{reg.host}/vm/tiny:v1", right)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
            assert "image source policy" in err.details() and "127.0.0.0/8" in err.details()
            assert tokens.requests == []
            _nothing_stored(daemon, world_dir)
        (world_dir / "virtletd.log").unlink()
        with _daemon(world_dir, netns_guard, loopback_cni, f"registries:\n  '{reg.host}': {{}}\n") as daemon:
            err = _pull_error(daemon, f"{reg.host}/vm/tiny:v1", right)
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED, err.details()
            assert "image source policy" in err.details() and tokens.url.removeprefix("http://").split(":")[0] \
                in err.details()
            assert tokens.requests == []  # refused before connecting
            _nothing_stored(daemon, world_dir)
    _secret_free(world_dir, PASSWORD)


def test_sigkill_mid_registry_pull(world_dir: Path, netns_guard: NetnsGuard, loopback_cni: Path,
                                   basic_registry: tuple[Registry, dict[str, str]]) -> None:
    """virtletd SIGKILLed after the disk left the registry but before the commit: after the restart no partial
    image is left and the pull works."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    reg, _digests = basic_registry
    name, right = f"{reg.host}/vm/tiny:v1", api.AuthConfig(username=USER, password=PASSWORD)
    with _daemon(world_dir, netns_guard, loopback_cni, f"registries:\n  '{reg.host}': {{}}\n") as daemon:
        daemon.stop()
        daemon.env = {"VIRTLET_FAILPOINT": "image.pull.after_download"}
        daemon.start()
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(_pull, daemon, name, right)
            deadline = time.monotonic() + 120
            while "failpoint image.pull.after_download reached" not in daemon.log():
                assert not fut.done() and time.monotonic() < deadline, daemon.log()
                time.sleep(0.1)
            assert list((world_dir / "images" / "tmp").iterdir())  # the partial download exists now
            daemon.kill()
            with pytest.raises(grpc.RpcError):
                fut.result(timeout=60)
        daemon.env = {}
        daemon.start()
        _nothing_stored(daemon, world_dir)
        assert _pull(daemon, name, right) == reg.disk_image_id(_digests["v1"])


def test_virtletctl_image_push(world_dir: Path, netns_guard: NetnsGuard, loopback_cni: Path, tiny: Path) -> None:
    """``virtletctl image push`` publishes the tiny disk to a Bearer-auth registry; virtletd pulls it back."""
    import subprocess
    import sys

    base = world_dir / "registry"
    base.mkdir()
    with TokenServer(base, {USER: PASSWORD}) as tokens, Registry(base, token=tokens) as reg:
        cmd = [sys.executable, "-m", "virtlet.ctl.main", "image", "push", "--username", USER, "--password-stdin",
               str(tiny), f"{reg.host}/vm/pushed:1"]
        wrong = subprocess.run(cmd, input=OTHER_PASSWORD + "\n", capture_output=True, text=True, timeout=300)
        assert wrong.returncode == 1 and "bad credentials" in wrong.stderr, wrong.stderr
        assert OTHER_PASSWORD not in wrong.stderr + wrong.stdout
        out = subprocess.run(cmd, input=PASSWORD + "\n", capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        ref = out.stdout.strip()
        assert ref.startswith(f"{reg.host}/vm/pushed@sha256:")
        bad = world_dir / "not-a-disk.img"
        bad.write_text("hello, I am text\n")
        refused = subprocess.run([*cmd[:-2], str(bad), f"{reg.host}/vm/bad:1"], input=PASSWORD + "\n",
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "not-a-disk.img" in refused.stderr, refused.stderr
        config = f"registries:\n  '{reg.host}': {{}}\n"
        with _daemon(world_dir, netns_guard, loopback_cni, config, ["--image-source-allow", "127.0.0.0/8"]) as d:
            image_id = _pull(d, ref, api.AuthConfig(username=USER, password=PASSWORD))
            assert image_id == reg.disk_image_id(ref.split("@")[1])
            assert _pull(d, f"{reg.host}/vm/pushed:1", api.AuthConfig(username=USER, password=PASSWORD)) == image_id


def test_container_status_names_the_image_the_pod_asked_for(
        world_dir: Path, netns_guard: NetnsGuard, bridge_cni: Path,
        basic_registry: tuple[Registry, dict[str, str]]) -> None:
    """ContainerStatus shows the image name of the ContainerConfig, or for an image id (what the kubelet
    sends after a pull) the image's repo tag, as containerd; the id is in image_ref/image_id.  A reference
    without a tag means ``:latest`` in ImageStatus."""
    import json

    from tests.integration.test_daemon_sandbox import _config

    reg, digests = basic_registry
    ref = f"{reg.host}/vm/tiny"
    # the same layer under tag latest (an image id is derived from the layer: a re-compressed push is another)
    Pusher(reg.host, basic(USER, PASSWORD)).manifest("vm/tiny", "latest",
                                                     json.loads(reg.blob_path(digests["v1"]).read_bytes()))
    right = api.AuthConfig(username=USER, password=PASSWORD)
    with _daemon(world_dir, netns_guard, bridge_cni, f"registries:\n  '{reg.host}': {{}}\n") as daemon:
        image_id = _pull(daemon, f"{ref}:v1", right)
        assert _pull(daemon, ref, right) == image_id  # same layer, tag latest
        status = daemon.image().ImageStatus(api.ImageStatusRequest(image=api.ImageSpec(image=ref))).image
        assert status.id == image_id and f"{ref}:latest" in status.repo_tags
        rt = daemon.runtime()
        cfg = _config("regname", "uid-regname")
        sid = rt.RunPodSandbox(api.RunPodSandboxRequest(config=cfg, runtime_handler="virtlet")).pod_sandbox_id
        try:
            for asked, shown in ((image_id, status.repo_tags[0]), (f"{ref}:v1", f"{ref}:v1")):
                cid = rt.CreateContainer(api.CreateContainerRequest(
                    pod_sandbox_id=sid, sandbox_config=cfg, config=api.ContainerConfig(
                        metadata=api.ContainerMetadata(name="vm"), image=api.ImageSpec(image=asked),
                        log_path="vm.log")), timeout=60).container_id
                st = rt.ContainerStatus(api.ContainerStatusRequest(container_id=cid)).status
                assert (st.image.image, st.image_ref, st.image_id) == (shown, image_id, image_id)
                listed = rt.ListContainers(api.ListContainersRequest()).containers
                assert [(c.image.image, c.image_ref) for c in listed if c.id == cid] == [(shown, image_id)]
                rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=60)
        finally:
            rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
            rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)


def _push_layer(push: Pusher, repo: str, tag: str, layer: bytes, media_type: str) -> str:
    import json

    config = push.blob(repo, json.dumps({"architecture": "amd64", "os": "linux"}).encode())
    desc = push.blob(repo, layer)
    return push.manifest(repo, tag, {
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": media_type, **desc}]})


def _flip_byte(reg: Registry, manifest_digest: str, where: float) -> None:
    """Corrupt the layer blob in the registry's storage (same size), ``where`` of the way in."""
    import json

    layer = json.loads(reg.blob_path(manifest_digest).read_bytes())["layers"][0]["digest"]
    path = reg.blob_path(layer)
    with open(path, "r+b") as f:
        f.seek(int(path.stat().st_size * where))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


def test_layer_forms_and_corrupt_blobs(world_dir: Path, netns_guard: NetnsGuard, loopback_cni: Path,
                                       tiny: Path) -> None:
    """What the one-pass layer reader (issue 20: image pull speed) must keep: the disk between other members
    and under a long (pax) name is found and stored intact; a blob corrupted in the registry (same size, in
    the disk's bytes, in a header, inside gzip data) is refused as not matching the manifest, nothing stored."""
    import gzip

    from tests.helpers.registry import layer_tar

    disk = reg_tiny_bytes()
    long_name = "disk/" + "sub-directory-with-a-long-name/" * 4 + "tiny.qcow2"  # > 100 bytes: a pax header
    layer = layer_tar({"etc/before": os.urandom(70000), long_name: disk, "etc/after": b"a" * 3000})
    base = world_dir / "registry"
    base.mkdir()
    with Registry(base) as reg:
        push = Pusher(reg.host)
        forms = {"members": _push_layer(push, "vm/forms", "members", layer, "application/vnd.oci.image.layer.v1.tar"),
                 "gz": _push_layer(push, "vm/forms", "gz", gzip.compress(layer, 1),
                                   "application/vnd.oci.image.layer.v1.tar+gzip")}
        bad = {}
        for name, where, gz in (("payload", 0.6, False), ("header", 0.0, False), ("deflate", 0.5, True)):
            data = layer_tar({f"disk/{name}.qcow2": disk, f"pad/{name}": name.encode()})  # a distinct blob
            data = gzip.compress(data, 1) if gz else data
            bad[name] = _push_layer(push, "vm/bad", name, data, "application/vnd.oci.image.layer.v1.tar"
                                    + ("+gzip" if gz else ""))
            _flip_byte(reg, bad[name], where)
        with _daemon(world_dir, netns_guard, loopback_cni, f"registries:\n  '{reg.host}': {{}}\n") as daemon:
            for tag, digest in forms.items():
                image_id = _pull(daemon, f"{reg.host}/vm/forms:{tag}")
                assert image_id == reg.disk_image_id(digest)
                assert (world_dir / "images" / "data" / image_id.removeprefix("sha256:")).read_bytes() == disk
            stored = sorted(p.name for p in (world_dir / "images" / "data").iterdir())
            for name in bad:
                err = _pull_error(daemon, f"{reg.host}/vm/bad:{name}")
                assert err.code() == grpc.StatusCode.FAILED_PRECONDITION, (name, err.details())
                assert "does not match the manifest" in err.details(), (name, err.details())
                assert sorted(p.name for p in (world_dir / "images" / "data").iterdir()) == stored
                assert list((world_dir / "images" / "tmp").iterdir()) == []
