"""One job sharded over several servers, still Keras-exact.

* ``placement``: which shard holds which variable, or which rows of a big one.
* ``pairwise``: exact sums of squares of a split variable (NumPy's pairwise tree across shards).
"""

from adamax_server.sharding.pairwise import Piece, Unit, combine, piece_sums, units
from adamax_server.sharding.placement import DEFAULT_MIN_PIECE_BYTES, PieceSpec, Placement, VariablePlacement, place

__all__ = [
    "DEFAULT_MIN_PIECE_BYTES",
    "Piece",
    "PieceSpec",
    "Placement",
    "Unit",
    "VariablePlacement",
    "combine",
    "piece_sums",
    "place",
    "units",
]
