"""One job sharded over several servers, still Keras-exact (README, "Scaling out").

* ``placement`` (from ``adamax_wire.placement``): which shard holds which variable, or which
  rows of a big one; ``split``: cutting arrays and stores by it, and putting them back.
* ``pairwise``: exact sums of squares of a split variable (NumPy's pairwise tree across shards).
* ``shard_engine``: the engine of one shard, a Keras step in two halves around the norm exchange.
* ``shard``: one optimizer's state on one shard (staged pushes, ordered events, cuts).
* ``leader``: the job's sequencer on shard 0 (exactly-once, order, one sync decision, failures).
* ``job``: a whole job in process (tests, and the assemble / re-split of checkpoints).
* ``rpc`` and ``server``: ``ShardService`` over gRPC, links between shards, cut files on disk.

``pairwise``, ``shard_engine``, ``shard``, ``leader`` and ``job`` import neither grpc nor the wire
contract's generated code.
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
