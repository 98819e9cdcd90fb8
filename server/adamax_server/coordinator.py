"""Workers, rounds and exactly-once pushes in front of the in-process Adamax engine.

The coordinator owns every optimizer hosted by a server (keyed by name) and decides how
pushes from workers become engine applies:

* ``async``: each push is one apply, serialized by the optimizer's lock; ``max_staleness``
  rejects gradients computed more than that many versions ago.
* ``sync``: pushes computed on the current version are collected; when K distinct workers
  have pushed, their mean (or sum) is one apply. Late pushes for a closed round are dropped
  and reported, never applied. A round timeout closes the round with what arrived, or
  aborts it, so a dead worker cannot hang the job.

Every push carries (worker id, request id); a retry is answered with the first outcome and
never applied twice, also while the first copy is still streaming or being applied.

Versions: ``version`` counts changes of the model variables (applies, closed rounds,
assignments, loads). Workers compute gradients on a version and pull by version.

Nothing here imports grpc or the generated protocol code: the servicer translates wire
frames to the calls below, and ``errors.status_for`` maps the exceptions to status codes.
The engine is not thread safe; every engine call happens under the optimizer's lock.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Generic, Literal, NamedTuple, Protocol, TypeVar

import numpy as np

from .engine import Adamax, RowSparseGradient
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RoundAborted,
    StaleGradient,
    StateRestored,
    Unavailable,
    WaitTimeout,
)
from .kernels.stats import gradient_stats
from .snapshot import OptimizerSnapshot, RoundContribution

_log = logging.getLogger(__name__)

Mode = Literal["async", "sync"]
Gradient = Any  # np.ndarray | RowSparseGradient | None
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
T = TypeVar("T")


def _choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise InvalidArgument(f"`{name}` must be one of {list(allowed)}. Received: {name}={value!r}")


@dataclass(frozen=True)
class Policy:
    """How pushes turn into applies; see the module docstring."""

    mode: Mode = "async"
    num_workers: int = 1
    min_workers: int | None = None  # K; None means K = num_workers
    aggregation: Literal["mean", "sum"] = "mean"
    round_timeout: float | None = None  # seconds after a round's first push; None: wait forever
    round_timeout_policy: Literal["close", "abort"] = "close"
    max_staleness: int | None = None
    non_finite: Literal["reject", "skip"] = "reject"

    def __post_init__(self) -> None:
        _choice("mode", self.mode, ("async", "sync"))
        _choice("aggregation", self.aggregation, ("mean", "sum"))
        _choice("round_timeout_policy", self.round_timeout_policy, ("close", "abort"))
        _choice("non_finite", self.non_finite, ("reject", "skip"))
        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise InvalidArgument(f"`num_workers` must be an integer >= 1. Received: num_workers={self.num_workers!r}")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise InvalidArgument(
                "`min_workers` must be between 1 and `num_workers`. "
                f"Received: min_workers={self.min_workers}, num_workers={self.num_workers}"
            )
        if self.round_timeout is not None and not (self.round_timeout > 0 and math.isfinite(self.round_timeout)):
            raise InvalidArgument(
                f"`round_timeout` must be a positive number of seconds or None. Received: round_timeout={self.round_timeout!r}"
            )
        if self.max_staleness is not None and self.max_staleness < 0:
            raise InvalidArgument(f"`max_staleness` must be >= 0 or None. Received: max_staleness={self.max_staleness!r}")

    @property
    def quorum(self) -> int:
        """Distinct workers that close a sync round (K)."""
        return self.min_workers if self.min_workers is not None else self.num_workers


PushOutcomeName = Literal["applied", "accepted", "round_closed", "dropped_late", "skipped_non_finite"]


# ``staging(name, dtype)``: a writable flat buffer for variable ``name``'s gradient, or None.
StagingLookup = Callable[[str, np.dtype], "np.ndarray | None"]


@dataclass(frozen=True)
class PushResult:
    outcome: PushOutcomeName
    version: int
    iterations: int
    duplicate: bool = False
    detail: str = ""


class TensorMeta(NamedTuple):
    """What a tensor header announces, before its payload is read."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    sparse: bool
    absent: bool


@dataclass(frozen=True)
class WorkerStatus:
    worker_id: str
    last_step: int
    pushes: int
    seconds_since_seen: float


