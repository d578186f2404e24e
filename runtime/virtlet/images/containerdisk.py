"""containerDisk images from a registry: manifest negotiation, and the disk streamed out of a tar layer.

A containerDisk (KubeVirt's format) is an ordinary image whose layer holds one regular file under ``/disk/``
(qcow2 or raw).  ``resolve`` fetches the manifest the reference names (OCI manifest or index, Docker schema 2
manifest or list; from an index linux/amd64 is chosen) and verifies its sha256 against a pinned digest;
``fetch_disk`` streams each layer blob once: the blob's sha256 and size are verified on the fly, it is
decompressed (gzip, zstd with the ``zstandard`` module (a dependency), or none), the tar stream is read
(``tarstream``) and the bytes of the disk file go straight into the store's sink (which hashes and writes
them).  Nothing is unpacked to disk.  The image's id in the store is derived from the verified digest of the
layer holding the disk (``image_id``); the manifest digest becomes the name ``<repo>@sha256:<manifest digest>``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, cast

from virtlet import errors, quantity
from virtlet.images.fetch import FetchInfo
from virtlet.images.policy import SourcePolicy
from virtlet.images.registry import MAX_SMALL_BODY, Credentials, HostConfig, Reference, RegistryClient
from virtlet.images.sink import HashingFileSink
from virtlet.images.tarstream import SPARSE, TarStream

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
_INDEXES = (OCI_INDEX, DOCKER_LIST)
_TAR = ("application/vnd.oci.image.layer.v1.tar", "application/vnd.docker.image.rootfs.diff.tar")
PLATFORM = ("linux", "amd64")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class Manifest:
    digest: str  # of what the reference names (an index when it names one): the repo digest
    layers: tuple[Layer, ...]
    image_digest: str  # of the image manifest (the platform's, when ``digest`` is an index)


def resolve_hosts(ref: Reference, creds: Credentials | None, lookup: Callable[[str], HostConfig],
                  policy: SourcePolicy, trusted: bool, timeout: float, max_size: int,
                  ) -> tuple[RegistryClient, Manifest]:
    """The manifest from the first of the registry's mirrors that has it, else from the registry itself; the
    client that answered fetches the blobs too (their digests are checked against the manifest, whoever serves
    them).  A mirror was named by the node admin (trusted, like the registry config's hosts) and gets only
    the node's credentials for it: the pod's pull secret is sent to the registry it names, never elsewhere."""
    origin = lookup(ref.host)
    for mirror in origin.mirrors:
        client = RegistryClient(ref, None, lookup(mirror), policy, True, timeout, endpoint=mirror)
        try:
            return client, resolve(client, max_size)
        except errors.VirtletError as exc:  # messages never hold secrets
            log.info("%s: %s; trying the next mirror or the registry", client.what, exc)
    client = RegistryClient(ref, creds, origin, policy, trusted, timeout)
    return client, resolve(client, max_size)


def resolve(client: RegistryClient, max_size: int) -> Manifest:
    ref = client.ref
    body, media_type, digest = _manifest(client, ref.digest or ref.tag or "latest", ref.digest)
    doc = _json(body, client.what)
    media_type = doc.get("mediaType") or media_type
    image_digest = digest
    if media_type in _INDEXES or "manifests" in doc:
        chosen = _platform(doc.get("manifests"), client.what)
        body, media_type, image_digest = _manifest(client, chosen, chosen)
        doc = _json(body, client.what)
    layers = []
    for entry in doc.get("layers") or []:
        try:
            layer = Layer(str(entry["digest"]), int(entry["size"]), str(entry.get("mediaType", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(client, "a layer without digest or size") from exc
        if not layer.digest.startswith("sha256:") or len(layer.digest) != 71 or layer.size < 0:
            raise _bad(client, f"layer digest {layer.digest[:80]!r} is not sha256:<hex>")
        if layer.size > max_size:
            raise errors.ResourceExhausted(
                f"{client.what}: a layer is {layer.size} bytes, more than this node's maximum image size "
                f"{quantity.format_bytes(max_size)}; the node admin sets it with image_max_size")
        layers.append(layer)
    if not layers:
        raise _bad(client, "the manifest has no layers")
    return Manifest(digest, tuple(layers), image_digest)


def _manifest(client: RegistryClient, ref: str, pin: str | None) -> tuple[bytes, str, str]:
    resp, conn = client.get(f"manifests/{ref}", ACCEPT)
    try:
        body = resp.read(MAX_SMALL_BODY + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise client._network(exc, f"{client.base}/v2/{client.ref.repo}/manifests/{ref}") from exc
    finally:
        conn.close()
    if len(body) > MAX_SMALL_BODY:
        raise _bad(client, f"the manifest is larger than {MAX_SMALL_BODY} bytes")
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    if pin and digest != pin:
        raise errors.FailedPrecondition(
            f"{client.what}: the registry sent a manifest with digest {digest}, not the requested {pin}")
    return body, (resp.getheader("Content-Type") or "").split(";")[0].strip(), digest


def _platform(entries: Any, what: str) -> str:
    found = []
    for e in entries if isinstance(entries, list) else []:
        p = e.get("platform") or {} if isinstance(e, dict) else {}
        found.append(f"{p.get('os')}/{p.get('architecture')}")
        if (p.get("os"), p.get("architecture")) == PLATFORM and isinstance(e.get("digest"), str):
            if e["digest"].startswith("sha256:") and len(e["digest"]) == 71:
                return str(e["digest"])
    raise errors.NotFound(f"{what}: the image index has no {'/'.join(PLATFORM)} image "
                          f"(it has: {', '.join(found[:10]) or 'nothing'})")


def fetch_disk(client: RegistryClient, manifest: Manifest, sink: HashingFileSink, max_size: int) -> FetchInfo:
    """Stream the single regular file under ``/disk/`` of the layers into ``sink``.

    Each blob is read once and hashed once: its sha256 (checked against the manifest before this returns,
    so before the store commits anything) is computed by the sink's outer-hash worker (``track_outer``)
    beside the write, off the network thread.  The disk file itself is not hashed (the sink is made with
    ``hash_image=False``): its bytes are a deterministic function of the verified blob, so a second sha256
    would add no integrity and cost a full CPU pass (on a 2-core node, the difference between 0.5 and 0.9
    of a plain download); the image id is ``image_id`` of the layer instead.  An uncompressed layer's disk
    bytes are read from the socket straight into the sink's buffers; a compressed layer's blob bytes are
    copied to the blob hasher."""
    found: str | None = None
    image: str | None = None
    sink.track_outer()
    for layer in manifest.layers:
        resp, conn = client.get(f"blobs/{layer.digest}")
        plain = layer.media_type in _TAR
        blob = _VerifiedBlob(resp, layer, client, None if plain else sink.outer_only)
        try:
            stream = _decompressed(blob, layer, client)
            tar = TarStream(_reader(stream), sink.outer_only if plain else lambda _data: None)
            mine = _disk_from_tar(tar, sink, plain, found, max_size, client)
            if mine:
                found, image = mine, image_id(layer)
            tar.drain()
            blob.drain()
            _verify(blob, sink)
        except errors.VirtletError:
            raise
        except (OSError, http.client.HTTPException) as exc:
            if not isinstance(exc, gzip.BadGzipFile):
                raise client._network(exc, f"{client.base}/v2/{client.ref.repo}/blobs/{layer.digest}") from exc
            raise _unreadable(client, blob, sink, plain, exc) from exc
        except Exception as exc:  # TarError, EOFError, zlib.error, zstandard.ZstdError: undecodable content
            raise _unreadable(client, blob, sink, plain, exc) from exc
        finally:
            conn.close()
    if found is None:
        raise errors.InvalidArgument(
            f"{client.what}: no regular file under /disk/ in its layers; a containerDisk image holds the VM "
            "disk (qcow2 or raw) as the single file in /disk/")
    return FetchInfo(f"{client.base}/v2/{client.ref.repo}", "", image or "")


def _verify(blob: _VerifiedBlob, sink: HashingFileSink) -> None:
    digest = "sha256:" + sink.outer_digest()
    if digest != blob.layer.digest:
        raise blob.corrupt(f"its content has digest {digest}")


def _unreadable(client: RegistryClient, blob: _VerifiedBlob, sink: HashingFileSink, plain: bool,
                exc: BaseException) -> errors.VirtletError:
    """A layer that cannot be decoded: a blob that does not match the manifest (corrupt in the registry or on
    the way: FAILED_PRECONDITION) or, when it does match, an image that is not a containerDisk
    (INVALID_ARGUMENT).  The rest of the blob is read to tell (bounded by the manifest's size)."""
    blob.drain(None if plain else sink.outer_only)  # every byte read so far has reached the outer hash
    _verify(blob, sink)
    return _bad(client, f"layer {blob.layer.digest[:19]}… is not a readable tar ({str(exc)[:200]})")


def image_id(layer: Layer) -> str:
    """The store id of the disk in ``layer``: sha256 of an ASCII text naming the layer digest and how it is
    decompressed (together they fix the disk's bytes: the layer is verified, the extraction deterministic).

    Why text: the store is content-addressed, and an HTTP image whose sha256 is this id would have to *be*
    this text, which ``validate`` refuses (UTF-8 without a NUL byte is not a disk): no HTTP pull can put
    other bytes under a registry image's id, and a registry pull never reuses an HTTP image's file.  Images
    pulled before this id existed keep the sha256 of their disk file as id (their names still resolve)."""
    mt = layer.media_type
    kind = "tar" if mt in _TAR else "zstd" if mt.endswith("+zstd") else "gzip"
    return "sha256:" + hashlib.sha256(f"virtlet containerDisk v1 {kind} {layer.digest}".encode()).hexdigest()


def _reader(stream: Any) -> Callable[[memoryview], int]:
    def read_into(view: memoryview) -> int:
        return int(stream.readinto(view) or 0)
    return read_into


def _decompressed(blob: _VerifiedBlob, layer: Layer, client: RegistryClient) -> Any:
    mt = layer.media_type
    if mt in _TAR:
        return blob
    if mt.endswith("+gzip") or mt.endswith(".tar.gzip"):
        return gzip.GzipFile(fileobj=blob, mode="rb")
    if mt.endswith("+zstd"):
        try:
            import zstandard  # a dependency (pyproject); imported here so a node without it still pulls the rest
        except ImportError as exc:
            raise errors.FailedPrecondition(
                f"{client.what}: the layer is zstd-compressed and this node lacks the zstandard module") from exc
        return zstandard.ZstdDecompressor().stream_reader(cast(IO[bytes], blob))  # it only calls read()
    raise _bad(client, f"layer media type {mt[:100]!r} is not a tar layer (plain, gzip or zstd)")


def _disk_from_tar(tar: TarStream, sink: HashingFileSink, plain: bool, found: str | None, max_size: int,
                   client: RegistryClient) -> str | None:
    """Copy the /disk/ file of one layer into ``sink`` (with ``plain``, its bytes are blob bytes too)."""
    mine = None
    while (member := tar.next()) is not None:
        path = posixpath.normpath("/" + member.name)
        if not path.startswith("/disk/") or not (member.isreg() or member.type == SPARSE):
            continue
        if found or mine:
            raise errors.InvalidArgument(
                f"{client.what}: more than one file under /disk/ ({found or mine}, {path}); a containerDisk "
                "holds exactly one disk file")
        if member.type == SPARSE:
            raise _bad(client, f"{path} is a GNU sparse file; store the disk as a regular file")
        if member.size > max_size:
            raise errors.ResourceExhausted(
                f"{client.what}: {path} is {member.size} bytes, more than this node's maximum image size "
                f"{quantity.format_bytes(max_size)} (image_max_size)")
        mine = path
        sink.expect(member.size)
        while True:
            with sink.buffer() as view:
                n = tar.readinto(view)
            if not n:
                break
            sink.commit(n, outer=plain)
    return mine


class _VerifiedBlob(io.RawIOBase):
    """The blob body, counted as it is read (size checked against the manifest; the sha256 is the sink's
    outer hash); ``tee`` gets a copy of every byte (a compressed layer, whose disk bytes are not blob bytes)."""

    def __init__(self, resp: http.client.HTTPResponse, layer: Layer, client: RegistryClient,
                 tee: Callable[[bytes], None] | None) -> None:
        self.resp, self.layer, self.client, self.tee = resp, layer, client, tee
        self.got = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.resp.readinto(b) or 0
        if n:
            self.got += n
            if self.got > self.layer.size:
                raise self.corrupt(f"it is longer than the {self.layer.size} bytes the manifest says")
            if self.tee is not None:
                self.tee(bytes(memoryview(b)[:n]))
        elif self.got < self.layer.size:
            raise errors.Unavailable(
                f"{self.client.what}: blob {self.layer.digest} ended after {self.got} of {self.layer.size} bytes "
                "(truncated); the pull will be retried")
        return n

    def drain(self, feed: Callable[[bytes], None] | None = None) -> None:
        """Read what the tar reader (or decompressor) left: hashed through ``tee``, or given to ``feed``."""
        buf = bytearray(1 << 20)
        while n := self.readinto(buf):
            if feed is not None:
                feed(bytes(buf[:n]))

    def corrupt(self, why: str) -> errors.VirtletError:
        return errors.FailedPrecondition(
            f"{self.client.what}: blob {self.layer.digest} from the registry does not match the manifest: {why}")


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise errors.FailedPrecondition(f"{what}: the registry's manifest is not JSON") from exc
    if not isinstance(doc, dict):
        raise errors.FailedPrecondition(f"{what}: the registry's manifest is not a JSON object")
    return doc


def _bad(client: RegistryClient, why: str) -> errors.VirtletError:
    return errors.InvalidArgument(f"{client.what}: not a usable containerDisk image: {why}")
