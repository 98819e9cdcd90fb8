"""Domain exceptions of the parameter server and their gRPC status codes, in one place.

The coordinator raises these (and the engine raises Keras-style ValueError/TypeError/KeyError);
``status_for`` is the only place that decides which status code a failure becomes. Codes are
given by name (``"NOT_FOUND"``) so this module needs no grpc import; the servicer turns the
name into ``grpc.StatusCode``.

Trailing metadata carries machine-readable extras: ``adamax-current-version`` for stale or
late gradients, ``adamax-error-type`` for the Python type the engine raised, so the client can
re-raise an exception that is also a ValueError/TypeError/KeyError like the local engine's.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from adamax_wire.errors import WireFormatError

_log = logging.getLogger(__name__)

CURRENT_VERSION_KEY = "adamax-current-version"
ERROR_TYPE_KEY = "adamax-error-type"


class ServiceError(Exception):
    """Base of the domain exceptions; ``code`` names the gRPC status."""

    code = "INTERNAL"

    def __init__(self, message: str, *, current_version: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.current_version = current_version


class InvalidArgument(ServiceError):
    """A request is malformed: wrong shape, dtype, byte length, non-finite values, bad policy."""

    code = "INVALID_ARGUMENT"


class NotFound(ServiceError):
    """Unknown optimizer or variable name."""

    code = "NOT_FOUND"


class AlreadyExists(ServiceError):
    """An optimizer with that key exists with a different config or policy."""

    code = "ALREADY_EXISTS"


class FailedPrecondition(ServiceError):
    """The call does not fit the optimizer's state (not built, built differently, future step)."""

    code = "FAILED_PRECONDITION"


class NotStaged(FailedPrecondition):
    """A sharded push being committed is not staged on a shard (never sent, expired, or the shard
    restarted): nothing was applied; the worker stages it again and commits it again."""


class StaleGradient(ServiceError):
    """A gradient computed on weights older than ``max_staleness`` versions allows."""

    code = "ABORTED"


class RoundAborted(ServiceError):
    """A sync round was abandoned (timeout policy ABORT_ROUND); push again on fresh weights."""

    code = "ABORTED"


class WaitTimeout(ServiceError):
    """A pull waited for a weights version that did not arrive in time."""

    code = "DEADLINE_EXCEEDED"


class ResourceExhausted(ServiceError):
    """A tensor or a table exceeds a configured server limit."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(ServiceError):
    """The server is shutting down."""

    code = "UNAVAILABLE"


class StateRestored(ServiceError):
    """The optimizer's state was restored while this push was in flight; it was not applied."""

    code = "ABORTED"


class DataLoss(ServiceError):
    """Stored state is corrupt or truncated (a checkpoint failed its checksums)."""

    code = "DATA_LOSS"


class Cancelled(ServiceError):
    """The client cancelled the call or its connection dropped mid-stream; nothing was applied."""

    code = "CANCELLED"


class PermissionDenied(ServiceError):
    """The caller is authenticated but may not do this (e.g. a bulk connection bound elsewhere)."""

    code = "PERMISSION_DENIED"


class Unauthenticated(ServiceError):
    """Missing, unknown or expired credentials (bulk-channel tickets)."""

    code = "UNAUTHENTICATED"


class StatusInfo(NamedTuple):
    code: str  # a grpc.StatusCode member name
    message: str
    metadata: tuple[tuple[str, str], ...]


# Order matters: the first matching type wins (subclasses before their bases).
_BUILTIN_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (WireFormatError, "INVALID_ARGUMENT"),
    (KeyError, "NOT_FOUND"),
    (TypeError, "INVALID_ARGUMENT"),
    (ValueError, "INVALID_ARGUMENT"),
    (NotImplementedError, "UNIMPLEMENTED"),
    (MemoryError, "RESOURCE_EXHAUSTED"),
)


def status_for(exc: BaseException) -> StatusInfo:
    """The status code name, message and trailing metadata for an exception."""
    if isinstance(exc, ServiceError):
        metadata: tuple[tuple[str, str], ...] = ((ERROR_TYPE_KEY, type(exc).__name__),)
        if exc.current_version is not None:
            metadata += ((CURRENT_VERSION_KEY, str(exc.current_version)),)
        return StatusInfo(exc.code, exc.message, metadata)
    for exc_type, code in _BUILTIN_CODES:
        if isinstance(exc, exc_type):
            # KeyError's str() adds quotes around the message; use its argument instead.
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            return StatusInfo(code, message, ((ERROR_TYPE_KEY, type(exc).__name__),))
    _log.exception("internal error", exc_info=exc)
    return StatusInfo("INTERNAL", f"internal server error: {type(exc).__name__}: {exc}", ())