@dataclass(frozen=True)
class OptimizerStatus:
    key: str
    config: dict[str, Any]
    policy: Policy
    built: bool
    specs: list[tuple[str, tuple[int, ...], np.dtype]]
    version: int
    iterations: int
    learning_rate: float
    learning_rate_is_schedule: bool
    workers: list[WorkerStatus]
    round_arrivals: list[str]


@dataclass(frozen=True)
class PullResult(Generic[T]):
    version: int
    iterations: int
    not_modified: bool
    payload: T | None  # what the ``encode`` callback made; shared between pullers


# ---------------------------------------------------------------- exactly-once table


@dataclass
class _DedupEntry:
    result: PushResult | None = None  # None while the first copy is in flight


class _DedupTable:
    """Per-worker request id -> outcome, bounded; in-flight entries are never evicted."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._by_worker: dict[str, OrderedDict[str, _DedupEntry]] = {}

    def get(self, worker_id: str, request_id: str) -> _DedupEntry | None:
        return self._by_worker.get(worker_id, {}).get(request_id)

    def begin(self, worker_id: str, request_id: str) -> None:
        entries = self._by_worker.setdefault(worker_id, OrderedDict())
        entries[request_id] = _DedupEntry()
        if len(entries) > self._capacity:
            for old_id, old in list(entries.items()):
                if len(entries) <= self._capacity:
                    break
                if old.result is not None:
                    del entries[old_id]

    def finish(self, worker_id: str, request_id: str, result: PushResult) -> None:
        self._by_worker[worker_id][request_id] = _DedupEntry(result)

    def discard(self, worker_id: str, request_id: str) -> None:
        self._by_worker.get(worker_id, {}).pop(request_id, None)

    def finished(self) -> dict[str, list[tuple[str, dict[str, Any]]]]:
        """Answered requests per worker, oldest first, as JSON data (for checkpoints)."""
        return {
            worker: [(rid, asdict(e.result)) for rid, e in entries.items() if e.result is not None]
            for worker, entries in self._by_worker.items()
        }

    @classmethod
    def from_finished(cls, capacity: int, finished: Mapping[str, Sequence[tuple[str, Mapping[str, Any]]]]) -> _DedupTable:
        table = cls(capacity)
        for worker, entries in finished.items():
            table._by_worker[worker] = OrderedDict(
                (rid, _DedupEntry(PushResult(**{**result, "duplicate": False}))) for rid, result in entries
            )
        return table


# ---------------------------------------------------------------- one optimizer


@dataclass
class _Contribution:
    request_id: str
    grads: dict[str, Gradient]


@dataclass
class _Worker:
    last_step: int = -1
    pushes: int = 0
    last_seen: float = field(default_factory=time.monotonic)


class GradientStats(NamedTuple):
    """One gradient's sum of squares and largest magnitude (finite part) and non-finite count."""

    sumsq: float
    max_abs: float
    non_finite: int


def _gradient_stats(grads: Mapping[str, Gradient]) -> dict[str, GradientStats]:
    """One parallel pass per gradient; the non-finite check and the metrics share the result."""
    out = {}
    for name, g in grads.items():
        if g is None:
            continue
        values = g.values if isinstance(g, RowSparseGradient) else g
        out[name] = GradientStats(*gradient_stats(np.asarray(values)))
    return out


def _non_finite_counts(stats: Mapping[str, GradientStats]) -> dict[str, int]:
    return {name: st.non_finite for name, st in stats.items() if st.non_finite}


