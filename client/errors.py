"""The error classes of aqimodels and the one table that maps them to gRPC status codes.

The server's interceptor looks a raised error up in ``ERROR_CODES`` to choose the status code;
the client wrapper turns a ``grpc.RpcError`` back into the same class through ``CODE_ERRORS``.
Anything not in the table is a bug: the server answers INTERNAL with a generic message.
"""

from __future__ import annotations

from typing import Any

import grpc


class AqiModelsError(Exception):
    """Root of every aqimodels error.

    Attributes:
        message: What went wrong, for people; sent as the gRPC status details.
        code: The gRPC status code this error travels as.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFoundError(AqiModelsError):
    """A model, version, job or other named thing does not exist."""


class ModelNotFoundError(NotFoundError):
    """The registered model does not exist."""


class VersionNotFoundError(NotFoundError):
    """The model exists but the version does not."""


class JobNotFoundError(NotFoundError):
    """The retrain job does not exist."""


class InvalidArgumentError(AqiModelsError):
    """A request field is invalid; the message names the field."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class FailedPreconditionError(AqiModelsError):
    """The request is valid but the registry's state forbids it (an illegal transition)."""


class StaleVersionError(AqiModelsError):
    """A compare-and-set found a different current version than the caller expected."""


class AlreadyExistsError(AqiModelsError):
    """The thing to create exists already (a running job for the same model)."""


class ResourceExhaustedError(AqiModelsError):
    """A worker is at capacity, or a request exceeds a size limit."""


class BackendUnavailableError(AqiModelsError):
    """The MLflow store (or a worker) does not answer; retrying later may succeed."""


class DeadlineExceededError(AqiModelsError):
    """The caller's deadline passed before the answer was ready."""


class CancelledError(AqiModelsError):
    """The call or the job was cancelled."""


class UnauthenticatedError(AqiModelsError):
    """The token is missing or unknown."""


class PermissionDeniedError(AqiModelsError):
    """The caller's role is too low for the RPC."""


class UnimplementedError(AqiModelsError):
    """The RPC is defined in the API but its implementation has not landed."""


class InternalError(AqiModelsError):
    """A bug on the server. The message is generic; the server logged the traceback."""


# The one table. Order matters only for CODE_ERRORS: the first class listed for a code is the one
# the client raises for it (subclasses such as ModelNotFoundError travel as their parent's code).
ERROR_CODES: dict[type[AqiModelsError], grpc.StatusCode] = {
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    VersionNotFoundError: grpc.StatusCode.NOT_FOUND,
    JobNotFoundError: grpc.StatusCode.NOT_FOUND,
    InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    StaleVersionError: grpc.StatusCode.ABORTED,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BackendUnavailableError: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    CancelledError: grpc.StatusCode.CANCELLED,
    UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDeniedError: grpc.StatusCode.PERMISSION_DENIED,
    UnimplementedError: grpc.StatusCode.UNIMPLEMENTED,
    InternalError: grpc.StatusCode.INTERNAL,
}

for _cls, _code in ERROR_CODES.items():
    _cls.code = _code

CODE_ERRORS: dict[grpc.StatusCode, type[AqiModelsError]] = {}
for _cls, _code in ERROR_CODES.items():
    CODE_ERRORS.setdefault(_code, _cls)


QUOTE_CHARS = 200


def bound(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending with "…" when it was cut."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def quote(value: object, limit: int = QUOTE_CHARS) -> str:
    """An input quoted in an error message: its repr, at most ``limit`` characters, then "…"."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def status_code_for(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code an error travels as (INTERNAL for anything outside the table)."""
    for cls in type(error).__mro__:
        if cls in ERROR_CODES:
            return ERROR_CODES[cls]
    return grpc.StatusCode.INTERNAL


def error_from_rpc(error: grpc.RpcError) -> AqiModelsError:
    """The aqimodels error for a failed call, by its status code (a fixed mapping, never by name)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    cls = CODE_ERRORS.get(code, AqiModelsError)
    exc = cls(details or code.name)
    exc.code = code
    # The server's interceptor echoes x-request-id on every answer: an error without one never
    # reached it (the transport failed), one with it is the server's own answer.
    trailing: Any = None
    try:
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    except Exception:  # noqa: BLE001 - a call that never started has no metadata to read
        trailing = None
    exc.request_id = next((str(item[1]) for item in (trailing or ()) if item[0] == "x-request-id"), "")  # type: ignore[attr-defined]  # the request id rides on the grpc exception object
    return exc
