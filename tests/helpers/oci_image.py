"""Build a tiny OCI image tarball locally and import it into a containerd (no registry needed).

Why: the test machines cannot pull from public registries, yet containerd's CRI plugin needs real images (an
ordinary container image and the pod sandbox "pause" image).  A static ``/bin/busybox`` plus an image config
is a complete image: ``sleep`` works as a container command and as the sandbox's idle process.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"


@dataclass(frozen=True)
class OciImage:
    """An OCI archive on disk: ``name`` is the full reference it imports as (``host/path:tag``)."""

    name: str
    tarball: Path
    manifest_digest: str
    config_digest: str


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _layer(binary: Path) -> bytes:
    """A layer with ``bin/busybox`` and ``bin/sh``/``bin/sleep`` links to it (deterministic bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in ("bin", "tmp", "proc", "dev", "sys", "etc"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        _add(tar, "bin/busybox", binary.read_bytes(), 0o755)
        for applet in ("sh", "sleep"):
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type = tarfile.SYMTYPE
            info.linkname = "busybox"
            tar.addfile(info)
    return buf.getvalue()


def build(name: str, out: Path, cmd: list[str] | None = None, binary: Path = BUSYBOX) -> OciImage:
    """Write an OCI archive for ``name`` (e.g. ``localhost/virtlet-test/busybox:1``) to ``out``.

    ``cmd`` is the image's default command (``sleep`` for a long time when omitted).
    """
    layer, config, manifest = parts(cmd, binary)
    tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else "latest"
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{"mediaType": MANIFEST_TYPE, "digest": _digest(manifest), "size": len(manifest),
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": tag}}],
    }, sort_keys=True).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w") as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tar, "index.json", index)
        for blob in (layer, config, manifest):
            _add(tar, f"blobs/sha256/{_digest(blob).removeprefix('sha256:')}", blob)
    return OciImage(name, out, _digest(manifest), _digest(config))


def parts(cmd: list[str] | None = None, binary: Path = BUSYBOX) -> tuple[bytes, bytes, bytes]:
    """The image's blobs (layer, config, manifest): what an archive holds and what a registry push sends."""
    layer = _layer(binary)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd or ["/bin/sleep", "2147483647"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer)]},
        "history": [{"created_by": "virtlet tests/helpers/oci_image.py"}],
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": _digest(layer), "size": len(layer)}],
    }, sort_keys=True).encode()
    return layer, config, manifest


def import_image(image: OciImage, address: str, namespace: str = "k8s.io", snapshotter: str = "") -> None:
    """``ctr -n k8s.io images import`` into the containerd at ``address`` (a socket path), unpacked."""
    cmd = ["ctr", "--address", address, "-n", namespace, "images", "import"]
    if snapshotter:
        cmd += ["--snapshotter", snapshotter]
    proc = subprocess.run([*cmd, str(image.tarball)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"ctr images import {image.tarball} failed ({proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr}")
