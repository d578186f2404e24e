"""Prefix the ids and image names inside CRI responses of a secondary runtime (in place, pure).

Why: every id or image the kubelet sees must route back to the runtime that made it (see ``naming``).  The
functions take the runtime name and mutate the message; for the primary they change nothing.
"""

from __future__ import annotations

from virtlet.cri.gen import api_pb2 as api
from virtlet.proxy.naming import PRIMARY, external_id, external_image


def image_spec(runtime: str, spec: api.ImageSpec) -> None:
    spec.image = external_image(runtime, spec.image)
    spec.user_specified_image = external_image(runtime, spec.user_specified_image)
    spec.image_ref = external_image(runtime, spec.image_ref)


def image(runtime: str, img: api.Image) -> None:
    """Image id, tags, digests and spec get the ``<runtime>/`` prefix."""
    if runtime == PRIMARY:
        return
    img.id = external_image(runtime, img.id)
    tags = [external_image(runtime, t) for t in img.repo_tags]
    digests = [external_image(runtime, d) for d in img.repo_digests]
    del img.repo_tags[:]
    img.repo_tags.extend(tags)
    del img.repo_digests[:]
    img.repo_digests.extend(digests)
    if img.HasField("spec"):
        image_spec(runtime, img.spec)


def sandbox_status(runtime: str, status: api.PodSandboxStatus) -> None:
    status.id = external_id(runtime, status.id)


def container(runtime: str, c: api.Container) -> None:
    if runtime == PRIMARY:
        return
    c.id = external_id(runtime, c.id)
    c.pod_sandbox_id = external_id(runtime, c.pod_sandbox_id)
    c.image_ref = external_image(runtime, c.image_ref)
    c.image_id = external_image(runtime, c.image_id)
    if c.HasField("image"):
        image_spec(runtime, c.image)


def container_status(runtime: str, s: api.ContainerStatus) -> None:
    if runtime == PRIMARY:
        return
    s.id = external_id(runtime, s.id)
    s.image_ref = external_image(runtime, s.image_ref)
    s.image_id = external_image(runtime, s.image_id)
    if s.HasField("image"):
        image_spec(runtime, s.image)


def container_stats(runtime: str, stats: api.ContainerStats | api.WindowsContainerStats) -> None:
    """ContainerStats and WindowsContainerStats: the attributes carry the id."""
    stats.attributes.id = external_id(runtime, stats.attributes.id)


def sandbox_stats(runtime: str, stats: api.PodSandboxStats) -> None:
    if runtime == PRIMARY:
        return
    stats.attributes.id = external_id(runtime, stats.attributes.id)
    for c in stats.linux.containers:
        container_stats(runtime, c)
    for w in stats.windows.containers:
        container_stats(runtime, w)


def sandbox_status_response(runtime: str, resp: api.PodSandboxStatusResponse) -> None:
    if runtime == PRIMARY:
        return
    sandbox_status(runtime, resp.status)
    for s in resp.containers_statuses:
        container_status(runtime, s)


def container_event(runtime: str, ev: api.ContainerEventResponse) -> None:
    if runtime == PRIMARY:
        return
    ev.container_id = external_id(runtime, ev.container_id)
    if ev.HasField("pod_sandbox_status"):
        sandbox_status(runtime, ev.pod_sandbox_status)
    for s in ev.containers_statuses:
        container_status(runtime, s)


def sandbox_metrics(runtime: str, m: api.PodSandboxMetrics) -> None:
    if runtime == PRIMARY:
        return
    m.pod_sandbox_id = external_id(runtime, m.pod_sandbox_id)
    for c in m.container_metrics:
        c.container_id = external_id(runtime, c.container_id)
