"""Where each variable of a sharded job lives, and how arrays are cut into pieces and put back.

Shared by the client and the server (it needs only NumPy).

``place(specs, num_shards)`` is a pure, deterministic function of the variable list (names,
shapes, dtypes in build order), the shard count and the minimum piece size; every shard and
every client computing it gets the same answer, and the job records it (``Placement.to_json``)
with its config so a checkpoint says how its pieces were cut.

The rule, balanced by bytes:

1. Lay the variables end to end in build order on a line of ``total`` bytes and cut the line at
   ``total * i / num_shards`` for ``i = 1 .. num_shards - 1``: shard ``i`` gets the bytes
   between cut ``i`` and cut ``i + 1``.
2. A variable that a cut falls into is split at the row (axis-0) boundary nearest the cut, if
   it can be split: it has at least two rows, and both resulting pieces hold at least
   ``min_piece_bytes`` (TF's ``MinSizePartitioner``: 256 KiB by default). Otherwise the cut
   moves to the variable's nearer end, so a small variable stays whole on one shard.

Each shard therefore holds a contiguous run of the build order, a split variable's pieces are
contiguous row ranges on consecutive shards, and every shard's bytes are within one row (or one
small variable) of ``total / num_shards``. Where a split falls inside the tree of NumPy's
pairwise sum does not matter: ``pairwise.combine`` rebuilds the exact norm from any row
boundary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any

import numpy as np

DEFAULT_MIN_PIECE_BYTES = 256 << 10

Spec = tuple[str, tuple[int, ...], Any]  # (name, shape, dtype)


@dataclass(frozen=True)
class PieceSpec:
    """Rows ``[row_start, row_stop)`` of a variable, held by ``shard``."""

    shard: int
    row_start: int
    row_stop: int


@dataclass(frozen=True)
class VariablePlacement:
    name: str
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[PieceSpec, ...]  # in row order

    @property
    def row_size(self) -> int:
        """Elements per row of axis 0 (all elements for a scalar)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) if self.shape else 1

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def split(self) -> bool:
        return len(self.pieces) > 1

    def piece_shape(self, piece: PieceSpec) -> tuple[int, ...]:
        if not self.shape:
            return ()
        return (piece.row_stop - piece.row_start, *self.shape[1:])

    def element_range(self, piece: PieceSpec) -> tuple[int, int]:
        """The piece's flat element range ``[start, stop)`` in the whole variable (C order)."""
        if not self.shape:
            return 0, 1
        return piece.row_start * self.row_size, piece.row_stop * self.row_size

    def piece_on(self, shard: int) -> PieceSpec | None:
        for p in self.pieces:
            if p.shard == shard:
                return p
        return None


