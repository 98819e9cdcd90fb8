"""A point-in-time copy of one hosted optimizer: what a checkpoint holds and a restore needs.

``OptimizerHost.snapshot()`` (``sharding.single``) fills it between two events (the arrays are copies, or
gradients that are never mutated after they were received) so the caller can write it to disk
or stream it without holding the lock. ``Coordinator.restore()`` turns one back into a live
optimizer. Everything but the arrays is plain JSON data.

No grpc, no file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# A gradient of an open sync round: dense array, (indices, values) of a row-sparse one, or None.
RoundGradient = Any


@dataclass
class RoundContribution:
    """One worker's push in the open sync round (counted, not yet applied)."""

    worker_id: str
    request_id: str
    grads: dict[str, RoundGradient]


@dataclass
class OptimizerSnapshot:
    """Everything needed to resume one optimizer bit-identically.

    ``config`` is the engine's current Keras config (learning rate included);
    ``initial_config`` is what ``CreateOptimizer`` compares against for idempotency.
    ``variables`` are the model variables in build order; ``store`` is Keras's
    ``save_own_variables`` dict ("0", "1", ...). ``dedup`` maps a worker id to its finished
    ``[request_id, push result as a dict]`` pairs, oldest first.
    """

    key: str
    config: dict[str, Any]
    initial_config: dict[str, Any]
    policy: dict[str, Any]
    exclusions: dict[str, list[str]]
    built: bool
    variables: dict[str, np.ndarray]
    store: dict[str, np.ndarray]
    version: int
    iterations: int
    dedup: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)
    workers: dict[str, dict[str, int]] = field(default_factory=dict)
    round: list[RoundContribution] = field(default_factory=list)
    last_closed: str = ""
    last_abort: str = ""

    @property
    def nbytes(self) -> int:
        arrays = [*self.variables.values(), *self.store.values()]
        return int(sum(np.asarray(a).nbytes for a in arrays))
