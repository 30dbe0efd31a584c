"""Errors by meaning, and the single table that turns them into gRPC status codes."""

from __future__ import annotations

import errno

import grpc
from google.protobuf import any_pb2

from worker.reapi import error_details_pb2, status_pb2


class ServiceError(Exception):
    """Base of every error a client is meant to see; the message is for people."""


class InvalidArgument(ServiceError):
    """The request itself is malformed."""


class NotFound(ServiceError):
    """A blob, cache entry or operation does not exist."""


class FailedPrecondition(ServiceError):
    """The request is well formed but the system is not in a state to serve it."""

    def __init__(self, message: str, missing: list[str] | None = None) -> None:
        super().__init__(message)
        self.missing = missing or []


class PermissionDenied(ServiceError):
    """Configuration forbids what the request asks for."""


class ResourceExhausted(ServiceError):
    """Out of disk, queue space or another bounded resource."""


class OutOfRange(ServiceError):
    """An offset beyond the end of a resource."""


class DeadlineExceeded(ServiceError):
    """The action ran longer than its timeout."""


class Cancelled(ServiceError):
    """The operation was cancelled."""


class Unavailable(ServiceError):
    """A dependency (the Docker daemon) cannot be reached right now; retrying may help."""


class Internal(ServiceError):
    """A bug or an unexpected state on our side."""


class DataLoss(ServiceError):
    """Stored data turned out to be damaged (its bytes no longer match its digest)."""


STATUS_CODES: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Internal: grpc.StatusCode.INTERNAL,
    DataLoss: grpc.StatusCode.DATA_LOSS,
}


def status_code_of(error: BaseException) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_status_proto(error: BaseException) -> status_pb2.Status:
    """A google.rpc.Status for an error reported inside a response (not as an RPC error)."""
    code = status_code_of(error)
    status = status_pb2.Status(code=code.value[0], message=str(error))
    if isinstance(error, FailedPrecondition) and error.missing:
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type="MISSING", subject=subject, description="not in the CAS"
                )
                for subject in error.missing
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(failure)
        status.details.append(detail)
    return status


OK_STATUS = status_pb2.Status(code=grpc.StatusCode.OK.value[0])


def raise_if_disk_full(error: OSError, what: str) -> None:
    """Turns an out-of-space OSError into ResourceExhausted; other errors pass through."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise ResourceExhausted(f"disk full while storing {what}") from error
