"""One optimizer's state on one shard: its pieces, staged pushes, and the ordered event log.

A shard never decides anything. Workers *stage* their slices of a push here (kept under the
push's (worker id, request id) until the leader decides, or until ``staging_ttl`` passes);
the leader then drives numbered *events*, strictly one after the other (``version``):

* ``prepare(v, keys, combine)``: load the staged slices of push(es) ``keys`` (a sync round's
  pushes are summed in worker-id order, as a single server does), and report this shard's
  non-finite counts, which variables have a gradient and, for a clipped step, the unit sums
  of ``pairwise``. Nothing changes but the gradient staging buffer.
* ``commit(v, action, decision)``: ``apply`` the prepared step with the leader's clipping
  decision, or ``bump`` the version without a step (a sync round that skipped). A repeated
  commit of the last event is answered again (the leader retries a commit whose reply was
  lost); an event out of order is refused.
* ``mutate(v, op, ...)``: assignments, learning rate, store loads, EMA finalize: ordered events
  too.

Each shard's version therefore moves exactly as the leader's, and every shard takes the same
step sequence: iterations, schedules, accumulation and EMA overwrites stay in lockstep.

``incarnation`` is a random id per process (and per restore): the leader notices a shard that
restarted, since a restarted shard lost its staged pushes and its prepared step.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from adamax_server.coordination.sequencing import describe_specs, spec_mismatch
from adamax_server.coordination.stats import GradientStats
from adamax_server.coordination.stats import non_finite_counts as _non_finite_counts
from adamax_server.coordination.stats import push_stats as _gradient_stats

from adamax_server.optim.engine import RowSparseGradient
from adamax_server.errors import FailedPrecondition, InvalidArgument, NotFound, NotStaged, RoundAborted, Unavailable, WaitTimeout
from adamax_server.sharding.gradient_sets import GradientSets, Taken
from adamax_server.sharding.placement import DEFAULT_MIN_PIECE_BYTES, Placement, place
from adamax_server.sharding.shard_engine import ClipDecision, PreparedStep, ShardEngine
from adamax_server.sharding.staged import (
    Gradient, PrepareReply, PreparedRestore, PushKey, ShardSnapshot, StagedPush, combine_round, load_store, owned_copy,
    widened,
)  # fmt: skip

__all__ = ["PrepareReply", "PreparedRestore", "ShardHost", "ShardSnapshot", "StagedPush"]


class ShardHost:
    """See the module docstring. Thread safe; every engine call is under ``_cond``."""

    def __init__(
        self,
        key: str,
        shard_index: int,
        num_shards: int,
        engine_factory: Callable[[Mapping[str, Any]], ShardEngine],
        config: Mapping[str, Any],
        policy: Mapping[str, Any],
        *,
        min_piece_bytes: int = DEFAULT_MIN_PIECE_BYTES,
        staging_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = key
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.config = dict(config)
        self.policy = dict(policy)
        self.min_piece_bytes = min_piece_bytes
        self.staging_ttl = staging_ttl
        self._engine_factory = engine_factory
        self._clock = clock
        self._cond = threading.Condition()
        self._engine = engine_factory(self.config)
        self.placement: Placement | None = None
        self._specs: list[tuple[str, tuple[int, ...], str]] = []
        self.version = 0
        self.incarnation = uuid.uuid4().hex
        self._staged: dict[PushKey, StagedPush] = {}
        self._prepared: tuple[int, PreparedStep | None, list[PushKey]] | None = None
        self._last_commit: tuple[int, str, tuple[int, int]] | None = None
        self._aborts = 0
        self._last_abort = ""
        self._closed = False
        self._held: tuple[Placement, int] | None = None  # (placement, this shard's bytes in it)
        self._sets = GradientSets(keep=int(self.policy.get("num_workers") or 1) + 2)
        self._prepared_stats: dict[str, GradientStats] = {}
        self._specs_cache: _Specs | None = None
        # Metrics of each applied step: (seconds, its gradients' statistics, iterations after it).
        self.on_apply: Callable[[float, Mapping[str, GradientStats], int], None] | None = None

    # -------------------------------------------------------------- build

    @property
    def built(self) -> bool:
        return self._engine.built

    def build(self, specs: Sequence[tuple[str, Sequence[int], Any]], pieces: Mapping[str, np.ndarray]) -> Placement:
        """Build this shard's engine with its pieces; ``specs`` is the whole job's variable list."""
        norm = [(str(n), tuple(int(d) for d in s), np.dtype(dt).name) for n, s, dt in specs]
        with self._cond:
            self._require_open()
            if self._engine.built:
                if norm != self._specs:
                    raise FailedPrecondition(
                        f"optimizer '{self.key}' is already built with different variables "
                        f"({spec_mismatch(self._specs, norm)}): existing {describe_specs(self._specs)}, received "
                        f"{describe_specs(norm)}. Attach without variables to use the existing ones, or use "
                        "another name (or if_exists='replace')."
                    )
                assert self.placement is not None
                return self.placement
            placement = place(norm, self.num_shards, self.min_piece_bytes)
            mine = placement.on_shard(self.shard_index)
            values = {}
            for v, p in mine:
                value = pieces.get(v.name)
                if value is None:
                    raise InvalidArgument(f"shard {self.shard_index} needs rows {p.row_start}:{p.row_stop} of '{v.name}'")
                value = np.asarray(value)
                if tuple(value.shape) != v.piece_shape(p) or value.dtype != np.dtype(v.dtype):
                    raise InvalidArgument(
                        f"piece of '{v.name}' for shard {self.shard_index} has shape {value.shape} and dtype "
                        f"{value.dtype}; expected {v.piece_shape(p)} {v.dtype}"
                    )
                values[v.name] = value
            extra = set(pieces) - set(values)
            if extra:
                raise InvalidArgument(f"shard {self.shard_index} does not hold {sorted(extra)}")
            self._engine.build(values)
            self._sets.reset()
            self._engine.set_piece_ranges({v.name: (v.size, *v.element_range(p)) for v, p in mine if v.split})
            self.placement = placement
            self._specs = norm
            self.version = 0
            self._cond.notify_all()
            return placement

    def exclude_from_weight_decay(self, var_list: Sequence[str], var_names: Sequence[str]) -> None:
        with self._cond:
            self._require_open()
            self._engine.exclude_from_weight_decay(var_list=list(var_list) or None, var_names=list(var_names) or None)

    # -------------------------------------------------------------- staging

    def stage(self, worker_id: str, request_id: str, grads: Sequence[tuple[str, Gradient]]) -> dict[str, int]:
        """Keep a push's slices until the leader decides; returns its non-finite counts.

        Checking, statistics and widening run outside the lock (a full pass over the gradients
        when the receive did not fold the statistics in): steps go on meanwhile. A refused push
        gives back the gradient set it was received into."""
        taken = list(getattr(grads, "gradient_sets", None) or [])
        try:
            with self._cond:
                self._require_built()
                engine = self._engine
                shapes = self._spec_maps().shapes
            out = self._checked(grads, shapes)
            # Statistics folded into the receive's copy (bulk channel) are not computed again.
            present = {n: g for n, g in out.items() if g is not None}
            stats = _gradient_stats(present, getattr(grads, "stats", None))
            counts = _non_finite_counts(stats)
            for name, g in out.items():  # narrowed on the wire (gradient_wire_dtype): widen, exactly
                if g is not None and getattr(g, "dtype", None) != shapes[name][1]:
                    out[name] = widened(g, shapes[name][1])
            with self._cond:
                self._require_built()
                if self._engine is not engine:  # restored meanwhile: the slices may not fit any more
                    raise NotStaged(f"{self._where} was restored while push {request_id!r} was staged; send it again")
                self._expire()
                key = (worker_id, request_id)
                self._release(key)  # a re-sent stage replaces the entry
                self._staged[key] = StagedPush(out, counts, self._clock() + self.staging_ttl, taken, stats)
                return counts
        except BaseException:
            if taken:
                self.forget_receive(taken)
            raise

    def _checked(self, grads: Sequence[tuple[str, Gradient]], shapes: Mapping[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, Gradient]:
        out: dict[str, Gradient] = {}
        for name, g in grads:
            spec = shapes.get(name)
            if spec is None:
                raise NotFound(f"{self._where} holds no piece of '{name}'")
            if name in out:
                raise InvalidArgument(f"The push carries two gradients for variable '{name}'.")
            shape = spec[0]
            if g is None or (type(g) is np.ndarray and g.shape == shape):
                out[name] = g
                continue
            if isinstance(g, RowSparseGradient):
                idx = np.asarray(g.indices)
                if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= shape[0]):
                    raise InvalidArgument(f"row-sparse slice of '{name}' has rows outside this shard's piece")
                if tuple(np.shape(g.values))[1:] != shape[1:]:
                    raise InvalidArgument(f"row-sparse slice of '{name}' has values of shape {np.shape(g.values)}")
            elif tuple(np.shape(g)) != shape:
                raise InvalidArgument(f"slice of '{name}' has shape {np.shape(g)}; this shard's piece is {shape}")
            out[name] = g
        return out

    def receive_lookup(self, taken: Taken) -> Any:
        """Where a push for this shard may be received: a pooled gradient set of the engine (kept
        with the staged push, swapped in at ``prepare``; see ``sharding.gradient_sets``), recorded
        in ``taken``; None: buffers of its own."""
        with self._cond:
            if self._closed:
                return None
            return self._sets.lookup(self._engine, taken, idle=self._prepared is None, dtypes=self._spec_maps().dtypes)

    def forget_receive(self, taken: Taken) -> None:
        """A push received through ``receive_lookup`` failed before it was staged: its set is free."""
        with self._cond:
            self._sets.release(self._engine, taken)

    def _release(self, key: PushKey) -> None:
        staged = self._staged.pop(key, None)
        if staged is not None:
            self._sets.release(self._engine, staged.taken)

    def check(self, keys: Sequence[PushKey]) -> dict[str, int]:
        """Non-finite counts of staged pushes (summed), or NotFound if one is not staged."""
        with self._cond:
            total: dict[str, int] = {}
            for key in keys:
                staged = self._staged_push(key)
                for n, c in staged.non_finite.items():
                    total[n] = total.get(n, 0) + c
            return total

    def drop(self, keys: Sequence[PushKey], abort_message: str = "") -> None:
        """Forget staged pushes; with ``abort_message`` a sync round was aborted (waiters learn it)."""
        with self._cond:
            for key in keys:
                self._release((key[0], key[1]))
            if abort_message:
                self._aborts += 1
                self._last_abort = abort_message
                self._cond.notify_all()

    def staged_keys(self) -> list[PushKey]:
        with self._cond:
            return sorted(self._staged)

    def _staged_push(self, key: Sequence[str]) -> StagedPush:
        staged = self._staged.get((key[0], key[1]))
        if staged is None:
            raise NotStaged(
                f"push {key[1]!r} of worker '{key[0]}' is not staged on {self._where} "
                "(never sent, expired, or the server restarted); send it again"
            )
        return staged

    def _expire(self) -> None:
        now = self._clock()
        held = set(self._prepared[2]) if self._prepared else set()
        for key in [k for k, s in self._staged.items() if s.expires < now and k not in held]:
            self._release(key)

    # -------------------------------------------------------------- events

    def _require_next(self, version: int) -> None:
        if version != self.version + 1:
            raise FailedPrecondition(
                f"shard {self.shard_index} is at version {self.version}; it cannot take event {version}",
                current_version=self.version,
            )

    def prepare(self, version: int, keys: Sequence[PushKey], combine: bool, aggregation: str,
                learning_rate: float | None = None) -> PrepareReply:
        """``learning_rate``: the job's, when one was set (the leader's; see ``set_learning_rate``)."""
        with self._cond:
            self._require_built()
            self._require_next(version)
            if learning_rate is not None and float(self._engine.learning_rate) != float(learning_rate):
                self._engine.learning_rate = learning_rate
            keys = [(k[0], k[1]) for k in keys]
            pushes = [self._staged_push(k) for k in keys]
            if combine:  # summed straight into the engine's staging buffers (none a push holds)
                engine = self._engine
                self._sets.unshare(engine)
                grads, known = combine_round(engine.variable_specs, [p.grads for p in pushes], aggregation,
                                             engine.gradient_buffer if engine.host_staging else lambda name: None)
                stats = _gradient_stats({n: g for n, g in grads.items() if g is not None}, known)
                non_finite = _non_finite_counts(stats)
            else:
                grads = dict(pushes[0].grads)
                stats, non_finite = pushes[0].stats, dict(pushes[0].non_finite)
            self._prepared_stats = stats
            present = [n for n in self._spec_maps().names if grads.get(n) is not None]
            if non_finite:
                self._prepared = (version, None, keys)
                return PrepareReply(-1, present, non_finite)
            # The push's own gradient set becomes the staging buffers (no copy); otherwise the
            # gradients are copied into buffers that no staged push owns (a round's sum already is).
            if not combine and not self._sets.swap_in(self._engine, pushes[0].taken):
                self._sets.unshare(self._engine)
            prepared = self._engine.prepare_step({n: grads[n] for n in present})
            self._prepared = (version, prepared, keys)
            return PrepareReply(prepared.clip_mode, present, {}, prepared.unit_sums)

    def abort(self, version: int) -> None:
        with self._cond:
            if self._prepared is not None and self._prepared[0] == version:
                self._prepared = None

    def commit(self, version: int, action: str, decision: ClipDecision | None = None) -> tuple[int, int]:
        """Apply (``action="apply"``) or skip (``"bump"``) event ``version``; returns (version, iterations)."""
        with self._cond:
            self._require_built()
            if self._last_commit is not None and self._last_commit[0] == version and version == self.version:
                return self._last_commit[2]  # a retried commit whose reply was lost
            self._require_next(version)
            if self._prepared is None or self._prepared[0] != version:
                raise FailedPrecondition(
                    f"shard {self.shard_index} has no prepared step for event {version} (it restarted or "
                    "the step was aborted)",
                    current_version=self.version,
                )
            _, prepared, keys = self._prepared
            if action == "apply":
                if prepared is None or decision is None:
                    raise FailedPrecondition(f"event {version} cannot be applied: its gradients are not finite")
                start = time.perf_counter()
                self._engine.finish_step(prepared, decision)
                if self.on_apply is not None:
                    self.on_apply(time.perf_counter() - start, self._prepared_stats, self._engine.iterations)
            elif action != "bump":
                raise InvalidArgument(f"unknown commit action {action!r}")
            for key in keys:
                self._release(key)
            self._prepared = None
            self.version = version
            reply = (self.version, self._engine.iterations)
            self._last_commit = (version, action, reply)
            self._cond.notify_all()
            return reply

    def set_learning_rate(self, value: float) -> None:
        """The job's learning rate, set by the leader at once (not an event: no version)."""
        with self._cond:
            self._engine.learning_rate = value

    def mutate(self, version: int, op: str, args: Mapping[str, Any]) -> tuple[int, int]:
        """An ordered change of state outside a step (see the module docstring)."""
        with self._cond:
            self._require_built()
            if self._last_commit is not None and self._last_commit[0] == version and version == self.version:
                return self._last_commit[2]
            self._require_next(version)
            engine = self._engine
            if op == "assign":
                name = args["name"]
                if name in args.get("pieces", {}):
                    getattr(engine, args["kind"])(name, args["pieces"][name])
                elif args.get("scalar") is not None:
                    getattr(engine, args["kind"])(name, args["scalar"])
            elif op == "finalize":
                engine.finalize_variable_values()
            elif op == "learning_rate":
                engine.learning_rate = args["value"]
            elif op == "load_store":
                load_store(engine, args["store"])
            elif op == "set_weights":  # Keras's optimizer set_weights (a one-shard job's whole list)
                engine.set_weights(list(args["weights"]))
            else:
                raise InvalidArgument(f"unknown shard operation {op!r}")
            self._prepared = None
            self.version = version
            reply = (self.version, engine.iterations)
            self._last_commit = (version, op, reply)
            self._cond.notify_all()
            return reply

    # -------------------------------------------------------------- reads

    def wait_for_version(self, min_version: int, timeout: float | None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            aborts = self._aborts
            while self.version < min_version:
                self._require_open()
                if self._aborts != aborts:
                    raise RoundAborted(self._last_abort + "; push again for the current version", current_version=self.version)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WaitTimeout(
                        f"{self._where} did not reach version {min_version} in time; current version is {self.version}",
                        current_version=self.version,
                    )
                self._cond.wait(remaining)
            return self.version

    def pull(self, names: Sequence[str] = (), min_version: int = 0, timeout: float | None = None) -> tuple[int, int, dict[str, np.ndarray]]:
        """(version, iterations, this shard's pieces: all, or those of ``names`` it holds)."""
        if min_version:
            self.wait_for_version(min_version, timeout)
        with self._cond:
            self._require_built()
            weights = self._engine.trainable_variables
            if names:
                weights = {n: weights[n] for n in names if n in weights}
            return self.version, self._engine.iterations, weights

    @property
    def iterations(self) -> int:
        with self._cond:
            return self._engine.iterations

    def piece_specs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """(name, shape, dtype) of the pieces this shard holds, build order ([] before build)."""
        with self._cond:
            return list(self._spec_maps().specs) if self._engine.built else []

    def piece_shapes(self) -> Mapping[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (shape, dtype) of this shard's pieces ({} before build; shared: do not change)."""
        with self._cond:
            return self._spec_maps().shapes

    def piece_rows(self) -> Mapping[str, int]:
        """name -> rows (first dimension; 0 for a scalar) of this shard's pieces (shared: do not change)."""
        with self._cond:
            return self._spec_maps().rows

    def read_pieces_into(self, outs: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """Copy this shard's pieces into ``outs`` (name -> array of the piece's shape and dtype),
        under the lock: one consistent version; returns (version, iterations)."""
        with self._cond:
            self._require_built()
            self._engine.read_variables_into(outs)  # straight from the engine's buffers
            return self.version, self._engine.iterations

    def save_own_variables(self) -> tuple[int, dict[str, np.ndarray], list[str]]:
        """(version, this shard's store, its optimizer variable names in store order)."""
        with self._cond:
            self._require_built()
            store: dict[str, np.ndarray] = {}
            self._engine.save_own_variables(store)
            return self.version, store, list(self._engine.variables)

    def store_names(self) -> list[str]:
        """This shard's optimizer variable names, in its store's order."""
        with self._cond:
            return [ov.name for ov in self._engine._opt_vars]

    def status(self) -> dict[str, Any]:
        with self._cond:
            sizes = self.placement.shard_bytes() if self.placement else []
            return {
                "shard_index": self.shard_index,
                "num_shards": self.num_shards,
                "version": self.version,
                "iterations": self._engine.iterations,
                "incarnation": self.incarnation,
                "built": self._engine.built,
                "bytes": sizes[self.shard_index] if sizes else 0,
                "staged": len(self._staged),
                "learning_rate": float(self._engine.learning_rate),
            }

    def gauges(self) -> tuple[int, int, int]:
        """(bytes this shard holds, version, staged pushes) for the metrics, read without the
        lock: a stage's reply must not wait for metrics behind a step that holds it."""
        placement, held = self.placement, self._held
        if placement is None:
            return 0, self.version, len(self._staged)
        if held is None or held[0] is not placement:
            held = self._held = (placement, placement.shard_bytes()[self.shard_index])
        return held[1], self.version, len(self._staged)

    def piece_names(self) -> set[str] | None:
        """Names of the variables this shard holds a piece of (None before build)."""
        with self._cond:
            return set(self._spec_maps().names) if self._engine.built else None

    def engine_settings(self) -> tuple[dict[str, Any], dict[str, list[str]]]:
        """(the engine's current Keras config, its weight-decay exclusions): the job's, on every shard."""
        with self._cond:
            return self._engine.get_config(), self._engine.weight_decay_exclusions

    def stateless_apply(self, optimizer_variables: Sequence[Any], grads: Sequence[Gradient],
                        trainable_variables: Sequence[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:  # fmt: skip
        """Keras's ``stateless_apply`` with this shard's engine (its state does not change)."""
        with self._cond:
            self._require_built()
            return self._engine.stateless_apply(list(optimizer_variables), list(grads), list(trainable_variables))

    def device_receiver(self) -> Any:
        """A GPU engine's receive helper (gradients go to the device as they arrive), or None."""
        with self._cond:
            return self._engine.device_receiver() if self._engine.built else None

    def read_engine(self, read: Callable[[ShardEngine], Any]) -> Any:
        """``read(engine)`` under the lock (status and snapshots of a one-shard job)."""
        with self._cond:
            return read(self._engine)

    # -------------------------------------------------------------- checkpoints

    def snapshot(self, keep: Sequence[PushKey] = ()) -> ShardSnapshot:
        """Copy this shard's state; ``keep``: staged pushes of the open sync round to save too."""
        with self._cond:
            self._require_open()
            engine = self._engine
            store: dict[str, np.ndarray] = {}
            if engine.built:
                engine.save_own_variables(store)
            return ShardSnapshot(
                key=self.key,
                shard_index=self.shard_index,
                num_shards=self.num_shards,
                config=engine.get_config(),
                policy=dict(self.policy),
                exclusions=engine.weight_decay_exclusions,
                placement=self.placement.to_json() if self.placement else None,
                version=self.version,
                iterations=engine.iterations,
                variables=engine.trainable_variables if engine.built else {},
                store=store,
                staged={f"{k[0]}\x00{k[1]}": owned_copy(self._staged[(k[0], k[1])].grads) for k in keep if (k[0], k[1]) in self._staged},
                store_names=[ov.name for ov in engine._opt_vars],
            )

    def restore(self, snap: ShardSnapshot) -> tuple[int, int]:
        """Replace all state with ``snap`` (this shard's part of one cut)."""
        return self.activate_restore(self.prepare_restore(snap))

    def prepare_restore(self, snap: ShardSnapshot) -> PreparedRestore:
        """Phase 1 of a restore: check ``snap`` and build its engine; nothing of this host changes.

        Everything that can fail (a part that does not fit, a store that does not load) fails
        here, so a job-wide restore can stop before any shard changed (``sharding.restore``).
        """
        if snap.shard_index != self.shard_index or snap.num_shards != self.num_shards:
            raise InvalidArgument(
                f"snapshot is shard {snap.shard_index} of {snap.num_shards}; this is shard "
                f"{self.shard_index} of {self.num_shards} (re-split the assembled job instead)"
            )
        engine = self._engine_factory(snap.config)
        ex = snap.exclusions
        if ex.get("var_list") or ex.get("var_names"):
            engine.exclude_from_weight_decay(var_list=ex.get("var_list") or None, var_names=ex.get("var_names") or None)
        placement = Placement.from_json(snap.placement) if snap.placement else None
        if placement is not None:
            engine.build(dict(snap.variables))
            mine = placement.on_shard(self.shard_index)
            engine.set_piece_ranges({v.name: (v.size, *v.element_range(p)) for v, p in mine if v.split})
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                engine.load_own_variables(snap.store)
        staged = {
            tuple(k.split("\x00", 1)): (g, _non_finite_counts(_gradient_stats({n: x for n, x in g.items() if x is not None})))
            for k, g in snap.staged.items()
        }
        return PreparedRestore(snap, engine, placement, staged)  # type: ignore[arg-type]

    def activate_restore(self, prepared: PreparedRestore) -> tuple[int, int]:
        """Phase 2 of a restore: swap the prepared state in (nothing left that can fail)."""
        snap, engine, placement = prepared.snap, prepared.engine, prepared.placement
        with self._cond:
            self._engine = engine
            self.placement = placement
            self._specs = [(v.name, v.shape, v.dtype) for v in placement.variables] if placement else []
            self.config = dict(snap.config)
            self.policy = dict(snap.policy)
            self.version = snap.version
            self.incarnation = uuid.uuid4().hex
            now = self._clock()
            self._staged = {k: StagedPush(g, c, now + self.staging_ttl) for k, (g, c) in prepared.staged.items()}
            self._sets.reset()
            self._prepared = None
            self._last_commit = None
            self._aborts += 1
            self._last_abort = f"optimizer '{self.key}' was restored from a checkpoint"
            self._cond.notify_all()
            return self.version, engine.iterations

    def state_version(self) -> tuple[int, int, str]:
        """(version, iterations, incarnation): what the leader compares when it (re)starts."""
        with self._cond:
            return self.version, self._engine.iterations, self.incarnation

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _spec_maps(self) -> _Specs:
        """The engine's variables in the forms every push asks for, made once per engine (its
        variables never change once built; a restore brings a new engine)."""
        engine = self._engine
        cached = self._specs_cache
        if cached is None or cached.engine is not engine or cached.built != engine.built:
            cached = self._specs_cache = _Specs(engine)
        return cached

    @property
    def _where(self) -> str:
        """This shard in messages; a one-shard job's shard is simply the optimizer."""
        return f"optimizer '{self.key}'" if self.num_shards == 1 else f"shard {self.shard_index} of optimizer '{self.key}'"

    def _require_open(self) -> None:
        if self._closed:
            raise Unavailable(f"optimizer '{self.key}' was deleted or the server is shutting down")

    def _require_built(self) -> None:
        self._require_open()
        if not self._engine.built:
            raise FailedPrecondition(
                f"{self._where} is not built yet; call build(variables) "
                "with the model variables' names and initial values first",
                current_version=self.version,
            )


class _Specs:
    """An engine's variables: (name, shape, dtype) in build order, and by name."""

    def __init__(self, engine: ShardEngine) -> None:
        self.engine = engine
        self.built = engine.built
        self.specs = [(n, tuple(shape), np.dtype(d)) for n, shape, d in engine.variable_specs] if engine.built else []
        self.names = [n for n, _, _ in self.specs]
        self.shapes = {n: (shape, d) for n, shape, d in self.specs}
        self.dtypes = {n: d for n, _, d in self.specs}
        self.rows = {n: (shape[0] if shape else 0) for n, shape, _ in self.specs}
