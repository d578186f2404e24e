"""CRI ImageService: thin servicers over the image store (``virtlet.images.store.ImageStore``).

Names arrive without the ``virtlet.cloud/`` prefix (the CRI proxy strips it); a name that still carries it is
accepted too, so virtletd can also be used directly with crictl.

Registry pulls: a name a translation maps to an ``oci://`` URL is pulled from that registry.  A *plain*
reference (``host[:port]/repo[:tag|@sha256:…]``) is pulled from a registry when the request says it is for a
virtlet pod without the ``virtlet.cloud/`` name form: ``ImageSpec.runtime_handler`` is ``virtlet`` (kubelets
with RuntimeClassInImageCriApi set it for pods of that RuntimeClass) and the name carries no
``virtlet.cloud/`` prefix.  Any other name keeps its HTTP meaning, so existing pods do not change.
``PullImageRequest.auth`` (from imagePullSecrets) is used for registry pulls only and is never logged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import grpc

from virtlet import errors
from virtlet.cri import stream_lists
from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.gen import api_pb2_grpc as api_grpc
from virtlet.cri.runtime_service import fill_unimplemented, service_method_names
from virtlet.images.records import repo_digests, repo_tags
from virtlet.images.registry import Credentials

PREFIX = "virtlet.cloud/"
REGISTRY_HANDLER = "virtlet"


def _name(spec: api.ImageSpec, what: str) -> str:
    name = spec.image.strip()
    if not name:
        raise errors.InvalidArgument(f"{what}: image.image is required")
    return name.removeprefix(PREFIX)


def _image(record: Any) -> api.Image:
    """Tags and digests as containerd lists them (``records.repo_tags``/``repo_digests``)."""
    tags, digests = repo_tags(record), repo_digests(record)
    return api.Image(id=record.digest, repo_tags=tags, repo_digests=digests, size=record.size,
                     spec=api.ImageSpec(image=(tags or digests or [record.digest])[0]))


def _credentials(auth: api.AuthConfig) -> Credentials | None:
    return Credentials.build(auth.username, auth.password, auth.auth, auth.identity_token, auth.registry_token)


class ImageServicer(api_grpc.ImageServiceServicer):
    def __init__(self, store: Any) -> None:
        self.store = store

    def PullImage(self, request: api.PullImageRequest, context: grpc.ServicerContext) -> api.PullImageResponse:
        name = _name(request.image, "PullImage")
        registry = (request.image.runtime_handler == REGISTRY_HANDLER
                    and not request.image.image.strip().startswith(PREFIX))
        record = self.store.pull(name, credentials=_credentials(request.auth), registry=registry)
        return api.PullImageResponse(image_ref=record.digest)  # the image id, as containerd answers

    def ImageStatus(self, request: api.ImageStatusRequest,
                    context: grpc.ServicerContext) -> api.ImageStatusResponse:
        record = self.store.status(_name(request.image, "ImageStatus"))
        if record is None:
            return api.ImageStatusResponse()  # absent is not an error in CRI
        resp = api.ImageStatusResponse(image=_image(record))
        if request.verbose:
            resp.info["info"] = json.dumps({
                "digest": record.digest, "names": list(record.names), "path": str(record.path),
                "format": record.format, "virtual_size": record.virtual_size, "size": record.size,
                "pulled_at": record.pulled_at}, sort_keys=True)
        return resp

    def ListImages(self, request: api.ListImagesRequest,
                   context: grpc.ServicerContext) -> api.ListImagesResponse:
        name = request.filter.image.image.strip().removeprefix(PREFIX) if request.HasField("filter") else ""
        digest = None
        if name.startswith("sha256:"):
            name, digest = "", name
        records = self.store.list(name=name or None, digest=digest)
        return api.ListImagesResponse(images=[_image(r) for r in records])

    def StreamImages(self, request: api.StreamImagesRequest,
                     context: grpc.ServicerContext) -> Iterable[api.StreamImagesResponse]:
        """ListImages in batches (``virtlet.cri.stream_lists``)."""
        images = self.ListImages(api.ListImagesRequest(filter=request.filter), context).images
        return stream_lists.stream(images, lambda b: api.StreamImagesResponse(images=b))

    def RemoveImage(self, request: api.RemoveImageRequest,
                    context: grpc.ServicerContext) -> api.RemoveImageResponse:
        self.store.remove(_name(request.image, "RemoveImage"))
        return api.RemoveImageResponse()

    def ImageFsInfo(self, request: api.ImageFsInfoRequest,
                    context: grpc.ServicerContext) -> api.ImageFsInfoResponse:
        info = self.store.fs_info()
        usage = api.FilesystemUsage(
            timestamp=info.timestamp_ns, fs_id=api.FilesystemIdentifier(mountpoint=info.mountpoint),
            used_bytes=api.UInt64Value(value=info.used_bytes), inodes_used=api.UInt64Value(value=info.inodes_used))
        return api.ImageFsInfoResponse(image_filesystems=[usage])



fill_unimplemented(ImageServicer, service_method_names("ImageService"))
