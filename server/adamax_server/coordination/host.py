"""``OptimizerHost``: one optimizer served to many workers.

It serialises pushes under one lock, checks and applies them through the engine (async) or
collects them into sync rounds (``rounds``), answers retries from the exactly-once table
(``dedup``) and serves pulls from one copy per version. Snapshots live in ``host_snapshot``."""

from __future__ import annotations

import logging
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
from adamax_server.coordination.dedup import DedupTable
from adamax_server.coordination.host_snapshot import SnapshotMixin
from adamax_server.coordination.policy import (
    FLOAT_DTYPES,
    CoordinatorObserver,
    Gradient,
    OptimizerStatus,
    Policy,
    PullResult,
    PushResult,
    ReceiveProgress,
    StagingLookup,
    T,
    TensorMeta,
    WorkerRecord,
    WorkerStatus,
)
from adamax_server.coordination.receive_buffers import Layout, ReceiveBuffersMixin, Taken
from adamax_server.coordination.rounds import Contribution, RoundsMixin
from adamax_server.coordination.sequencing import check_step, non_finite_outcome
from adamax_server.coordination.staging import StagingMixin
from adamax_server.coordination.stats import GradientStats, non_finite_counts, non_finite_message, push_stats
from adamax_server.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RoundAborted,
    StateRestored,
    Unavailable,
    WaitTimeout,
)
from adamax_server.optim.engine import Adamax, RowSparseGradient

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------- one optimizer

