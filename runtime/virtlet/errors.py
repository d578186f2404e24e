"""The one error vocabulary of virtlet.

Domain code raises these anywhere; the gRPC layer (``virtlet.cri.interceptors``) maps them to status codes in
one place.  Messages are written for the user who sent the request: say what was wrong and what is allowed.
"""

from __future__ import annotations

import grpc


class VirtletError(Exception):
    """Base of all errors that reach a CRI caller with a specific gRPC code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(VirtletError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(VirtletError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(VirtletError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(VirtletError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(VirtletError):
    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(VirtletError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(VirtletError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(VirtletError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(VirtletError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(VirtletError):
    code = grpc.StatusCode.INTERNAL


def grpc_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for any exception (unknown exceptions are INTERNAL)."""
    if isinstance(exc, VirtletError):
        return exc.code
    return grpc.StatusCode.INTERNAL
