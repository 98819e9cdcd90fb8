"""Placement of a sharded job's variables; defined in ``adamax_wire.placement`` (shared with clients)."""

from adamax_wire.placement import (
    DEFAULT_MIN_PIECE_BYTES,
    PieceSpec,
    Placement,
    VariablePlacement,
    place,
)

__all__ = ["DEFAULT_MIN_PIECE_BYTES", "PieceSpec", "Placement", "VariablePlacement", "place"]
