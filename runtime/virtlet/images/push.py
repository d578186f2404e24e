"""Publish a VM disk (qcow2 or raw) as a containerDisk image: ``virtletctl image push FILE REF``.

The image is what KubeVirt and virtletd's registry pull expect: one gzip tar layer holding ``disk/<file name>``
(mode 0644, owned by 107:107 as KubeVirt's images are), an OCI image config for linux/amd64 and an OCI image
manifest, tagged (or only pinned, when REF has no tag) in the repository.  The layer is written once to a
private temporary file while its sha256 is computed (a registry wants the digest before the upload), then
streamed to the registry in one monolithic PUT; a blob the registry already has is not uploaded again.
Authentication is the pull client's (Basic or Bearer, scope ``repository:<repo>:pull,push``).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

from virtlet import __version__, errors
from virtlet.images import fetch as ft
from virtlet.images import validate
from virtlet.images.containerdisk import OCI_MANIFEST
from virtlet.images.policy import SourcePolicy
from virtlet.images.registry import Credentials, HostConfig, RegistryClient, parse_reference

LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG = "application/vnd.oci.image.config.v1+json"


class _Hashing:
    """A write-only file object that hashes and counts what passes through to ``out``."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.hash, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def build_layer(disk: Path, out: IO[bytes]) -> tuple[str, int]:
    """Write the gzip tar layer with ``disk/<name>`` to ``out``; its digest and size."""
    hashing = _Hashing(out)
    with gzip.GzipFile(fileobj=hashing, mode="wb", compresslevel=1, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("disk")
        d.type, d.mode, d.uid, d.gid = tarfile.DIRTYPE, 0o755, 107, 107
        tar.addfile(d)
        info = tarfile.TarInfo(f"disk/{disk.name}")
        info.size, info.mode, info.uid, info.gid = disk.stat().st_size, 0o644, 107, 107
        with open(disk, "rb") as f:
            tar.addfile(info, f)
    return "sha256:" + hashing.hash.hexdigest(), hashing.size


class Pusher:
    def __init__(self, ref_text: str, creds: Credentials | None, insecure: bool = False,
                 ca: str | None = None) -> None:
        self.ref = parse_reference(ref_text, "push target")
        # the user of the command names the registry and the token realm it sends: a workstation tool, not a
        # pod author's choice on a shared node, so no address is denied
        self.client = RegistryClient(self.ref, creds, HostConfig(insecure=insecure, ca=ca, configured=True),
                                     SourcePolicy.build(["0.0.0.0/0", "::/0"]), trusted=True)
        self.client.what = f"push to {self.ref}"

    def push(self, disk: Path) -> str:
        """Upload ``disk`` as a containerDisk; the manifest digest.  The disk is checked first as a pull
        would check it (qcow2 or raw, no backing file): an image virtletd would refuse is not published."""
        validate.inspect(disk, "", f"disk {disk}")
        with tempfile.TemporaryFile(prefix="virtlet-push-") as tmp:
            digest, size = build_layer(disk, tmp)
            tmp.seek(0)
            self._blob(digest, size, tmp)
            config = json.dumps({"architecture": "amd64", "os": "linux",
                                 "rootfs": {"type": "layers", "diff_ids": []}, "config": {}}).encode()
            config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
            self._blob(config_digest, len(config), config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [{"mediaType": LAYER, "digest": digest, "size": size}],
            "annotations": {"org.opencontainers.image.title": disk.name}}).encode()
        manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        self._request("PUT", f"manifests/{self.ref.tag or manifest_digest}", manifest, OCI_MANIFEST, (201,))
        return manifest_digest

    def _blob(self, digest: str, size: int, body: bytes | IO[bytes]) -> None:
        if self._request("HEAD", f"blobs/{digest}", b"", "", (200, 404)) == 200:
            return  # the registry has it
        location: list[str] = []
        self._request("POST", "blobs/uploads/", b"", "", (202,), location=location)
        if not location or not location[0]:
            raise errors.FailedPrecondition(f"{self.client.what}: the registry gave no upload location")
        url = urljoin(f"{self.client.base}/v2/{self.ref.repo}/blobs/uploads/", location[0])
        if urlsplit(url).netloc != self.ref.host:
            raise errors.FailedPrecondition(f"{self.client.what}: the upload location is on another host")
        sep = "&" if urlsplit(url).query else "?"
        self._request("PUT", url + f"{sep}digest={digest}", body, "application/octet-stream", (201,), size)

    def _request(self, method: str, path: str, body: bytes | IO[bytes], ctype: str, ok: tuple[int, ...],
                 size: int | None = None, location: list[str] | None = None) -> int:
        url = path if "://" in path else f"{self.client.base}/v2/{self.ref.repo}/{path}"
        for attempt in (0, 1):
            headers = {"User-Agent": f"virtlet/{__version__}", "Host": urlsplit(url).netloc,
                       "Content-Length": str(size if size is not None else len(body))}  # type: ignore[arg-type]
            if ctype:
                headers["Content-Type"] = ctype
            if self.client._authorization:
                headers["Authorization"] = self.client._authorization
            conn = ft._connection(url, self.client.profile, None, self.client.what)
            try:
                parts = urlsplit(url)
                if not isinstance(body, bytes):
                    body.seek(0)
                conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                             headers=headers)
                resp = conn.getresponse()
                status = resp.status
                if status == 401 and attempt == 0 and not self.client._authorization:
                    challenge = resp.getheader("WWW-Authenticate") or ""
                    self.client._authorization = self.client._authenticate(
                        challenge.replace(":pull\"", ":pull,push\""), _read_reason(resp))
                    continue
                if status not in ok:
                    raise self.client._status_error(status, _read_reason(resp), path.split("?")[0])
                if location is not None:
                    location.append(resp.getheader("Location") or "")
                resp.read()
                return status
            except (OSError, http.client.HTTPException) as exc:
                raise self.client._network(exc, url) from exc
            finally:
                conn.close()
        raise errors.PermissionDenied(f"{self.client.what}: the registry refused the credentials")


def _read_reason(resp: Any) -> str:
    from virtlet.images.registry import _reason

    return _reason(resp)
