"""What a shard keeps besides its engine: staged pushes, prepare replies and snapshot parts,
and the gradient helpers of staging and preparing (widening narrowed slices, a sync round's sum,
store loads). ``sharding.shard`` is their only user; imports nothing of grpc or the wire.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adamax_server.coordination.stats import GradientStats
from adamax_server.errors import InvalidArgument
from adamax_server.optim.engine import RowSparseGradient
from adamax_server.optim.kernels.stats import sum_with_stats
from adamax_server.sharding.gradient_sets import Taken
from adamax_server.sharding.placement import Placement
from adamax_server.sharding.shard_engine import ShardEngine

Gradient = Any  # np.ndarray | RowSparseGradient | None
PushKey = tuple[str, str]  # (worker id, request id)


@dataclass
class StagedPush:
    grads: dict[str, Gradient]  # local name -> local slice (None: no gradient)
    non_finite: dict[str, int]
    expires: float
    taken: Taken = field(default_factory=list)  # the gradient set it was received into
    stats: dict[str, GradientStats] = field(default_factory=dict)  # per present slice (metrics)


@dataclass
class PrepareReply:
    clip_mode: int
    present: list[str]  # local variables with a gradient, build order
    non_finite: dict[str, int]
    unit_sums: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class PreparedRestore:
    """A shard's restore, built and checked but not swapped in (``ShardHost.prepare_restore``)."""

    snap: ShardSnapshot
    engine: ShardEngine
    placement: Placement | None
    staged: dict[PushKey, tuple[dict[str, Gradient], dict[str, int]]]


@dataclass
class ShardSnapshot:
    """A shard's part of a consistent cut (see ``sharding.checkpoints``)."""

    key: str
    shard_index: int
    num_shards: int
    config: dict[str, Any]
    policy: dict[str, Any]
    exclusions: dict[str, list[str]]
    placement: dict[str, Any] | None
    version: int
    iterations: int
    variables: dict[str, np.ndarray]  # this shard's pieces
    store: dict[str, np.ndarray]  # this shard's save_own_variables
    staged: dict[str, dict[str, Gradient]]  # "worker\x00request" -> grads, the open round's pushes
    store_names: list[str] = field(default_factory=list)  # this shard's optimizer variables, store order


def widened(g: Gradient, dtype: np.dtype) -> Gradient:
    """A gradient sent narrower than its variable (float16, bfloat16 -> float32) in the variable's
    dtype, as a single server receives it into its staging buffer; others as they are."""
    if isinstance(g, RowSparseGradient):
        values = np.asarray(g.values)
        if values.dtype.kind == "f" and values.dtype.itemsize < dtype.itemsize:
            return RowSparseGradient(g.indices, values.astype(dtype))
        return g
    if g is not None:
        array = np.asarray(g)
        if array.dtype.kind == "f" and array.dtype.itemsize < dtype.itemsize:
            return array.astype(dtype)
    return g


def load_store(engine: ShardEngine, store: Mapping[str, np.ndarray]) -> None:
    """``load_own_variables``, refusing a store of the wrong size: Keras only warns ("Skipping
    variable loading ...") and loads nothing, which must not be answered as a load."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.load_own_variables(dict(store))
    if caught:
        raise InvalidArgument(f"LoadOwnVariables refused: {str(caught[0].message).strip()}")


def owned_copy(grads: Mapping[str, Gradient]) -> dict[str, Gradient]:
    """A staged push's gradients as copies (a snapshot outlives the pooled set they are in)."""
    return {n: np.array(g) if isinstance(g, np.ndarray) else g for n, g in grads.items()}


def combine_round(specs: Sequence[tuple[str, Any, Any]], parts_list: Sequence[Mapping[str, Gradient]], aggregation: str,
                  buffer: Callable[[str], np.ndarray | None] = lambda name: None,
                  ) -> tuple[dict[str, Gradient], dict[str, GradientStats]]:  # fmt: skip
    """A sync round's sum or mean per variable, in the given (worker-id) order, and the
    statistics of the dense sums (computed in the summing pass).

    A dense sum is ``0 + part_0 + part_1 + ...`` (then divided by the count for a mean), bit for
    bit ``np.add``/``np.divide`` in that order, written straight into ``buffer(name)`` (the
    engine's staging buffer, which then copies nothing) when it offers one of the right dtype;
    row-sparse parts are concatenated, or ``np.add.at`` into a dense sum.
    """
    count = len(parts_list)
    out: dict[str, Gradient] = {}
    stats: dict[str, GradientStats] = {}
    divisor = count if aggregation == "mean" else None
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        parts = [p[name] for p in parts_list if p.get(name) is not None]
        if not parts:
            out[name] = None
            continue
        if all(isinstance(p, RowSparseGradient) for p in parts):
            indices = np.concatenate([np.asarray(p.indices, dtype=np.int64) for p in parts])
            values = np.concatenate([np.asarray(p.values).astype(dtype) for p in parts])
            if divisor is not None:
                values = np.divide(values, np.asarray(count, dtype=dtype))
            out[name] = RowSparseGradient(indices, values)
            continue
        total = buffer(name)
        if total is None or total.dtype != dtype:
            total = np.empty(shape, dtype=dtype)
        if any(isinstance(p, RowSparseGradient) for p in parts):
            total[...] = 0
            for p in parts:
                if isinstance(p, RowSparseGradient):
                    np.add.at(total, np.asarray(p.indices), np.asarray(p.values).astype(dtype))
                else:
                    np.add(total, np.asarray(p).astype(dtype, copy=False), out=total)
            if divisor is not None:
                np.divide(total, np.asarray(count, dtype=dtype), out=total)
        else:
            stats[name] = sum_with_stats(total, [np.asarray(p) for p in parts], divisor)
        out[name] = total
    return out, stats