class OptimizerHost(RoundsMixin, SnapshotMixin, StagingMixin, ReceiveBuffersMixin):
    """One hosted optimizer: the engine, its lock, versions, rounds and the dedup table."""

    _PULL_CACHE_KEYS = 8

    def __init__(
        self,
        key: str,
        engine: Adamax,
        initial_config: dict[str, Any],
        policy: Policy,
        *,
        dedup_capacity: int,
        observer: CoordinatorObserver | None = None,
    ) -> None:
        self.key = key
        self._observer = observer  # metrics hooks (adamax_server.ops.metrics), called under the lock
        self.policy = policy
        self.initial_config = initial_config
        self._engine = engine
        self._missing_reported: set[tuple[str, ...]] = set()  # variable sets logged without a gradient
        self._cond = threading.Condition()
        self._encode_lock = threading.Lock()
        self._version = 0
        self._dedup = DedupTable(dedup_capacity)
        self._dedup_capacity = dedup_capacity
        self._restore_epoch = 0  # bumped by restore(): pushes begun before it are rejected
        self._workers: dict[str, WorkerRecord] = {}
        self._closed = False
        self._sync = self._new_sync_round()  # the open sync round (coordination.sequencing)
        self._pull_cache: OrderedDict[tuple[str, tuple[str, ...]], PullResult[Any]] = OrderedDict()
        self._copy_pool: dict[tuple[str, tuple[str, ...]], list[dict[str, np.ndarray]]] = {}
        self._pushes_in_flight = 0  # pushes between dedup.begin and their end
        self._staging_leased = False  # a push is receiving into the engine's staging buffer
        self._lease_progress: ReceiveProgress | None = None  # how the lease holder's bytes arrive
        # Receive buffers of pushes that cannot use the staging buffer (sync contributions kept
        # until their round closes, async pushes overlapping the lease holder): reused, so a
        # push costs no fresh memory (page faults) and no full-size temporary.
        self._free_sets: dict[Layout, list[dict[str, np.ndarray]]] = {}

    # -------------------------------------------------------------- inspection

    @property
    def version(self) -> int:
        with self._cond:
            return self._version

    def status(self) -> OptimizerStatus:
        now = time.monotonic()
        with self._cond:
            engine = self._engine
            lr_is_schedule = engine.get_config()["learning_rate"].__class__ is dict
            return OptimizerStatus(
                key=self.key,
                config=engine.get_config(),
                policy=self.policy,
                built=engine.built,
                specs=list(engine.variable_specs) if engine.built else [],
                version=self._version,
                iterations=engine.iterations,
                learning_rate=float(engine.learning_rate),
                learning_rate_is_schedule=lr_is_schedule,
                workers=[
                    WorkerStatus(wid, w.last_step, w.pushes, now - w.last_seen)
                    for wid, w in sorted(self._workers.items())
                ],
                round_arrivals=self._sync.arrivals(),
            )

    @property
    def iterations(self) -> int:
        with self._cond:
            return self._engine.iterations

    @property
    def restore_epoch(self) -> int:
        """Bumped by every restore: weights copied before it are stale whatever their version."""
        with self._cond:
            return self._restore_epoch

    def variable_specs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """(name, shape, dtype) of the model variables in build order (empty before build)."""
        with self._cond:
            return list(self._engine.variable_specs) if self._engine.built else []

    def touch(self, worker_id: str) -> None:
        """Record that ``worker_id`` was seen (status shows when each worker last called)."""
        with self._cond:
            self._touch(worker_id)

    def read_weights_into(self, outs: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """Copy the current weights into ``outs`` (name -> host array); returns (version, iterations).

        One copy per variable under the lock, straight from the engine's buffers: the
        shared-memory pull segment is filled this way, without an intermediate snapshot.
        """
        with self._cond:
            self._require_built()
            self._engine.read_variables_into(outs)
            return self._version, self._engine.iterations

    def _touch(self, worker_id: str) -> WorkerRecord:
        worker = self._workers.setdefault(worker_id, WorkerRecord())
        worker.last_seen = time.monotonic()
        return worker

    def _require_built(self) -> None:
        if self._closed:
            raise Unavailable(f"optimizer '{self.key}' was deleted or the server is shutting down")
        if not self._engine.built:
            raise FailedPrecondition(
                f"optimizer '{self.key}' is not built yet; call build(variables) with the model "
                "variables' names and initial values first"
            )

    # -------------------------------------------------------------- build

    def build(self, variables: Sequence[tuple[str, np.ndarray]], worker_id: str = "") -> bool:
        """Build with initial values; idempotent when already built with the same specs."""
        specs = [(name, tuple(value.shape), np.dtype(value.dtype)) for name, value in variables]
        names = [name for name, _, _ in specs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:  # a dict would silently keep the last value of each
            raise InvalidArgument(
                f"Build received more than one variable named {duplicates}; variable names must be unique"
            )
        with self._cond:
            if self._closed:
                raise Unavailable(f"optimizer '{self.key}' was deleted")
            if worker_id:
                self._touch(worker_id)
            if self._engine.built:
                existing = [(n, tuple(s), np.dtype(d)) for n, s, d in self._engine.variable_specs]
                if existing != specs:
                    raise FailedPrecondition(
                        f"optimizer '{self.key}' is already built with different variables ({spec_mismatch(existing, specs)}): "
                        f"existing {describe_specs(existing)}, received {describe_specs(specs)}. "
                        "Attach without variables to use the existing ones, or use another name "
                        "(or if_exists='replace')."
                    )
                return False
            for name, _, dtype in specs:
                if dtype.name not in ("float16", "float32", "float64"):
                    raise InvalidArgument(
                        f"Variable '{name}' must be float16, float32 or float64. Received: dtype={dtype}"
                    )
            self._engine.build(dict(variables))
            self._version = 0
            self._cond.notify_all()
            return True

    # -------------------------------------------------------------- push

    def check_gradient(self, meta: TensorMeta) -> None:
        """Validate a gradient's header against the variable before its payload is read."""
        with self._cond:
            self._require_built()
            specs = {n: (tuple(s), np.dtype(d)) for n, s, d in self._engine.variable_specs}
        if meta.name not in specs:
            raise NotFound(
                f"optimizer '{self.key}' has no variable '{meta.name}'. Known variables: {list(specs)}"
            )
        if meta.absent:
            return
        if meta.dtype not in FLOAT_DTYPES:
            raise InvalidArgument(
                f"Gradient for variable '{meta.name}' has dtype {meta.dtype}; gradients must be "
                f"one of {list(FLOAT_DTYPES)}."
            )
        shape, _ = specs[meta.name]
        if meta.sparse:
            if not shape or meta.shape[1:] != shape[1:]:
                raise InvalidArgument(
                    f"Row-sparse gradient for variable '{meta.name}' has values of shape {meta.shape}; "
                    f"expected (num_rows,) + {shape[1:]} for a variable of shape {shape}."
                )
        elif meta.shape != shape:
            raise InvalidArgument(
                f"Gradient for variable '{meta.name}' has shape {meta.shape}, but the variable has shape {shape}."
            )

    @staticmethod
    def _validate_payload(
        grads: Sequence[tuple[str, Gradient]], rows: Mapping[str, int]
    ) -> dict[str, Gradient]:
        """Names unique, row-sparse indices in range; ``rows``: first dimension per variable."""
        out: dict[str, Gradient] = {}
        for name, g in grads:
            if name in out:
                raise InvalidArgument(f"The push carries two gradients for variable '{name}'.")
            if isinstance(g, RowSparseGradient) and g.indices.size:
                low, high = int(g.indices.min()), int(g.indices.max())
                if low < 0 or high >= rows[name]:
                    raise InvalidArgument(
                        f"Row-sparse gradient for variable '{name}': row indices must be in [0, {rows[name]}). "
                        f"Received min={low}, max={high}."
                    )
            out[name] = g
        return out

    def push(
        self,
        worker_id: str,
        request_id: str,
        step: int,
        receive: Callable[[StagingLookup | None], Sequence[tuple[str, Gradient]]],
        *,
        timeout: float | None = None,
        progress: ReceiveProgress | None = None,
    ) -> PushResult:
        """Handle one push exactly once; ``receive(staging)`` reads its gradients (outside the lock).

        ``staging(name, dtype)`` hands out a receive buffer: the engine's staging buffer for a
        lone async push (no copy), else a pooled gradient set. ``receive`` may return
        ``ReceivedGradients`` with statistics computed as the bytes arrived. Receiving,
        validation and statistics run outside the lock; it covers the state change only.
        Raises StaleGradient, FailedPrecondition, InvalidArgument or NotFound; a failed push
        changes nothing and may be retried with the same request id.

        ``progress`` (from the transport) says how the payload is arriving and how to cancel
        it: a holder of the staging buffer that stops moving while others wait is cancelled
        (``staging.StagingMixin``). ``timeout`` bounds every wait of this push (WaitTimeout).
        """
        if not worker_id:
            raise InvalidArgument("Every push must carry a non-empty `worker_id`.")
        if not request_id:
            raise InvalidArgument("Every push must carry a non-empty `request_id` (reuse it when retrying).")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._require_built()
            self._touch(worker_id)
            entry = self._dedup.get(worker_id, request_id)
            while entry is not None and entry.result is None:  # first copy still in flight
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WaitTimeout(
                        f"push {request_id!r} of worker '{worker_id}' is still being handled by an "
                        "earlier copy; retry later with the same request id",
                        current_version=self._version,
                    )
                self._cond.wait(remaining)
                entry = self._dedup.get(worker_id, request_id)
            if entry is not None and entry.result is not None:
                return replace(entry.result, duplicate=True)
            self._check_step(step)  # fail early, before the payload is read
            self._dedup.begin(worker_id, request_id)
            epoch = self._restore_epoch
            lease = self._take_staging_lease(progress)
            self._pushes_in_flight += 1
            specs = list(self._engine.variable_specs)
        taken: Taken = []  # the pooled gradient set this push holds
        try:
            lookup = self._staging_lookup() if lease else self._pooled_lookup(taken)
            grads = receive(lookup)
            if progress is not None:  # all arrived: nothing to cancel any more
                progress.cancel = None
            rows = {n: (tuple(s)[0] if len(s) else 0) for n, s, _ in specs}
            validated = self._validate_payload(grads, rows)
            stats = None
            if self.policy.mode == "async" or self.policy.non_finite == "reject":
                stats = push_stats(validated, getattr(grads, "stats", None))
            with self._cond:
                if not lease:
                    self._wait_for_lease(deadline)  # it is being filled: apply after it
                self._require_built()
                if self._restore_epoch != epoch:
                    raise StateRestored(
                        f"optimizer '{self.key}' was restored from a checkpoint while push {request_id!r} "
                        f"was in flight; it was not applied. Pull version {self._version} and recompute.",
                        current_version=self._version,
                    )
                result = self._handle_push(worker_id, request_id, step, validated, stats, taken)
                if lease:  # done with the buffer: nobody may cancel this push any more
                    self._staging_leased, self._lease_progress = False, None
                self._dedup.finish(worker_id, request_id, result)
                worker = self._touch(worker_id)
                worker.pushes += 1
                worker.last_step = step
                self._cond.notify_all()
                return result
        except BaseException:
            with self._cond:
                if self._restore_epoch == epoch:  # a restore replaced the table the entry was in
                    self._dedup.discard(worker_id, request_id)
                self._cond.notify_all()
            raise
        finally:
            with self._cond:
                self._pushes_in_flight -= 1
                self._give_back(taken)  # empty when a sync round took them over
                if lease:
                    self._staging_leased = False
                    self._lease_progress = None
                    self._cond.notify_all()

    def device_receiver(self) -> Any:
        """Receive helper for pushes (GPU engine, async mode), or None.

        In async mode each push is one apply, so its gradients can go to the GPU while they
        arrive; sync rounds combine pushes on the host first.
        """
        if self.policy.mode != "async":
            return None
        return self._engine.device_receiver()

    def _check_step(self, step: int) -> None:
        check_step(self.key, self.policy, self._version, step)

    def _handle_push(
        self,
        worker_id: str,
        request_id: str,
        step: int,
        grads: dict[str, Gradient],
        stats: Mapping[str, GradientStats] | None,
        taken: Taken,
    ) -> PushResult:
        """The state change of one push (under the lock); ``stats`` were computed outside it."""
        engine = self._engine
        if self.policy.mode == "async":
            assert stats is not None
            self._check_step(step)
            bad = non_finite_counts(stats)
            if bad:
                return non_finite_outcome(self.policy, bad, self._version, engine.iterations)
            self._swap_in(taken)  # applied where it was received: no copy into the staging buffers
            self._apply(grads, stats)
            self._set_version(self._version + 1)
            return PushResult("applied", self._version, engine.iterations)

        late = self._sync.late(step, self._version, engine.iterations)
        if late is not None:
            return late
        self._check_step(step)
        self._sync.require_new(worker_id, step, self._version)
        if self.policy.non_finite == "reject":
            assert stats is not None
            bad = non_finite_counts(stats)
            if bad:
                raise InvalidArgument(non_finite_message(bad))
        complete = self._sync.join(worker_id, Contribution(request_id, grads, list(taken)), step, self._version)
        taken.clear()  # the round owns them now
        if complete:
            detail = self._close_round(self._sync.quorum_reason())
            return PushResult("round_closed", self._version, engine.iterations, detail=detail)
        return self._sync.accepted(step, self._version, engine.iterations)

    # -------------------------------------------------------------- pull

    def _set_version(self, version: int) -> None:
        self._version = version
        self._cond.notify_all()

    def wait_for_version(self, min_version: int, timeout: float | None) -> int:
        """Block until the version reaches ``min_version``; return the current version."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            aborts = self._sync.aborts
            while self._version < min_version:
                if self._closed:
                    raise Unavailable(f"optimizer '{self.key}' was deleted or the server is shutting down")
                if self._sync.aborts != aborts:
                    raise RoundAborted(self._sync.last_abort + "; push again for the current version", current_version=self._version)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WaitTimeout(
                        f"optimizer '{self.key}' did not reach version {min_version} in time; "
                        f"current version is {self._version}",
                        current_version=self._version,
                    )
                self._cond.wait(remaining)
            return self._version

    def pull(
        self,
        names: Sequence[str],
        encode: Callable[[int, int, list[tuple[str, np.ndarray]]], T],
        *,
        min_version: int = 0,
        known_version: int | None = None,
        timeout: float | None = None,
        worker_id: str = "",
        encoding: str = "frames",
    ) -> PullResult[T]:
        """Current weights (all, or ``names``) with their version, encoded once per version.

        ``encode(version, iterations, [(name, array), ...])`` runs once per (encoding, version,
        names) and its result is handed to every puller of that version; ``encoding`` names
        the kind of payload ``encode`` makes (gRPC frames, raw arrays for the bulk channel).
        The arrays passed to ``encode`` are private host copies.
        """
        if min_version > 0:
            self.wait_for_version(min_version, timeout)
        names = tuple(names)
        key = (encoding, names)
        with self._encode_lock:
            with self._cond:
                self._require_built()
                if worker_id:
                    self._touch(worker_id)
                version, iterations = self._version, self._engine.iterations
                if known_version is not None and known_version == version:
                    return PullResult(version, iterations, True, None)
                cached = self._pull_cache.get(key)
                if cached is not None and cached.version == version:
                    self._pull_cache.move_to_end(key)
                    return cached
                if cached is not None:  # an older version: let it go before copying the new one
                    del self._pull_cache[key]
                    cached = None
                values = self._weights_copy(key, names)
            result = PullResult(version, iterations, False, encode(version, iterations, list(values.items())))
            self._pull_cache[key] = result
            self._pull_cache.move_to_end(key)
            while len(self._pull_cache) > self._PULL_CACHE_KEYS:
                self._pull_cache.popitem(last=False)
            return result

    # -------------------------------------------------------------- the rest of the Keras API

    _FREE_REFS = 3  # a pooled array referenced only by its dict, a loop variable and getrefcount

    def _weights_copy(self, key: tuple[str, tuple[str, ...]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """A private host copy of the weights (all, or ``names``), under the lock.

        Copies go into arrays of an earlier version when nothing references them any more (no
        cached reply, no pull still sending them): fresh memory would cost page faults on
        every version, under the lock.
        """
        specs = {n: (shape, dtype) for n, shape, dtype in self._engine.variable_specs}
        if names:
            missing = [n for n in names if n not in specs]
            if missing:
                raise NotFound(f"optimizer '{self.key}' has no variable(s) {missing}. Known variables: {list(specs)}")
            specs = {n: specs[n] for n in names}
        pool = self._copy_pool.setdefault(key, [])
        chosen = None
        for candidate in pool:
            if all(sys.getrefcount(a) <= self._FREE_REFS for a in candidate.values()):
                chosen = candidate
                break
        if chosen is None:
            chosen = {n: np.empty(shape, dtype) for n, (shape, dtype) in specs.items()}
            pool.append(chosen)
            if len(pool) > 2:
                pool.pop(0)  # its holders keep it alive; the pool forgets it
        self._engine.read_variables_into(chosen)
        return dict(chosen)

    def get_config(self) -> dict[str, Any]:
        with self._cond:
            return self._engine.get_config()

    def set_learning_rate(self, learning_rate: float) -> None:
        with self._cond:
            self._engine.learning_rate = learning_rate

    def exclude_from_weight_decay(self, var_list: Sequence[str], var_names: Sequence[str]) -> None:
        with self._cond:
            self._engine.exclude_from_weight_decay(var_list=list(var_list) or None, var_names=list(var_names) or None)

    def _mutate(self, action: Callable[[Adamax], None]) -> tuple[int, int]:
        with self._cond:
            self._require_built()
            self._sync.require_empty(self._version)
            action(self._engine)
            self._set_version(self._version + 1)
            return self._version, self._engine.iterations

    def finalize_variable_values(self) -> tuple[int, int]:
        return self._mutate(lambda e: e.finalize_variable_values())

    def assign(self, op: Literal["assign", "assign_add", "assign_sub"], name: str, value: np.ndarray) -> tuple[int, int]:
        return self._mutate(lambda e: getattr(e, op)(name, value))

    def set_weights(self, weights: Sequence[np.ndarray]) -> tuple[int, int]:
        return self._mutate(lambda e: e.set_weights(list(weights)))

    def load_own_variables(self, store: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """Keras's ``load_own_variables``, except that a store of the wrong size is refused.

        Keras only warns ("Skipping variable loading ...") and loads nothing; answering OK and
        bumping the version would tell a remote caller its state was loaded. The server raises
        InvalidArgument with Keras's message and changes nothing.
        """

        def load(engine: Adamax) -> None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.load_own_variables(dict(store))
            skipped = [w for w in caught if "Skipping variable loading" in str(w.message)]
            if skipped:
                raise InvalidArgument(f"LoadOwnVariables refused: {str(skipped[0].message).strip()}")

        return self._mutate(load)

    def save_own_variables(self) -> dict[str, np.ndarray]:
        with self._cond:
            self._require_built()
            store: dict[str, np.ndarray] = {}
            self._engine.save_own_variables(store)
            return store

    def stateless_apply(
        self, optimizer_variables: Sequence[Any], grads: Sequence[Gradient], trainable_variables: Sequence[Any]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        with self._cond:
            self._require_built()
            return self._engine.stateless_apply(list(optimizer_variables), list(grads), list(trainable_variables))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._reset_round()
            self._cond.notify_all()


def describe_specs(specs: Sequence[tuple[str, tuple[int, ...], np.dtype]]) -> str:
    return "[" + ", ".join(f"{n}{list(s)}:{np.dtype(d).name}" for n, s, d in specs) + "]"


def spec_mismatch(existing: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                  received: Sequence[tuple[str, tuple[int, ...], np.dtype]]) -> str:
    """The first difference between two spec lists, in words."""
    have = {n: (tuple(s), np.dtype(d)) for n, s, d in existing}
    for name, shape, dtype in received:
        if name not in have:
            return f"no variable '{name}' in the existing job"
        old_shape, old_dtype = have[name]
        if old_shape != tuple(shape) or old_dtype != np.dtype(dtype):
            return (f"variable '{name}' is {list(old_shape)}:{old_dtype.name} in the job, "
                    f"{list(shape)}:{np.dtype(dtype).name} here")
    missing = [n for n in have if n not in {r[0] for r in received}]
    if missing:
        return f"variable '{missing[0]}' of the job is missing here"
    return "the variables are in another order"
