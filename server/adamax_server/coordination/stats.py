"""Per-push gradient statistics (non-finite counts, squared norms), shared by the non-finite check
and the metrics.

The transports fold the statistics into the pass that receives the bytes (see
``adamax_server.optim.kernels.stats``) and hand them over with the gradients as a
``ReceivedGradients`` list; ``push_stats`` computes only what is missing, outside the
optimizer's lock. A sync round's combined gradient gets its statistics from the summing pass.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from adamax_server.optim.engine import RowSparseGradient
from adamax_server.optim.kernels.stats import GradientStats, gradient_stats

Gradient = Any  # np.ndarray | RowSparseGradient | None (as in ``policy``)

__all__ = ["GradientStats", "ReceivedGradients", "non_finite_counts", "non_finite_message", "push_stats"]


class ReceivedGradients(list):  # type: ignore[type-arg]
    """A push's ``[(name, gradient), ...]`` with the statistics computed while receiving them.

    ``stats`` maps a name to its ``GradientStats`` for every gradient whose statistics are
    complete (a transport leaves out what it could not fold in, e.g. bfloat16 on the wire).
    ``gradient_sets``: the pooled gradient set the gradients were received into, if any (a
    shard keeps it with the staged push; ``sharding.gradient_sets``).
    """

    def __init__(self, items: Any = (), stats: Mapping[str, GradientStats] | None = None) -> None:
        super().__init__(items)
        self.stats: dict[str, GradientStats] = dict(stats or {})
        self.gradient_sets: list[Any] = []


def push_stats(grads: Mapping[str, Gradient], known: Mapping[str, GradientStats] | None = None) -> dict[str, GradientStats]:
    """Stats per present gradient: ``known`` ones as they are, one parallel pass for the others."""
    out = {}
    for name, g in grads.items():
        if g is None:
            continue
        if known is not None and name in known:
            out[name] = known[name]
            continue
        values = g.values if isinstance(g, RowSparseGradient) else g
        out[name] = gradient_stats(np.asarray(values))
    return out


def non_finite_counts(stats: Mapping[str, GradientStats]) -> dict[str, int]:
    return {name: st.non_finite for name, st in stats.items() if st.non_finite}


def non_finite_message(bad: Mapping[str, int], *, skipped: bool = False) -> str:
    listing = ", ".join(f"'{n}' ({c} NaN/Inf)" for n, c in bad.items())
    if skipped:
        return f"non-finite gradient values in {listing}: step skipped, variables unchanged"
    return (
        f"Gradients must be finite; found non-finite values in {listing}. The push was rejected "
        "and nothing changed. Create the optimizer with non_finite='skip' to skip such steps "
        "like keras.mixed_precision.LossScaleOptimizer."
    )


def sum_counts(per_shard: Mapping[int, Mapping[str, int]]) -> dict[str, int]:
    """Per-variable non-finite counts of every shard, summed (in shard order)."""
    out: dict[str, int] = {}
    for i in sorted(per_shard):
        for name, c in per_shard[i].items():
            out[name] = out.get(name, 0) + c
    return out


class MissingGradientLog:
    """A step without a gradient for some variables, said in server terms: WARNING the first time
    a set of variables goes missing, DEBUG after (a worker that never trains one is not spam)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._seen: set[tuple[str, ...]] = set()

    def __call__(self, names: list[str], iterations: int) -> None:
        key = tuple(sorted(names))
        level = logging.DEBUG if key in self._seen else logging.WARNING
        self._seen.add(key)
        logging.getLogger("adamax_server.sharding.leader").log(
            level,
            "optimizer '%s': step %d had no gradient for variable(s) %s; they keep their values and Adamax "
            "moments this step (like Keras). Workers push a gradient for every variable they want trained.%s",
            self.key, iterations, list(names),
            "" if level == logging.DEBUG else " (logged once for this set of variables; DEBUG shows each step)",
            extra={"optimizer": self.key},
        )  # fmt: skip
