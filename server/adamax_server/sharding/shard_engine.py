"""The Adamax engine of one shard: Keras's step over this shard's pieces, in two halves.

A shard's engine is an ordinary ``Adamax`` built with the pieces this shard holds, under the
variables' own names (a shard holds at most one piece of a variable), so slot names, weight
decay exclusions and the store's layout are those of the whole job restricted to the shard.
Every element-wise part of Keras's step (loss scale, accumulation, clipvalue, weight decay,
the moments, EMA) is then the same on a piece as on the whole variable. Only the norms of
``clipnorm`` and ``global_clipnorm`` need the other shards, so a step is split in two:

* ``prepare_step(present)``: stage the gradients, decide the step's kind (accumulation,
  clipping, EMA overwrite: from the same step counter on every shard) and, when it clips by
  norm, compute this shard's *unit sums* (``pairwise.units``) of every present piece;
* ``finish_step(prepared, decision)``: run the step with the clip denominators or the global
  scale the leader computed from every shard's units (``decide_clipping``), and count it.

``prepare_step`` changes no state but the gradient staging buffer, so a prepared step can be
dropped (the push is aborted) and the next one prepared instead. A shard whose pieces have no
gradient in a step still takes it (the step counter, accumulators and EMA move on every
shard), which is what a single server does for variables without a gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from adamax_server.optim.engine import Adamax
from adamax_server.optim.variables import _keras_global_scale
from adamax_server.optim.kernels.base import (
    ACC_UPDATE,
    CLIP_GLOBAL,
    CLIP_NORM,
    GroupStep,
    PairwisePlan,
)
from adamax_server.sharding import pairwise

try:
    from adamax_server.optim.kernels import cpu as _cpu
except ImportError:  # pragma: no cover
    _cpu = None


@dataclass
class PreparedStep:
    """A step whose gradients are staged and whose norms (if any) are computed."""

    present: np.ndarray  # uint8 per local variable (build order)
    acc_mode: int
    clip_mode: int
    overwrite: bool
    plans: dict[str, GroupStep]
    unit_sums: dict[str, np.ndarray] = field(default_factory=dict)  # local name -> unit sums


@dataclass(frozen=True)
class ClipDecision:
    """What the leader tells every shard for one step: per-variable denominators or one scale."""

    clip_mode: int
    denominators: dict[str, Any] = field(default_factory=dict)  # variable name -> dtype scalar
    global_scale: float = 1.0
    global_scale_dtype: str = "float32"


class ShardEngine(Adamax):
    """``Adamax`` over one shard's pieces, with the norm exchange of ``pairwise`` (see module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # local name -> (starts, lengths) of its units relative to the piece; absent: one unit.
        self._units: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._unit_plans: dict[str, tuple[PairwisePlan, np.ndarray, dict[str, slice]]] = {}

    # -------------------------------------------------------------- set-up

    def set_piece_ranges(self, ranges: Mapping[str, tuple[int, int, int]]) -> None:
        """For each split variable: (size of the whole variable, first element, stop) of this piece."""
        for name, (n, a, b) in ranges.items():
            v = self._require_var(name)
            if b - a != v.size:
                raise ValueError(f"piece of {name!r} covers {b - a} elements; the shard holds {v.size}")
            self._units[name] = pairwise.unit_arrays(n, a, b)
        self._unit_plans.clear()

    def units_of(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        v = self._require_var(name)
        got = self._units.get(name)
        if got is None:
            return np.zeros(1, np.int64), np.asarray([v.size], np.int64)
        return got

    def _unit_plan(self, gname: str) -> tuple[PairwisePlan, np.ndarray, dict[str, slice]]:
        """The pairwise plan over every unit of a dtype group (units as pseudo-segments)."""
        cached = self._unit_plans.get(gname)
        if cached is not None:
            return cached
        group = self._groups[gname]
        offsets, sizes, unit_seg = [], [], []
        where: dict[str, slice] = {}
        for v in self._vars:
            if v.group != gname:
                continue
            starts, lengths = self.units_of(v.name)
            base = int(group.table.offsets[v.seg])
            where[v.name] = slice(len(sizes), len(sizes) + len(starts))
            offsets.extend((base + starts).tolist())
            sizes.extend(lengths.tolist())
            unit_seg.extend([v.seg] * len(starts))
        plan = PairwisePlan.build(offsets, sizes)
        cached = (plan, np.asarray(unit_seg, dtype=np.int64), where)
        self._unit_plans[gname] = cached
        return cached

    # -------------------------------------------------------------- the two halves

    def prepare_step(self, grads: Mapping[str, Any]) -> PreparedStep:
        """Stage ``grads`` (local name -> array or RowSparseGradient; absent: no gradient)."""
        if not self.built:
            raise ValueError("The optimizer must be built before a step.")
        for name in grads:
            self._require_var(name)
        prepared = {v.name: self._prepare_gradient(v, grads[v.name]) for v in self._vars if grads.get(v.name) is not None}
        for v in self._vars:
            if v.name in prepared:
                self._load_gradient(v, prepared[v.name])
        self._backend.finish_staging()
        present = np.asarray([v.name in prepared for v in self._vars], dtype=np.uint8)

        acc_mode, clip_mode, iterations, lr, overwrite = self._step_modes()
        plans = {
            gname: self._group_step(group, present, acc_mode, clip_mode, iterations, lr, overwrite)
            for gname, group in self._groups.items()
        }
        out = PreparedStep(present, acc_mode, clip_mode, overwrite, plans)
        if clip_mode in (CLIP_NORM, CLIP_GLOBAL):
            for gname in self._groups:
                out.unit_sums.update(self._group_unit_sums(gname, plans[gname], present))
        return out

    def _group_unit_sums(self, gname: str, step: GroupStep, present: np.ndarray) -> dict[str, np.ndarray]:
        group = self._groups[gname]
        plan, unit_seg, where = self._unit_plan(gname)
        has_grad = step.has_grad[unit_seg].astype(np.uint8) if unit_seg.size else np.zeros(0, np.uint8)
        n_units = len(unit_seg)
        sums = np.zeros(n_units, dtype=group.dtype)
        dt = group.dtype.type
        acc_mode = ACC_UPDATE if step.acc_mode == ACC_UPDATE else 0
        if n_units and self._backend.name == "numba" and _cpu is not None and _cpu.HAVE_NUMBA:
            acc = group.buffers.get("acc")
            if acc is None:
                acc = np.zeros(1, dtype=group.dtype)
            leaf = _cpu._leaf_sums(
                group.buffers["g"], acc, plan.leaf_start, plan.leaf_len,
                bool(step.use_loss_scale), dt(step.loss_scale), acc_mode, dt(step.acc_steps),
            )  # fmt: skip
            _cpu._combine(leaf, plan.program, plan.seg_prog_start, plan.seg_prog_end, has_grad, sums)
        elif n_units and not any(v.group == gname and v.name in self._units for v in self._vars):
            # Every unit is a whole variable (a one-shard job, a GPU server's case): the backend's
            # own sum of squares per variable, on its device, as ``Adamax`` clips.
            per_variable = np.asarray(self._backend.sumsq(group, step))  # host, one per variable
            np.copyto(sums, per_variable[unit_seg].astype(group.dtype, copy=False), where=has_grad.astype(bool))
        elif n_units:
            # Any other backend: the transformed gradient on the host, summed by NumPy itself.
            g = self._backend.to_host(group.buffers["g"])
            acc = self._backend.to_host(group.buffers["acc"]) if acc_mode else None
            offs, lens = _unit_ranges(self, gname)
            for k in range(n_units):
                if not has_grad[k]:
                    continue
                sl = slice(int(offs[k]), int(offs[k] + lens[k]))
                x = g[sl]
                if step.use_loss_scale:
                    x = x / step.loss_scale
                if acc_mode:
                    x = (x + acc[sl]) / step.acc_steps
                sums[k] = np.sum(np.square(x))
        out = {}
        for v in self._vars:
            if v.group == gname and present[v.index]:
                out[v.name] = sums[where[v.name]].copy()
        return out

    def finish_step(self, prepared: PreparedStep, decision: ClipDecision) -> None:
        """Run the prepared step with the leader's clipping decision, then count it."""
        if decision.clip_mode != prepared.clip_mode:
            raise ValueError(
                f"the leader decided clip mode {decision.clip_mode} for a step this shard prepared "
                f"with clip mode {prepared.clip_mode}: the shards are not in lockstep"
            )
        for gname, group in self._groups.items():
            plan = prepared.plans[gname]
            if decision.clip_mode == CLIP_NORM:
                denom = np.full(len(group.table.sizes), _as(self.clipnorm, group.dtype), dtype=group.dtype)
                for v in self._vars:
                    if v.group == gname and prepared.present[v.index]:
                        denom[v.seg] = decision.denominators[v.name]
                plan.clip_denom = denom
            elif decision.clip_mode == CLIP_GLOBAL:
                plan.global_scale = float(decision.global_scale)
                plan.global_scale_wide = bool(np.dtype(decision.global_scale_dtype).itemsize > group.dtype.itemsize)
        for gname, group in self._groups.items():
            self._backend.step(group, prepared.plans[gname])
        self._raw_iterations += 1


def _unit_ranges(engine: ShardEngine, gname: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat (offset, length) of every unit of a group, in the unit plan's order."""
    group = engine._groups[gname]
    offs, lens = [], []
    for v in engine._vars:
        if v.group != gname:
            continue
        starts, lengths = engine.units_of(v.name)
        base = int(group.table.offsets[v.seg])
        offs.extend((base + starts).tolist())
        lens.extend(lengths.tolist())
    return np.asarray(offs, dtype=np.int64), np.asarray(lens, dtype=np.int64)


def _as(value: Any, dtype: np.dtype) -> Any:
    return np.asarray(value).astype(dtype)[()]


def decide_clipping(
    config: Mapping[str, Any],
    clip_mode: int,
    variables: Sequence[tuple[str, int, str]],
    pieces: Mapping[str, Sequence[pairwise.Piece]],
) -> ClipDecision:
    """The leader's half of a clipped step, with the operations a single engine runs.

    ``variables``: (name, element count, dtype) of the variables with a gradient this step, in
    build order; ``pieces``: every shard's unit sums of each of them.
    """
    if clip_mode not in (CLIP_NORM, CLIP_GLOBAL):
        return ClipDecision(clip_mode)
    sums = {name: pairwise.combine(size, np.dtype(dtype), pieces[name]) for name, size, dtype in variables}
    if clip_mode == CLIP_NORM:
        clipper = SimpleNamespace(clipnorm=config["clipnorm"])
        denoms = {}
        for name, _, dtype in variables:
            # Adamax._clipnorm_denominators works per element; one variable at a time is the same.
            arr = np.asarray([sums[name]], dtype=dtype)
            denoms[name] = Adamax._clipnorm_denominators(clipper, arr, np.dtype(dtype))[0]  # type: ignore[arg-type]
        return ClipDecision(clip_mode, denominators=denoms)
    if not variables:
        return ClipDecision(clip_mode)
    scale = _keras_global_scale([sums[name] for name, _, _ in variables], config["global_clipnorm"])
    return ClipDecision(clip_mode, global_scale=float(scale), global_scale_dtype=np.asarray(scale).dtype.name)
