"""The one place where domain errors become gRPC status codes, and where every call is logged once.

Each call logs one line: method, the ids it carries, duration and status code.  Request bodies are logged only
at debug level, with cloud-init user data, environment values and credentials replaced by ``<redacted>``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from virtlet import errors

log = logging.getLogger("virtlet.cri")

# grpc-stubs makes ServerInterceptor generic in request and response; grpcio's class cannot be subscripted
if TYPE_CHECKING:
    ServerInterceptor = grpc.ServerInterceptor[Any, Any]
else:
    ServerInterceptor = grpc.ServerInterceptor

_ID_FIELDS = ("pod_sandbox_id", "container_id")
_REDACTED = "<redacted>"
_SECRET_ANNOTATION_MARKERS = ("cloudinit", "userdata", "secret", "password", "token")


def call_ids(request: Any) -> str:
    """``pod_sandbox_id=… container_id=… image=…`` for the log line (empty when the request has none)."""
    parts = []
    for name in _ID_FIELDS:
        value = getattr(request, name, "")
        if isinstance(value, str) and value:
            parts.append(f"{name}={_log_value(value)}")
    image = getattr(request, "image", None)
    image_name = getattr(image, "image", "") if isinstance(image, Message) else ""
    if isinstance(image_name, str) and image_name:
        parts.append(f"image={_log_value(image_name)}")
    return " ".join(parts)


def _scrub(value: Any, key: str = "") -> Any:
    lowered = key.lower()
    if isinstance(value, dict):
        if lowered in ("annotations",):
            return {k: (_REDACTED if any(m in k.lower() for m in _SECRET_ANNOTATION_MARKERS) else v)
                    for k, v in value.items()}
        if lowered == "auth":
            return _REDACTED
        return {k: _scrub(v, k) for k, v in value.items()}
    if isinstance(value, list):
        if lowered == "envs":
            return [{"key": e.get("key"), "value": _REDACTED} if isinstance(e, dict) else _REDACTED
                    for e in value]
        return [_scrub(v, key) for v in value]
    return value


def redacted_body(request: Any) -> str:
    """The request as JSON without secrets (for debug logs)."""
    if not isinstance(request, Message):
        return repr(type(request))
    data = json_format.MessageToDict(request, preserving_proto_field_name=True)
    return str(_scrub(data))


# gRPC carries the status message in a trailer: past 8 KiB (soft) / 16 KiB (hard) of metadata the caller gets
# RESOURCE_EXHAUSTED "Stream removed" instead of the answer.  Messages quote user input (ids, names), so they are
# cut to this many UTF-8 bytes (percent-encoding in the trailer makes that at most 3 KiB).
MAX_MESSAGE_BYTES = 1024
MAX_LOGGED_ID = 128


def bounded(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``text`` cut to ``limit`` UTF-8 bytes, saying how much was left out."""
    raw = text.encode("utf-8", errors="replace")
    if len(raw) <= limit:
        return text
    head = raw[:limit - 40].decode("utf-8", errors="ignore")
    return f"{head}... ({len(raw) - len(head.encode())} more bytes)"


def _log_value(value: str) -> str:
    """A caller's id or name for the one-line call log: as is when it is a plain printable word, else quoted
    (no line breaks or control characters from a caller reach the log) and cut."""
    value = bounded(value, MAX_LOGGED_ID)
    return value if value.isascii() and value.isprintable() and " " not in value else repr(value)


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    code = errors.grpc_code(exc)
    message = str(exc) if isinstance(exc, errors.VirtletError) else f"internal error: {type(exc).__name__}: {exc}"
    context.abort(code, bounded(message))



Observer = Callable[[str, str, float], None]  # (gRPC method, status code name, seconds): the metrics hook


def _observe(observe: Observer | None, method: str, code: str, seconds: float) -> None:
    if observe is None:
        return
    try:
        observe(method, code, seconds)
    except Exception:  # counting must never change a call's answer
        log.exception("metrics of %s failed", method)


PROFILE_DIR_ENV = "VIRTLET_PROFILE_DIR"


def _profiled(method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
    """With ``VIRTLET_PROFILE_DIR`` set (a diagnostic for performance work, docs/performance.md), each unary call
    runs under cProfile and its stats go to ``<dir>/<Method>-<monotonic ns>.prof`` (read them with ``python -m
    pstats``).  Off by default: profiling slows every call down several times."""
    out = os.environ.get(PROFILE_DIR_ENV)
    if not out:
        return behavior
    import cProfile

    def run(request: Any, context: grpc.ServicerContext) -> Any:
        prof = cProfile.Profile()
        try:
            return prof.runcall(behavior, request, context)
        finally:
            prof.dump_stats(os.path.join(out, f"{method.rsplit('/', 1)[-1]}-{time.monotonic_ns()}.prof"))

    return run


def _wrap_unary(method: str, behavior: Callable[..., Any], observe: Observer | None = None) -> Callable[..., Any]:
    behavior = _profiled(method, behavior)

    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        start = time.monotonic()
        code = grpc.StatusCode.OK
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s request %s", method, redacted_body(request))
        try:
            return behavior(request, context)
        except errors.VirtletError as exc:
            code = exc.code
            _abort(context, exc)
        except Exception as exc:
            set_code = _status_code(context)
            if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortError" or set_code is not None:
                code = set_code or grpc.StatusCode.UNKNOWN
                raise
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            _abort(context, exc)
        finally:
            level = logging.INFO if code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND) else logging.WARNING
            if method.endswith(("/Version", "/Status", "/ListPodSandbox", "/ListContainers", "/ListImages",
                                "/ImageFsInfo", "/ListPodSandboxStats", "/ListContainerStats", "/Check",
                                "/PodSandboxStatus", "/ContainerStatus", "/ImageStatus")) \
                    and code == grpc.StatusCode.OK:
                level = logging.DEBUG  # the kubelet polls these every second
            elapsed = time.monotonic() - start
            if log.isEnabledFor(level):  # the ids are formatted only for a line that is written
                log.log(level, "%s %s %.1fms %s", method, call_ids(request), elapsed * 1000, code.name)
            _observe(observe, method, code.name, elapsed)
        return None  # pragma: no cover - abort raised

    return handler


def _status_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The code a handler already set (or aborted with).  grpcio has ``ServicerContext.code()``; the grpc-stubs
    type stubs do not list it."""
    code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
    return code


def _wrap_stream(method: str, behavior: Callable[..., Any], observe: Observer | None = None) -> Callable[..., Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        start = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            yield from behavior(request, context)
        except errors.VirtletError as exc:
            code = exc.code
            _abort(context, exc)
        except Exception as exc:
            if type(exc).__name__ == "_AbortError" or _status_code(context) is not None:
                raise
            code = grpc.StatusCode.INTERNAL
            log.exception("%s failed", method)
            _abort(context, exc)
        finally:
            elapsed = time.monotonic() - start
            log.info("%s stream ended %.1fms %s", method, elapsed * 1000, code.name)
            _observe(observe, method, code.name, elapsed)

    return handler


class ErrorMappingInterceptor(ServerInterceptor):
    """Wraps every unary and server-streaming handler with error mapping, the call log line and ``observe``
    (the Prometheus counters of ``virtlet.cri.metrics``; called once per call with its method, code and
    duration)."""

    def __init__(self, observe: Observer | None = None) -> None:
        self.observe = observe

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary, self.observe),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream, self.observe),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler
