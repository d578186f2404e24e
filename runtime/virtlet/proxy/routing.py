"""Which backend a CRI call goes to: pure decisions over the request's handler, annotations, ids and images.

Why a separate, pure module: routing mistakes are silent (a pod lands on the wrong runtime), so every rule is
unit-tested without any gRPC (``tests/unit/test_proxy_routing.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from virtlet import errors
from virtlet.proxy import naming
from virtlet.proxy.naming import PRIMARY

TARGET_RUNTIME_ANNOTATION = "kubernetes.io/target-runtime"


@dataclass(frozen=True)
class Rules:
    """``secondaries``: names of the secondary runtimes; ``handlers``: RuntimeClass handler -> secondary."""

    secondaries: frozenset[str]
    handlers: Mapping[str, str] = field(default_factory=dict)

    def sandbox_runtime(self, runtime_handler: str, annotations: Mapping[str, str]) -> str:
        """The runtime for RunPodSandbox: the target-runtime annotation, else the handler, else the primary.

        An annotation naming no configured secondary is refused (InvalidArgument naming the value): a pod
        that asked for a VM must never silently become a container.  A handler/annotation conflict is refused
        too.
        """
        target = annotations.get(TARGET_RUNTIME_ANNOTATION, "").strip()
        by_handler = self.handlers.get(runtime_handler, PRIMARY)
        if target:
            if target not in self.secondaries:
                known = ", ".join(sorted(self.secondaries)) or "none"
                raise errors.InvalidArgument(
                    f"annotation {TARGET_RUNTIME_ANNOTATION}={target!r} names a runtime this node's CRI "
                    f"proxy does not serve (known: {known}); remove the annotation to run the pod on the "
                    "primary runtime")
            if by_handler != PRIMARY and by_handler != target:
                raise errors.InvalidArgument(
                    f"runtime handler {runtime_handler!r} selects {by_handler} but annotation "
                    f"{TARGET_RUNTIME_ANNOTATION}={target!r} selects another runtime; use one of them")
            return target
        return by_handler

    def split_id(self, value: str, what: str) -> tuple[str, str]:
        """``(runtime, backend id)`` of an id in a request (InvalidArgument for an unknown prefix)."""
        return naming.split_id(value, self.secondaries, what)

    def split_image(self, image: str) -> tuple[str, str]:
        """``(runtime, backend name)`` of an image name, ref or id in a request."""
        return naming.split_image(image, self.secondaries)

    def container_image(self, sandbox_runtime: str, image: str) -> str:
        """The backend image name for CreateContainer; refuses an image of another runtime than the pod's."""
        runtime, raw = self.split_image(image)
        if runtime == sandbox_runtime:
            return raw
        if runtime == PRIMARY:
            raise errors.InvalidArgument(
                f"image {image!r} is not a {sandbox_runtime} image but the pod runs on {sandbox_runtime}: "
                f"VM pods need images named {sandbox_runtime}/<host>/<path>")
        raise errors.InvalidArgument(
            f"image {image!r} belongs to runtime {runtime} but the pod runs on "
            f"{naming.display(sandbox_runtime)}: give the pod runtimeClassName with handler "
            f"{self.handler_for(runtime) or '<handler>'} or annotation "
            f"{TARGET_RUNTIME_ANNOTATION}: {runtime}")

    def handler_for(self, runtime: str) -> str:
        return next((h for h, r in sorted(self.handlers.items()) if r == runtime), "")

    def list_targets(self, *filter_ids: tuple[str, str],
                     split: Callable[[str, str], tuple[str, str]] | None = None) -> tuple[set[str], dict[str, str]]:
        """Backends a filtered list must ask, and the filter ids as that backend knows them.

        ``filter_ids`` are ``(what, value)`` pairs; empty values do not narrow.  Ids naming different
        runtimes can match nothing, so no backend is asked.  ``split`` resolves an id (default: the legacy
        prefix form only; the proxy passes its id-index lookup).
        """
        split = split or self.split_id
        targets = {PRIMARY, *self.secondaries}
        stripped: dict[str, str] = {}
        for what, value in filter_ids:
            if not value:
                continue
            runtime, raw = split(value, what)
            targets &= {runtime}
            stripped[what] = raw
        return targets, stripped

    def image_list_targets(self, image: str) -> tuple[set[str], str]:
        """Backends ListImages with a name filter must ask, and the name for them."""
        if not image:
            return {PRIMARY, *self.secondaries}, ""
        runtime, raw = self.split_image(image)
        return {runtime}, raw