@dataclass(frozen=True)
class Placement:
    num_shards: int
    min_piece_bytes: int
    variables: tuple[VariablePlacement, ...]

    def on_shard(self, shard: int) -> list[tuple[VariablePlacement, PieceSpec]]:
        """The pieces one shard holds, in build order."""
        out = []
        for v in self.variables:
            p = v.piece_on(shard)
            if p is not None:
                out.append((v, p))
        return out

    def shard_bytes(self) -> list[int]:
        """Bytes of model variables per shard (optimizer slots scale with them)."""
        out = [0] * self.num_shards
        for v in self.variables:
            item = np.dtype(v.dtype).itemsize
            for p in v.pieces:
                a, b = v.element_range(p)
                out[p.shard] += (b - a) * item
        return out

    def imbalance(self) -> float:
        """max / mean bytes per shard (1.0 is perfect)."""
        sizes = self.shard_bytes()
        mean = sum(sizes) / len(sizes)
        return max(sizes) / mean if mean else 1.0

    def by_name(self) -> dict[str, VariablePlacement]:
        return {v.name: v for v in self.variables}

    def to_json(self) -> dict[str, Any]:
        return {
            "num_shards": self.num_shards,
            "min_piece_bytes": self.min_piece_bytes,
            "variables": [
                {
                    "name": v.name,
                    "shape": list(v.shape),
                    "dtype": v.dtype,
                    "pieces": [[p.shard, p.row_start, p.row_stop] for p in v.pieces],
                }
                for v in self.variables
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> Placement:
        if isinstance(data, str):
            data = json.loads(data)
        return cls(
            num_shards=int(data["num_shards"]),
            min_piece_bytes=int(data["min_piece_bytes"]),
            variables=tuple(
                VariablePlacement(
                    name=v["name"],
                    shape=tuple(int(d) for d in v["shape"]),
                    dtype=str(v["dtype"]),
                    pieces=tuple(PieceSpec(int(s), int(a), int(b)) for s, a, b in v["pieces"]),
                )
                for v in data["variables"]
            ),
        )


def place(specs: Sequence[Spec], num_shards: int, min_piece_bytes: int = DEFAULT_MIN_PIECE_BYTES) -> Placement:
    """Place ``specs`` (name, shape, dtype in build order) on ``num_shards`` shards; see the module doc."""
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"`num_shards` must be an integer >= 1. Received: num_shards={num_shards!r}")
    if min_piece_bytes < 1:
        raise ValueError(f"`min_piece_bytes` must be >= 1. Received: min_piece_bytes={min_piece_bytes!r}")
    norm = [(str(n), tuple(int(d) for d in s), np.dtype(dt)) for n, s, dt in specs]
    sizes = [int(np.prod(s, dtype=np.int64)) * dt.itemsize for _, s, dt in norm]
    total = sum(sizes)
    cuts = [total * i / num_shards for i in range(1, num_shards)]

    variables = []
    begin = 0  # byte offset of the current variable on the line
    shard = 0  # the shard the line is on at ``begin``
    for (name, shape, dtype), nbytes in zip(norm, sizes):
        end = begin + nbytes
        rows = shape[0] if shape else 1
        row_bytes = nbytes // rows if rows else 0
        pieces: list[PieceSpec] = []
        row = 0  # first row not placed yet
        # Every cut inside (begin, end) may start a new piece; the shard advances at each cut.
        while shard < num_shards - 1 and cuts[shard] < end:
            cut = cuts[shard]
            if cut <= begin:  # a cut at or before this variable's start: it starts the next shard
                shard += 1
                continue
            split_row = int(round((cut - begin) / row_bytes)) if row_bytes else 0
            left = (split_row - row) * row_bytes
            right = (rows - split_row) * row_bytes
            if rows >= 2 and row < split_row < rows and left >= min_piece_bytes and right >= min_piece_bytes:
                pieces.append(PieceSpec(shard, row, split_row))
                row = split_row
                shard += 1
                continue
            # Not splittable here: the variable (what is left of it) goes to the side holding
            # most of its bytes.
            rest_begin = begin + row * row_bytes
            if cut - rest_begin < end - cut and row == 0:
                shard += 1  # most of it lies after the cut: it starts on the next shard
                continue
            break  # most of it lies before the cut: it ends on this shard
        pieces.append(PieceSpec(shard, row, rows))
        variables.append(VariablePlacement(name, shape, dtype.name, tuple(pieces)))
        begin = end
    return Placement(num_shards, int(min_piece_bytes), tuple(variables))


# ---------------------------------------------------------------- cutting and assembling
#
# Row ranges along axis 0. A row-sparse gradient keeps, per shard, the rows that fall in its
# range (in their original order, indices made local); a shard whose piece no row hits still
# receives an empty slice, so "this variable has a gradient" is the same on every shard.


def _is_row_sparse(g: Any) -> bool:
    return isinstance(g, tuple) and getattr(g, "_fields", None) == ("indices", "values")


def split_values(placement: Placement, values: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    """Per shard: name -> its rows of each variable in ``values`` (views where possible)."""
    out: list[dict[str, np.ndarray]] = [{} for _ in range(placement.num_shards)]
    by_name = placement.by_name()
    for name, value in values.items():
        v = by_name[name]
        arr = np.asarray(value)
        for p in v.pieces:
            out[p.shard][name] = arr[p.row_start : p.row_stop] if (v.shape and v.split) else arr
    return out


def split_gradients(placement: Placement, grads: Mapping[str, Any]) -> list[list[tuple[str, Any]]]:
    """Per shard: [(name, slice)] in build order; None stays None on every piece's shard.

    A row-sparse gradient (a NamedTuple with fields ``indices`` and ``values``) is cut into the
    same type.
    """
    out: list[list[tuple[str, Any]]] = [[] for _ in range(placement.num_shards)]
    for v in placement.variables:
        if v.name in grads:
            for shard, piece in split_gradient(v, grads[v.name]):
                out[shard].append((v.name, piece))
    return out


def split_gradient(v: VariablePlacement, g: Any) -> list[tuple[int, Any]]:
    """(shard, slice) of one variable's gradient ``g``, one per piece (see ``split_gradients``)."""
    out: list[tuple[int, Any]] = []
    for p in v.pieces:
        if g is None:
            out.append((p.shard, None))
        elif _is_row_sparse(g):
            if not v.split:
                out.append((p.shard, g))
                continue
            idx = np.asarray(g.indices)
            mask = (idx >= p.row_start) & (idx < p.row_stop)
            out.append((p.shard, type(g)((idx[mask] - p.row_start).astype(np.int64), np.asarray(g.values)[mask])))
        else:
            arr = np.asarray(g) if not hasattr(g, "__cuda_array_interface__") else g
            out.append((p.shard, arr[p.row_start : p.row_stop] if (v.shape and v.split) else arr))
    return out


def assemble(placement: Placement, pieces: Any, names: Any = ()) -> dict[str, np.ndarray]:
    """name -> whole array from every shard's pieces, in build order (all, or ``names``)."""
    wanted = set(names)
    out = {}
    for v in placement.variables:
        if wanted and v.name not in wanted:
            continue
        parts = [np.asarray(pieces[p.shard][v.name]) for p in v.pieces]
        out[v.name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    return out


def assemble_store(placement: Placement, layout: Any, shard_stores: Any) -> dict[str, np.ndarray]:
    """The single-server Keras store from every shard's (store, optimizer variable names).

    ``layout``: the whole job's optimizer variables in Keras's order, as (name, kind, variable
    name or "") with kind "slot" for per-variable slots.
    """
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


def split_store(placement: Placement, layout: Any, store: Mapping[str, Any], shard_names: Any) -> list[dict[str, np.ndarray]]:
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
                v = by_name[var]
                p = v.piece_on(shard)
                assert p is not None
                value = value[p.row_start : p.row_stop] if (v.shape and v.split) else value
            mine[str(k)] = value
        out.append(mine)
    return out
