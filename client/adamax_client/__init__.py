"""adamax-ps client: ``RemoteAdamax``, the Keras-shaped Adamax API on a parameter server.

Workers need this package and ``adamax_wire`` (the wire contract, shared with the server), plus
grpcio, protobuf and numpy; the server package is never imported here.

Framework adapters (imported only when used): ``adamax_client.torch.RemoteAdamax``, a
``torch.optim.Optimizer``, and ``adamax_client.keras.RemoteAdamax``, a Keras 3 optimizer for
``model.fit``.
"""

from adamax_wire._moved import install as _install_moved
from adamax_wire.tensors import RowSparseGradient
from adamax_client.errors import (
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
from adamax_client.remote import PushResult, RemoteAdamax, VariableSpec
from adamax_client.security import TlsChannelCredentials, tls_channel_credentials
from adamax_client.sharded import ShardedRemoteAdamax  # registers itself: RemoteAdamax(shard_list)
from adamax_client.transport import RetryPolicy

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
    "ShardedRemoteAdamax",
    "StaleGradientError",
    "UnauthenticatedError",
    "UnavailableError",
    "VariableSpec",
    "TlsChannelCredentials",
    "tls_channel_credentials",
]

# The wire modules used to be private modules of this package.
_install_moved(
    {
        "adamax_client._wire": "adamax_wire.tensors",
        "adamax_client._bulk": "adamax_wire.bulk_frames",
        "adamax_client._shm": "adamax_wire.shm",
        "adamax_client._proto": "adamax_wire.proto",
    }
)
