"""The CRI ImageService of the real virtletd over a real HTTP server: pull, status, list, remove, fs info, and a
SIGKILL in the middle of a large download."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers.daemon import VirtletdProcess
from virtlet.cri.gen import api_pb2 as api


def _spec(name: str) -> api.ImageSpec:
    return api.ImageSpec(image=name)


def test_image_rpcs(virtletd: VirtletdProcess, image_server: Any) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image_server.root / "a.qcow2"), "16M"],
                   check=True)
    name = image_server.url("files/a.qcow2").removeprefix("http://")
    img = virtletd.image()
    assert img.ImageStatus(api.ImageStatusRequest(image=_spec(name))).HasField("image") is False  # absent: empty
    with pytest.raises(grpc.RpcError) as exc:
        img.PullImage(api.PullImageRequest(image=_spec(name)), timeout=60)  # untranslated loopback: denied
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED, exc.value.details()
    assert "image source policy" in exc.value.details()
    (virtletd.base / "translations").mkdir(exist_ok=True)
    (virtletd.base / "translations" / "local.yaml").write_text(
        f"translations:\n  - name: images.test/a.qcow2\n    url: {image_server.url('files/a.qcow2')}\n")
    ref = img.PullImage(api.PullImageRequest(image=_spec("virtlet.cloud/images.test/a.qcow2:latest")),
                        timeout=60).image_ref
    assert ref.startswith("sha256:")  # the image id, as containerd answers
    digest = ref
    status = img.ImageStatus(api.ImageStatusRequest(image=_spec("images.test/a.qcow2"), verbose=True))
    assert status.image.id == digest and status.image.repo_tags == ["images.test/a.qcow2:latest"]
    assert list(status.image.repo_digests) == [f"images.test/a.qcow2@{digest}"]
    assert '"format": "qcow2"' in status.info["info"]
    listed = img.ListImages(api.ListImagesRequest()).images
    assert [i.id for i in listed] == [digest]
    assert img.ListImages(api.ListImagesRequest(filter=api.ImageFilter(image=_spec("nope/x")))).images == []
    assert [i.id for i in img.ListImages(api.ListImagesRequest(
        filter=api.ImageFilter(image=_spec(digest)))).images] == [digest]
    fs = img.ImageFsInfo(api.ImageFsInfoRequest()).image_filesystems[0]
    assert fs.used_bytes.value > 0 and fs.inodes_used.value > 0 and fs.fs_id.mountpoint.startswith("/")
    # an image a container uses is not removed (refused, as the issue asks; the kubelet's GC never tries)
    rt = virtletd.runtime()
    sb_cfg = api.PodSandboxConfig(metadata=api.PodSandboxMetadata(name="uses-a", namespace="default", uid="uid-a"),
                                  annotations={"kubernetes.io/target-runtime": "virtlet.cloud"})
    sid = rt.RunPodSandbox(api.RunPodSandboxRequest(config=sb_cfg, runtime_handler="virtlet"),
                           timeout=60).pod_sandbox_id
    vm_cfg = api.ContainerConfig(metadata=api.ContainerMetadata(name="vm"),
                                 image=_spec("virtlet.cloud/images.test/a.qcow2"))
    cid = rt.CreateContainer(api.CreateContainerRequest(pod_sandbox_id=sid, sandbox_config=sb_cfg, config=vm_cfg),
                             timeout=60).container_id
    with pytest.raises(grpc.RpcError) as exc:
        img.RemoveImage(api.RemoveImageRequest(image=_spec("images.test/a.qcow2")))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "used by a container" in exc.value.details()
    rt.RemoveContainer(api.RemoveContainerRequest(container_id=cid), timeout=60)
    rt.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    rt.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
    img.RemoveImage(api.RemoveImageRequest(image=_spec("images.test/a.qcow2")))
    img.RemoveImage(api.RemoveImageRequest(image=_spec("images.test/a.qcow2")))  # idempotent
    assert img.ListImages(api.ListImagesRequest()).images == []
    with pytest.raises(grpc.RpcError) as exc:
        img.PullImage(api.PullImageRequest(image=_spec("")))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_sigkill_during_download(virtletd: VirtletdProcess, image_server: Any) -> None:
    big = image_server.root / "big.raw"
    with open(big, "wb") as f:  # raw image with non-text content, 24 MiB, served at 256 KiB/s
        f.write(b"\x00\x01" * (12 << 20))
    image_server.slow_rate = 256 * 1024
    (virtletd.base / "translations").mkdir(exist_ok=True)
    (virtletd.base / "translations" / "big.yaml").write_text(
        f"translations:\n  - name: big\n    url: {image_server.url('slow/big.raw')}\n"
        f"  - name: big-fast\n    url: {image_server.url('files/big.raw')}\n")
    img = virtletd.image()
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            img.PullImage(api.PullImageRequest(image=_spec("big")), timeout=300)
        except grpc.RpcError as exc:
            errors.append(exc)

    t = threading.Thread(target=pull, daemon=True)
    t.start()
    tmp_dir = virtletd.base / "images" / "tmp"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(p.stat().st_size > 0 for p in tmp_dir.glob("*")):
        time.sleep(0.2)
    assert any(tmp_dir.iterdir()), "the download never started"
    virtletd.kill()
    t.join(30)
    virtletd.start()
    assert list(tmp_dir.iterdir()) == []  # the partial download is gone
    assert list((virtletd.base / "images" / "data").iterdir()) == []
    ref = virtletd.image().PullImage(api.PullImageRequest(image=_spec("big-fast")), timeout=300).image_ref
    assert ref.startswith("sha256:")
    assert len(list((virtletd.base / "images" / "data").iterdir())) == 1
    assert Path(virtletd.base / "images" / "tmp").exists()


def test_crafted_vmdk_descriptor_opens_no_host_path(virtletd: VirtletdProcess, image_server: Any,
                                                    world_dir: Path) -> None:
    """A VMDK descriptor naming a host path, padded with NULs so it is not refused as text.  Probed by
    qemu-img, it made qemu-img open that path: a FIFO blocked the pull until the 120 s timeout, and the error
    told the pod author whether a host file exists.  Now qemu-img gets an explicit format."""
    import os

    fifo = world_dir / "fifo"
    os.mkfifo(fifo)
    targets = {"missing": "/etc/virtlet-no-such-file", "exists": "/etc/hostname", "fifo": str(fifo)}
    lines = []
    for key, target in targets.items():
        body = (f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                f'RW 2048 FLAT "{target}" 0\n').encode() + b"\0" * 512
        (image_server.root / f"{key}.vmdk").write_bytes(body)  # starts with the VMDK magic: refused by name
        (image_server.root / f"{key}-c.vmdk").write_bytes(b"# a comment qemu's probe skips\n" + body)
        lines += [f"  - name: vmdk/{key}\n    url: {image_server.url(f'files/{key}.vmdk')}\n",
                  f"  - name: vmdk/{key}-c\n    url: {image_server.url(f'files/{key}-c.vmdk')}\n"]
    (virtletd.base / "translations").mkdir(exist_ok=True)
    (virtletd.base / "translations" / "vmdk.yaml").write_text("translations:\n" + "".join(lines))
    img = virtletd.image()
    messages = {}
    for key in targets:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as exc:
            img.PullImage(api.PullImageRequest(image=_spec(f"vmdk/{key}")), timeout=60)
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        messages[key] = exc.value.details().replace(key, "KEY")
        assert "vmdk descriptor image; only qcow2 and raw" in exc.value.details()
        # the same file behind a comment line: qemu-img is told it is raw, so it opens nothing else
        ref = img.PullImage(api.PullImageRequest(image=_spec(f"vmdk/{key}-c")), timeout=60).image_ref
        assert ref.startswith("sha256:")
        assert time.monotonic() - t0 < 30, "qemu-img blocked on the FIFO"
    assert len(set(messages.values())) == 1, messages  # nothing tells a host file's existence
    assert not any(t in m for t in targets.values() for m in messages.values())
