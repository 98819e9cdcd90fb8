"""Per-push gradient statistics (non-finite counts, squared norms), computed once per push and shared
by the non-finite check and the metrics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from adamax_server.optim.engine import RowSparseGradient
from adamax_server.optim.kernels.stats import gradient_stats

Gradient = Any  # np.ndarray | RowSparseGradient | None (as in ``policy``)


class GradientStats(NamedTuple):
    """One gradient's sum of squares and largest magnitude (finite part) and non-finite count."""

    sumsq: float
    max_abs: float
    non_finite: int


def push_stats(grads: Mapping[str, Gradient]) -> dict[str, GradientStats]:
    """One parallel pass per gradient; the non-finite check and the metrics share the result."""
    out = {}
    for name, g in grads.items():
        if g is None:
            continue
        values = g.values if isinstance(g, RowSparseGradient) else g
        out[name] = GradientStats(*gradient_stats(np.asarray(values)))
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
