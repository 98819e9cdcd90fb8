"""adamax-ps client: ``RemoteAdamax``, the Keras-shaped Adamax API on a parameter server.

Only this package (and grpcio, protobuf, numpy) is needed on workers; the generated
protocol code lives in ``adamax_client._proto`` and is shared with the server.
"""

from ._wire import RowSparseGradient
from .errors import (
    AbortedError,
    AdamaxError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    ResourceExhaustedError,
    RoundAbortedError,
    StaleGradientError,
    UnauthenticatedError,
    UnavailableError,
)
from .remote import PushResult, RemoteAdamax, VariableSpec
from .security import tls_channel_credentials
from .transport import RetryPolicy

__all__ = [
    "AbortedError",
    "AdamaxError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "InvalidArgumentTypeError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "PushResult",
    "RemoteAdamax",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RoundAbortedError",
    "RowSparseGradient",
    "StaleGradientError",
    "UnauthenticatedError",
    "UnavailableError",
    "VariableSpec",
    "tls_channel_credentials",
]
