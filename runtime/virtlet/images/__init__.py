"""Disk images for VM pods: name translation, fetching over HTTP(S), validation and a content-addressed store.

Entry point: :class:`ImageStore`.  See ``docs/images.md`` for the translation config format and the rules.
"""

from virtlet.images.store import FsInfo, ImageRecord, ImageStore

__all__ = ["FsInfo", "ImageRecord", "ImageStore"]
