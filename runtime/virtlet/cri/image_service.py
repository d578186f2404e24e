"""CRI ImageService: thin servicers over the image store (``virtlet.images.store.ImageStore``).

Names arrive without the ``virtlet.cloud/`` prefix (the CRI proxy strips it); a name that still carries it is
accepted too, so virtletd can also be used directly with crictl.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from virtlet import errors
from virtlet.cri.gen import api_pb2 as api
from virtlet.cri.gen import api_pb2_grpc as api_grpc
from virtlet.cri.runtime_service import fill_unimplemented, service_method_names

PREFIX = "virtlet.cloud/"


def _name(spec: api.ImageSpec, what: str) -> str:
    name = spec.image.strip()
    if not name:
        raise errors.InvalidArgument(f"{what}: image.image is required")
    return name.removeprefix(PREFIX)


def _image(record: Any) -> api.Image:
    names = list(record.names)
    return api.Image(
        id=record.digest, repo_tags=names, repo_digests=[f"{n}@{record.digest}" for n in names],
        size=record.size, spec=api.ImageSpec(image=names[0] if names else record.digest))


class ImageServicer(api_grpc.ImageServiceServicer):
    def __init__(self, store: Any) -> None:
        self.store = store

    def PullImage(self, request: api.PullImageRequest, context: grpc.ServicerContext) -> api.PullImageResponse:
        name = _name(request.image, "PullImage")
        record = self.store.pull(name)
        return api.PullImageResponse(image_ref=self.store.ref(record, name))

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
