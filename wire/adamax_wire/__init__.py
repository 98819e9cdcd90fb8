"""The adamax.v1 wire contract, shared by the client and the server.

Neither side owns this package: ``adamax_client`` and ``adamax_server`` both import it, and it
imports neither of them. Its modules:

* ``proto``: the protobuf/gRPC modules generated from ``proto/adamax/v1/adamax.proto`` by
  ``scripts/gen_proto.py`` (never edited by hand). ``adamax_wire.pb`` and ``adamax_wire.pb_grpc``
  are short names for them.
* ``tensors``: NumPy arrays <-> the tensor frames of the gRPC streams (chunking, dtypes,
  bfloat16, row-sparse gradients).
* ``bulk_frames``: the length-prefixed framing of the bulk channel (raw TCP).
* ``shm``: naming and the nonce check of same-host shared-memory segments.
* ``errors``: ``WireFormatError``, raised for bytes that break the contract.
"""

from __future__ import annotations

import importlib
from typing import Any

from adamax_wire.errors import WireFormatError

__all__ = ["WireFormatError", "pb", "pb_grpc"]

_LAZY = {
    "pb": "adamax_wire.proto.adamax.v1.adamax_pb2",
    "pb_grpc": "adamax_wire.proto.adamax.v1.adamax_pb2_grpc",  # imports grpc: loaded on first use
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        globals()[name] = module
        return module
    raise AttributeError(f"module 'adamax_wire' has no attribute {name!r}")
