"""Exceptions raised by the adamax-ps client: one class per gRPC status code.

Users never see ``grpc.RpcError``: :func:`from_rpc_error` maps each status to a subclass of
:class:`AdamaxError` and the transport re-raises with ``raise ... from exc``. Classes also
derive from the built-in exception the in-process engine would raise (ValueError, KeyError,
TypeError, TimeoutError, ConnectionError), so code written against ``adamax_server.Adamax``
handles the remote optimizer's errors unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

CURRENT_VERSION_KEY = "adamax-current-version"
ERROR_TYPE_KEY = "adamax-error-type"


class AdamaxError(Exception):
    """Base class. ``code`` is the gRPC status name; ``current_version`` is set when known."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, *, current_version: int | None = None, server_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.current_version = current_version
        self.server_type = server_type

    def __str__(self) -> str:  # KeyError would quote the message otherwise
        return self.message


class CancelledError(AdamaxError):
    code = "CANCELLED"


class InvalidArgumentError(AdamaxError, ValueError):
    """Bad shape, dtype, byte length, non-finite values or argument (the engine's ValueError)."""

    code = "INVALID_ARGUMENT"


class InvalidArgumentTypeError(InvalidArgumentError, TypeError):
    """An INVALID_ARGUMENT the engine raised as TypeError (e.g. setting a scheduled learning rate)."""


class DeadlineExceededError(AdamaxError, TimeoutError):
    code = "DEADLINE_EXCEEDED"


class NotFoundError(AdamaxError, KeyError):
    """Unknown optimizer or variable."""

    code = "NOT_FOUND"


class AlreadyExistsError(AdamaxError):
    code = "ALREADY_EXISTS"


class PermissionDeniedError(AdamaxError):
    code = "PERMISSION_DENIED"


class ResourceExhaustedError(AdamaxError):
    code = "RESOURCE_EXHAUSTED"


class FailedPreconditionError(AdamaxError):
    """The optimizer's state does not allow the call (not built, built differently, ...)."""

    code = "FAILED_PRECONDITION"


class NotStagedError(FailedPreconditionError):
    """A sharded push was not staged on a shard when committed (the shard restarted, or the staged
    push expired); nothing was applied. ``RemoteAdamax.push`` stages it again by itself."""


class AbortedError(AdamaxError):
    code = "ABORTED"


class StaleGradientError(AbortedError):
    """The gradient was computed on weights too old for ``max_staleness``; pull and recompute."""


class RoundAbortedError(AbortedError):
    """A sync round was aborted after its timeout; pull and push again."""


class OutOfRangeError(AdamaxError):
    code = "OUT_OF_RANGE"


class UnimplementedError(AdamaxError, NotImplementedError):
    code = "UNIMPLEMENTED"


class InternalError(AdamaxError):
    code = "INTERNAL"


class UnavailableError(AdamaxError, ConnectionError):
    """The server cannot be reached (retried with backoff before this is raised)."""

    code = "UNAVAILABLE"


class DataLossError(AdamaxError):
    code = "DATA_LOSS"


class UnauthenticatedError(AdamaxError):
    code = "UNAUTHENTICATED"


class ProtocolError(AdamaxError):
    """The server's reply does not follow the adamax.v1 contract."""

    code = "INTERNAL"


_BY_CODE: dict[grpc.StatusCode, type[AdamaxError]] = {
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.UNIMPLEMENTED: UnimplementedError,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}
_BY_SERVER_TYPE: dict[str, type[AdamaxError]] = {
    "TypeError": InvalidArgumentTypeError,
    "StaleGradient": StaleGradientError,
    "RoundAborted": RoundAbortedError,
    "NotStaged": NotStagedError,
}


def _trailing(exc: Any) -> dict[str, str]:
    try:
        return {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
    except Exception:  # some RpcErrors (e.g. from interceptors) carry no metadata
        return {}


def from_rpc_error(exc: grpc.RpcError) -> AdamaxError:
    """The AdamaxError for a failed call (use as ``raise from_rpc_error(e) from e``)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = (exc.details() if hasattr(exc, "details") else None) or str(code)
    if code == grpc.StatusCode.CANCELLED and message == "CANCELLED":  # cut by the server, which sends no words
        message = _SERVER_CANCELLED
    return _build(code, message, _trailing(exc))


_SERVER_CANCELLED = (
    "the server cut the call (CANCELLED): a push or pull that sends nothing for the server's --stall-seconds, or "
    "runs past --call-floor-seconds plus its size at --min-transfer-mib, is cut (the server logs which), as is "
    "every call when the server stops. Retry with the same request id: a push is applied at most once"
)


def from_status(code_name: str, message: str, metadata: Mapping[str, str]) -> AdamaxError:
    """The AdamaxError for a status given by name (the bulk channel's BulkStatus)."""
    code = getattr(grpc.StatusCode, code_name, grpc.StatusCode.UNKNOWN)
    return _build(code, message or code_name, dict(metadata))


def _build(code: grpc.StatusCode, message: str, metadata: Mapping[str, str]) -> AdamaxError:
    server_type = metadata.get(ERROR_TYPE_KEY)
    cls = _BY_CODE.get(code, AdamaxError)
    special = _BY_SERVER_TYPE.get(server_type or "")
    if special is not None and issubclass(special, cls):
        cls = special
    version = metadata.get(CURRENT_VERSION_KEY)
    return cls(message, current_version=int(version) if version is not None else None, server_type=server_type)
