"""Cutting a job's arrays into per-shard pieces by its placement, and putting them back together.

Used by whoever talks to every shard: the client (gradients, initial values, assignments), the
checkpoint tools (a cut assembled into the single-server format, or re-split onto another
shard count). Row ranges along axis 0; a row-sparse gradient keeps, per shard, the rows that
fall in its range (in their original order, indices made local), and a shard whose piece no row
hits still receives an empty slice, so "this variable has a gradient" is the same on every
shard. Pure NumPy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..engine import Adamax, RowSparseGradient
from .placement import Placement

Gradient = Any


def split_values(placement: Placement, values: Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Per shard: name -> its rows of each variable in ``values`` (views where possible)."""
    out: list[dict[str, np.ndarray]] = [{} for _ in range(placement.num_shards)]
    by_name = placement.by_name()
    for name, value in values.items():
        v = by_name[name]
        arr = np.asarray(value)
        for p in v.pieces:
            out[p.shard][name] = arr[p.row_start : p.row_stop] if v.shape else arr
    return out


def split_gradients(placement: Placement, grads: Mapping[str, Gradient]) -> list[list[tuple[str, Gradient]]]:
    """Per shard: [(name, slice)] in build order; None stays None on every piece's shard."""
    out: list[list[tuple[str, Gradient]]] = [[] for _ in range(placement.num_shards)]
    for v in placement.variables:
        if v.name not in grads:
            continue
        g = grads[v.name]
        for p in v.pieces:
            if g is None:
                out[p.shard].append((v.name, None))
            elif isinstance(g, RowSparseGradient) or (isinstance(g, tuple) and len(g) == 2):
                idx = np.asarray(g[0])
                vals = np.asarray(g[1])
                if not v.split:
                    out[p.shard].append((v.name, RowSparseGradient(idx, vals)))
                    continue
                mask = (idx >= p.row_start) & (idx < p.row_stop)
                out[p.shard].append((v.name, RowSparseGradient((idx[mask] - p.row_start).astype(np.int64), vals[mask])))
            else:
                arr = np.asarray(g)
                out[p.shard].append((v.name, arr[p.row_start : p.row_stop] if (v.shape and v.split) else arr))
    return out


def assemble(placement: Placement, pieces: Sequence[Mapping[str, np.ndarray]], names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """name -> whole array from every shard's pieces, in build order (all, or ``names``)."""
    wanted = set(names)
    out = {}
    for v in placement.variables:
        if wanted and v.name not in wanted:
            continue
        parts = [np.asarray(pieces[p.shard][v.name]) for p in v.pieces]
        out[v.name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return out


def job_layout(config: Mapping[str, Any], specs: Sequence[tuple[str, Sequence[int], Any]], exclusions: Mapping[str, Any] | None = None) -> list[tuple[str, str, str]]:
    """The whole job's optimizer variables in Keras's order: (name, kind, variable name or "").

    Computed with an engine built on zero-row stand-ins of the variables, so names and order
    (unique-name suffixes included) are exactly the single-server engine's.
    """
    engine = Adamax.from_config(dict(config), device="numpy")
    stand_ins = {n: np.zeros((0, *tuple(s)[1:]) if len(tuple(s)) else (), dtype=dt) for n, s, dt in specs}
    engine.build(stand_ins)
    names = [v.name for v in engine._vars]
    return [(ov.name, ov.kind, names[ov.var] if ov.kind == "slot" else "") for ov in engine._opt_vars]


def assemble_store(
    placement: Placement,
    layout: Sequence[tuple[str, str, str]],
    shard_stores: Sequence[tuple[Mapping[str, np.ndarray], Sequence[str]]],
) -> dict[str, np.ndarray]:
    """The single-server Keras store from every shard's (store, optimizer variable names)."""
    by_name = placement.by_name()
    keyed = [{n: np.asarray(store[str(i)]) for i, n in enumerate(names)} for store, names in shard_stores]
    out: dict[str, np.ndarray] = {}
    for i, (name, kind, var) in enumerate(layout):
        if kind == "slot":
            parts = [keyed[p.shard][name] for p in by_name[var].pieces]
            out[str(i)] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        else:
            holders = [k for k in keyed if name in k]
            if not holders:
                raise ValueError(f"no shard holds optimizer variable {name!r}")
            out[str(i)] = holders[0][name]
    return out


def split_store(
    placement: Placement,
    layout: Sequence[tuple[str, str, str]],
    store: Mapping[str, np.ndarray],
    shard_names: Sequence[Sequence[str]],
) -> list[dict[str, np.ndarray]]:
    """Per shard: its store (keys "0", "1", ... in its own order) cut from a whole-job store."""
    by_name = placement.by_name()
    values: dict[str, tuple[np.ndarray, str]] = {}
    for i, (name, kind, var) in enumerate(layout):
        values[name] = (np.asarray(store[str(i)]), var if kind == "slot" else "")
    out = []
    for shard, names in enumerate(shard_names):
        mine: dict[str, np.ndarray] = {}
        for k, name in enumerate(names):
            value, var = values[name]
            if var:
                p = by_name[var].piece_on(shard)
                assert p is not None
                value = value[p.row_start : p.row_stop] if by_name[var].shape else value
            mine[str(k)] = value
        out.append(mine)
    return out
