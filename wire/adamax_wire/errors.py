"""Errors of the wire contract itself (no protobuf, no grpc)."""

from __future__ import annotations


class WireFormatError(ValueError):
    """A stream of frames does not follow the adamax.v1 framing rules."""