class OptimizerHost:
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
        self._observer = observer  # metrics hooks (adamax_server.metrics), called under the lock
        self._round_started = 0.0
        self.policy = policy
        self.initial_config = initial_config
        self._engine = engine
        self._cond = threading.Condition()
        self._encode_lock = threading.Lock()
        self._version = 0
        self._dedup = _DedupTable(dedup_capacity)
        self._dedup_capacity = dedup_capacity
        self._restore_epoch = 0  # bumped by restore(): pushes begun before it are rejected
        self._workers: dict[str, _Worker] = {}
        self._round: dict[str, _Contribution] = {}
        self._round_epoch = 0
        self._round_timer: threading.Timer | None = None
        self._aborts = 0
        self._last_abort = ""
        self._last_closed = ""
        self._closed = False
        self._pull_cache: OrderedDict[tuple[str, tuple[str, ...]], PullResult[Any]] = OrderedDict()
        self._copy_pool: dict[tuple[str, tuple[str, ...]], list[dict[str, np.ndarray]]] = {}
        self._pushes_in_flight = 0  # pushes between dedup.begin and their end
        self._staging_leased = False  # a push is receiving into the engine's staging buffer

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
                round_arrivals=sorted(self._round),
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

    def _touch(self, worker_id: str) -> _Worker:
        worker = self._workers.setdefault(worker_id, _Worker())
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
        with self._cond:
            if self._closed:
                raise Unavailable(f"optimizer '{self.key}' was deleted")
            if worker_id:
                self._touch(worker_id)
            if self._engine.built:
                existing = [(n, tuple(s), np.dtype(d)) for n, s, d in self._engine.variable_specs]
                if existing != specs:
                    raise FailedPrecondition(
                        f"optimizer '{self.key}' is already built with different variables: "
                        f"existing {_describe_specs(existing)}, received {_describe_specs(specs)}. "
                        "Attach without variables to use the existing ones, or create a new optimizer."
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
        if meta.dtype not in _FLOAT_DTYPES:
            raise InvalidArgument(
                f"Gradient for variable '{meta.name}' has dtype {meta.dtype}; gradients must be "
                f"one of {list(_FLOAT_DTYPES)}."
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

    def _validate_payload(self, grads: Sequence[tuple[str, Gradient]]) -> dict[str, Gradient]:
        specs = {n: tuple(s) for n, s, _ in self._engine.variable_specs}
        out: dict[str, Gradient] = {}
        for name, g in grads:
            if name in out:
                raise InvalidArgument(f"The push carries two gradients for variable '{name}'.")
            if isinstance(g, RowSparseGradient) and g.indices.size:
                rows = specs[name][0]
                low, high = int(g.indices.min()), int(g.indices.max())
                if low < 0 or high >= rows:
                    raise InvalidArgument(
                        f"Row-sparse gradient for variable '{name}': row indices must be in [0, {rows}). "
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
    ) -> PushResult:
        """Handle one push exactly once; ``receive(staging)`` reads its gradients (outside the lock).

        ``staging(name, dtype)`` (or None) hands out the engine's own gradient staging buffer
        of a variable when this push may use it (async, host engine, no other push in
        flight): a payload received there lands where the update reads it, with no copy and
        no fresh allocation. Raises StaleGradient, FailedPrecondition, InvalidArgument or
        NotFound; a failed push changes nothing and may be retried with the same request id.
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
            lease = self._take_staging_lease()
            self._pushes_in_flight += 1
        try:
            grads = receive(self._staging_lookup() if lease else None)
            with self._cond:
                while not lease and self._staging_leased:  # it is being filled: apply after it
                    self._cond.wait()
                self._require_built()
                if self._restore_epoch != epoch:
                    raise StateRestored(
                        f"optimizer '{self.key}' was restored from a checkpoint while push {request_id!r} "
                        f"was in flight; it was not applied. Pull version {self._version} and recompute.",
                        current_version=self._version,
                    )
                validated = self._validate_payload(grads)
                result = self._handle_push(worker_id, request_id, step, validated)
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
                if lease:
                    self._staging_leased = False
                    self._cond.notify_all()

    def _take_staging_lease(self) -> bool:
        """Whether the push starting now may receive into the engine's staging buffer.

        Only one push may fill it, and no other apply may run while it is being filled (an
        apply writes its own gradients there); so it is lent only to an async push that
        starts while no other push is in flight. Later pushes receive into their own buffers
        and apply after the lease holder. (Sync rounds keep every worker's gradient until
        the round closes; the GPU engine receives through its pinned ring instead.)
        """
        if self.policy.mode != "async" or self._staging_leased or self._pushes_in_flight:
            return False
        if not self._engine.built or not self._engine.host_staging:
            return False
        self._staging_leased = True
        return True

    def _staging_lookup(self) -> StagingLookup:
        """``lookup(name, dtype)``: the staging buffer of variable ``name`` (writable, flat) if
        its dtype is ``dtype``, else None; for the push holding the lease."""
        engine = self._engine
        dtypes = {n: np.dtype(d) for n, _, d in engine.variable_specs}

        def lookup(name: str, dtype: np.dtype) -> np.ndarray | None:
            if dtypes.get(name) != np.dtype(dtype):
                return None
            return engine.gradient_buffer(name).reshape(-1)

        return lookup

    def device_receiver(self) -> Any:
        """Receive helper for pushes (GPU engine, async mode), or None.

        In async mode each push is one apply, so its gradients can go to the GPU while they
        arrive; sync rounds combine pushes on the host first.
        """
        if self.policy.mode != "async":
            return None
        return self._engine.device_receiver()

    def _check_step(self, step: int) -> None:
        version = self._version
        if step > version:
            raise FailedPrecondition(
                f"gradient step {step} is ahead of the current version {version} of optimizer "
                f"'{self.key}'; push gradients computed on pulled weights",
                current_version=version,
            )
        if step < 0:
            raise InvalidArgument(f"`step` must be >= 0. Received: step={step}")
        limit = self.policy.max_staleness
        if self.policy.mode == "async" and limit is not None and version - step > limit:
            raise StaleGradient(
                f"gradient computed on version {step} is {version - step} versions old; "
                f"max_staleness is {limit}. Pull the current weights (version {version}) and recompute.",
                current_version=version,
            )

    def _handle_push(self, worker_id: str, request_id: str, step: int, grads: dict[str, Gradient]) -> PushResult:
        engine = self._engine
        if self.policy.mode == "async":
            self._check_step(step)
            stats = _gradient_stats(grads)
            bad = _non_finite_counts(stats)
            if bad:
                if self.policy.non_finite == "reject":
                    raise InvalidArgument(_non_finite_message(bad))
                return PushResult("skipped_non_finite", self._version, engine.iterations, detail=_non_finite_message(bad, skipped=True))
            self._apply(grads, stats)
            self._set_version(self._version + 1)
            return PushResult("applied", self._version, engine.iterations)

        if step < self._version:
            return PushResult(
                "dropped_late",
                self._version,
                engine.iterations,
                detail=(
                    f"the round for version {step} already closed ({self._last_closed or 'earlier'}); "
                    f"this gradient was not applied. Current version is {self._version}."
                ),
            )
        self._check_step(step)
        if worker_id in self._round:
            raise FailedPrecondition(
                f"worker '{worker_id}' already pushed a gradient for version {step} "
                f"(request {self._round[worker_id].request_id!r}); one push per worker per round",
                current_version=self._version,
            )
        if self.policy.non_finite == "reject":
            bad = _non_finite_counts(_gradient_stats(grads))
            if bad:
                raise InvalidArgument(_non_finite_message(bad))
        self._round[worker_id] = _Contribution(request_id, grads)
        if len(self._round) == 1:
            self._round_started = time.monotonic()
        if len(self._round) >= self.policy.quorum:
            detail = self._close_round(f"closed by {len(self._round)} of {self.policy.num_workers} workers")
            return PushResult("round_closed", self._version, engine.iterations, detail=detail)
        if len(self._round) == 1 and self.policy.round_timeout is not None:
            self._start_round_timer()
        return PushResult(
            "accepted",
            self._version,
            engine.iterations,
            detail=f"{len(self._round)} of {self.policy.quorum} workers have pushed for version {step}",
        )

    # -------------------------------------------------------------- sync rounds

    def _start_round_timer(self) -> None:
        assert self.policy.round_timeout is not None
        timer = threading.Timer(self.policy.round_timeout, self._on_round_timeout, args=(self._round_epoch,))
        timer.daemon = True
        self._round_timer = timer
        timer.start()

    def _on_round_timeout(self, epoch: int) -> None:
        with self._cond:
            if epoch != self._round_epoch or not self._round or self._closed:
                return
            arrived = sorted(self._round)
            why = f"timed out after {self.policy.round_timeout}s with {len(arrived)} of {self.policy.quorum} workers ({', '.join(arrived)})"
            if self.policy.round_timeout_policy == "close":
                try:
                    self._close_round(why)
                except Exception:  # the timer thread has nobody to report to
                    _log.exception("closing round %d of '%s' failed", self._version, self.key)
            else:
                self._abort_round(f"round for version {self._version} of optimizer '{self.key}' was aborted: {why}")

    def _reset_round(self) -> None:
        self._round = {}
        self._round_epoch += 1
        if self._round_timer is not None:
            self._round_timer.cancel()
            self._round_timer = None

    def _abort_round(self, message: str) -> None:
        for worker_id, contribution in self._round.items():
            # A retry of an aborted push must enter the next round, not be answered "accepted".
            self._dedup.discard(worker_id, contribution.request_id)
        self._reset_round()
        self._aborts += 1
        self._last_abort = message
        _log.warning("%s", message)
        self._cond.notify_all()

    def _close_round(self, why: str) -> str:
        contributions = [self._round[w] for w in sorted(self._round)]
        combined = self._combine(contributions)
        version = self._version
        detail = f"round for version {version} {why}"
        present = {n: g for n, g in combined.items() if g is not None}
        try:
            stats = _gradient_stats(present)
            bad = _non_finite_counts(stats)
            if bad:  # only reachable with non_finite="skip" (or overflow in the sum)
                detail += "; " + _non_finite_message(bad, skipped=True)
            elif not present:
                detail += "; no worker sent any gradient, step skipped"
            else:
                self._apply(present, stats)
        except BaseException:
            self._abort_round(f"round for version {version} was aborted: applying the combined gradient failed")
            raise
        self._reset_round()
        self._last_closed = detail
        self._set_version(version + 1)
        self._observe("on_round_closed", time.monotonic() - self._round_started, len(contributions), self.policy.num_workers)
        return detail

    def _apply(self, grads: dict[str, Gradient], stats: Mapping[str, GradientStats]) -> None:
        """One engine apply (under the lock), timed for the metrics; ``stats`` from the check."""
        start = time.perf_counter()
        self._engine.apply(grads)
        self._observe("on_apply", time.perf_counter() - start, stats, self._engine.iterations, self.initial_config)

    def _observe(self, hook: str, *args: Any) -> None:
        if self._observer is None:
            return
        try:  # metrics must never fail a push that was already applied
            getattr(self._observer, hook)(self.key, *args)
        except Exception:
            _log.exception("metrics hook %s failed", hook)

    def _combine(self, contributions: list[_Contribution]) -> dict[str, Gradient]:
        """Sum or mean per variable, in worker-id order (so results do not depend on arrival)."""
        count = len(contributions)
        out: dict[str, Gradient] = {}
        for name, shape, dtype in self._engine.variable_specs:
            parts = [c.grads[name] for c in contributions if c.grads.get(name) is not None]
            if not parts:
                out[name] = None
                continue
            if all(isinstance(p, RowSparseGradient) for p in parts):
                indices = np.concatenate([np.asarray(p.indices, dtype=np.int64) for p in parts])
                values = np.concatenate([np.asarray(p.values).astype(dtype) for p in parts])
                if self.policy.aggregation == "mean":
                    values = np.divide(values, np.asarray(count, dtype=dtype))
                out[name] = RowSparseGradient(indices, values)
                continue
            # Summed straight into the engine's staging buffer when it is host memory (sync
            # rounds never lend it to a receive): no new allocation, and apply copies nothing.
            total = self._engine.gradient_buffer(name) if self._engine.host_staging else None
            if total is None or total.dtype != np.dtype(dtype):
                total = np.zeros(shape, dtype=dtype)
            else:
                total[...] = 0
            for p in parts:
                if isinstance(p, RowSparseGradient):
                    np.add.at(total, np.asarray(p.indices), np.asarray(p.values).astype(dtype))
                else:
                    np.add(total, np.asarray(p).astype(dtype, copy=False), out=total)
            if self.policy.aggregation == "mean":
                np.divide(total, np.asarray(count, dtype=dtype), out=total)
            out[name] = total
        return out

    # -------------------------------------------------------------- pull

    def _set_version(self, version: int) -> None:
        self._version = version
        self._cond.notify_all()

    def wait_for_version(self, min_version: int, timeout: float | None) -> int:
        """Block until the version reaches ``min_version``; return the current version."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            aborts = self._aborts
            while self._version < min_version:
                if self._closed:
                    raise Unavailable(f"optimizer '{self.key}' was deleted or the server is shutting down")
                if self._aborts != aborts:
                    raise RoundAborted(self._last_abort + "; push again for the current version", current_version=self._version)
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
            if self._round:
                raise FailedPrecondition(
                    f"a sync round for version {self._version} is open ({sorted(self._round)} pushed); "
                    "change variables between rounds"
                )
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
        return self._mutate(lambda e: e.load_own_variables(dict(store)))

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

    # -------------------------------------------------------------- checkpoints

    def snapshot(self) -> OptimizerSnapshot:
        """Copy all state under the lock; the caller writes it out without holding the lock."""
        with self._cond:
            if self._closed:
                raise Unavailable(f"optimizer '{self.key}' was deleted or the server is shutting down")
            engine = self._engine
            store: dict[str, np.ndarray] = {}
            if engine.built:
                engine.save_own_variables(store)  # copies
            return OptimizerSnapshot(
                key=self.key,
                config=_normalize(engine.get_config()),
                initial_config=self.initial_config,
                policy=asdict(self.policy),
                exclusions=engine.weight_decay_exclusions,
                built=engine.built,
                variables=engine.trainable_variables if engine.built else {},  # copies
                store=store,
                version=self._version,
                iterations=engine.iterations,
                dedup=self._dedup.finished(),
                workers={w: {"last_step": v.last_step, "pushes": v.pushes} for w, v in self._workers.items()},
                # Received gradients are never mutated, so the round can be shared, not copied.
                round=[
                    RoundContribution(
                        worker,
                        c.request_id,
                        {n: (g.indices, g.values) if isinstance(g, RowSparseGradient) else g for n, g in c.grads.items()},
                    )
                    for worker, c in sorted(self._round.items())
                ],
                last_closed=self._last_closed,
                last_abort=self._last_abort,
            )

    def restore(self, snap: OptimizerSnapshot, engine: Adamax, *, fence: bool = True) -> tuple[int, int]:
        """Replace all state with ``snap`` (``engine`` already holds its variables).

        Fenced: pushes whose payload is still streaming are rejected (StateRestored) and
        nothing is half-applied, since every apply happens under this lock. With ``fence``
        the version moves past both the current and the saved one, so every worker sees a
        new version on its next call; without it (a fresh host) the saved version is kept.
        """
        with self._cond:
            if self._closed:
                raise Unavailable(f"optimizer '{self.key}' was deleted or the server is shutting down")
            self._reset_round()
            self._engine = engine
            self.policy = Policy(**snap.policy)
            self.initial_config = snap.initial_config
            self._dedup = _DedupTable.from_finished(self._dedup_capacity, snap.dedup)
            now = time.monotonic()
            self._workers = {w: _Worker(int(v["last_step"]), int(v["pushes"]), now) for w, v in snap.workers.items()}
            for c in snap.round:
                grads = {
                    n: RowSparseGradient(np.asarray(g[0]), np.asarray(g[1])) if isinstance(g, tuple) else g
                    for n, g in c.grads.items()
                }
                self._round[c.worker_id] = _Contribution(c.request_id, grads)
            if self._round and self.policy.round_timeout is not None:
                self._start_round_timer()
            self._last_closed, self._last_abort = snap.last_closed, snap.last_abort
            self._restore_epoch += 1
            self._pull_cache.clear()
            self._copy_pool.clear()
            self._set_version(max(self._version, snap.version) + 1 if fence else snap.version)
            return self._version, engine.iterations

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._reset_round()
            self._cond.notify_all()


def _describe_specs(specs: Sequence[tuple[str, tuple[int, ...], np.dtype]]) -> str:
    return "[" + ", ".join(f"{n}{list(s)}:{np.dtype(d).name}" for n, s, d in specs) + "]"


def _non_finite_message(bad: Mapping[str, int], *, skipped: bool = False) -> str:
    listing = ", ".join(f"'{n}' ({c} NaN/Inf)" for n, c in bad.items())
    if skipped:
        return f"non-finite gradient values in {listing}: step skipped, variables unchanged"
    return (
        f"Gradients must be finite; found non-finite values in {listing}. The push was rejected "
        "and nothing changed. Create the optimizer with non_finite='skip' to skip such steps "
        "like keras.mixed_precision.LossScaleOptimizer."
    )


# ---------------------------------------------------------------- the registry


EngineFactory = Callable[[Mapping[str, Any]], Adamax]


class CoordinatorObserver(Protocol):
    """Hooks for metrics (``adamax_server.metrics.ServerMetrics``); called under a host's lock."""

    def on_apply(
        self, optimizer: str, seconds: float, stats: Mapping[str, GradientStats], iterations: int,
        config: Mapping[str, Any],
    ) -> None: ...

    def on_round_closed(self, optimizer: str, wait_seconds: float, arrived: int, num_workers: int) -> None: ...


class Coordinator:
    """All optimizers of one server, keyed by name."""

    def __init__(
        self,
        *,
        device: str = "auto",
        engine_factory: EngineFactory | None = None,
        dedup_capacity: int = 1024,
        max_optimizers: int = 1024,
        observer: CoordinatorObserver | None = None,
    ) -> None:
        self._observer = observer
        self._engine_factory: EngineFactory = engine_factory or (lambda cfg: Adamax.from_config(cfg, device=device))
        self._dedup_capacity = dedup_capacity
        self._max_optimizers = max_optimizers
        self._lock = threading.Lock()
        self._hosts: dict[str, OptimizerHost] = {}
        self._closed = False
        self.device = device

    def create(self, key: str, config: Mapping[str, Any], policy: Policy) -> tuple[bool, OptimizerHost]:
        """Create an optimizer from a Keras config; idempotent for an identical config and policy."""
        if not key:
            raise InvalidArgument("`optimizer` (the key of the optimizer on the server) must be a non-empty string.")
        config = dict(config)
        if config.get("name") is None:
            config["name"] = key
        with self._lock:
            self._require_open()
            existing = self._hosts.get(key)
        if existing is None:
            engine = self._engine_factory(config)  # Keras-style ValueError on a bad config
            normalized = _normalize(engine.get_config())
        else:
            engine = None
            normalized = _normalize(self._engine_factory(config).get_config())
        with self._lock:
            existing = self._hosts.get(key)
            if existing is not None:
                if existing.initial_config != normalized or existing.policy != policy:
                    raise AlreadyExists(
                        f"optimizer '{key}' already exists with a different "
                        f"{'config' if existing.initial_config != normalized else 'coordination policy'}; "
                        "use another name or the same settings"
                    )
                return False, existing
            if engine is None:
                engine = self._engine_factory(config)
            if len(self._hosts) >= self._max_optimizers:
                raise ResourceExhausted(f"this server hosts at most {self._max_optimizers} optimizers")
            host = OptimizerHost(
                key, engine, normalized, policy, dedup_capacity=self._dedup_capacity, observer=self._observer
            )
            self._hosts[key] = host
            return True, host

    def engine_from_snapshot(self, snap: OptimizerSnapshot) -> Adamax:
        """A new engine holding ``snap``'s config, exclusions, variables and store."""
        engine = self._engine_factory(snap.config)
        exclusions = snap.exclusions
        if exclusions.get("var_list") or exclusions.get("var_names"):
            engine.exclude_from_weight_decay(
                var_list=exclusions.get("var_list") or None, var_names=exclusions.get("var_names") or None
            )
        if snap.built:
            engine.build(dict(snap.variables))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                engine.load_own_variables(snap.store)
            if caught:  # Keras only warns on a variable-count mismatch; a restore must not skip
                raise InvalidArgument(f"cannot restore optimizer '{snap.key}': {caught[0].message}")
        return engine

    def restore(self, snap: OptimizerSnapshot) -> tuple[OptimizerHost, int, int]:
        """Restore one optimizer: replace a running one (fenced) or create it with the saved version."""
        engine = self.engine_from_snapshot(snap)  # the slow part, outside every lock
        with self._lock:
            self._require_open()
            host = self._hosts.get(snap.key)
            if host is None:
                if len(self._hosts) >= self._max_optimizers:
                    raise ResourceExhausted(f"this server hosts at most {self._max_optimizers} optimizers")
                host = OptimizerHost(
                    snap.key, engine, snap.initial_config, Policy(**snap.policy),
                    dedup_capacity=self._dedup_capacity, observer=self._observer,
                )
                version, iterations = host.restore(snap, engine, fence=False)
                self._hosts[snap.key] = host
                return host, version, iterations
        version, iterations = host.restore(snap, engine, fence=True)
        return host, version, iterations

    def _require_open(self) -> None:
        if self._closed:
            raise Unavailable("the parameter server is shutting down")

    def get(self, key: str) -> OptimizerHost:
        with self._lock:
            self._require_open()
            host = self._hosts.get(key)
            if host is None:
                raise NotFound(f"no optimizer named '{key}' on this server. Existing: {sorted(self._hosts)}")
            return host

    def hosts(self) -> list[OptimizerHost]:
        with self._lock:
            return [self._hosts[k] for k in sorted(self._hosts)]

    def delete(self, key: str) -> bool:
        with self._lock:
            host = self._hosts.pop(key, None)
        if host is None:
            return False
        host.close()
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            hosts, self._hosts = list(self._hosts.values()), {}
        for host in hosts:
            host.close()


def _normalize(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config as plain JSON values, so equal settings compare equal."""
    return json.loads(json.dumps(config, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"config value of type {type(value).__name__} is not JSON serializable")


def config_to_json(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=_json_default)
