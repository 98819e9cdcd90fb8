"""A server's optimizer: a one-shard job behind the single server's API.

``adamax-ps serve`` without ``--shards`` hosts every optimizer as the degenerate case of a
sharded job: one ``ShardHost`` holding every variable whole, and the ``Leader`` sequencing it,
called in process (no network, no thread handoff). A plain server and the shards of a sharded
job therefore run the same code for everything a push does: staging (received into a pooled
gradient set and applied where it landed), the step checks, exactly-once, sync rounds (K of N,
timeouts, late pushes), the non-finite policy, the clipping decision, the ordered commit, and
checkpoints (a server's snapshot is its one-shard cut assembled into the single-server format;
restoring one cuts it onto one shard again).

``OptimizerHost`` adds what the single server's API offers on top: a check of each tensor
header before its payload is read (``check_gradient``), a retry answered before its payload is
read, worker records, the pull cache (one encoded copy per version), fenced restores,
``stateless_apply`` and the metrics hooks. Nothing here imports grpc or the wire contract.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal

import numpy as np

from adamax_server.coordination.policy import (
    FLOAT_DTYPES, CoordinatorObserver, Gradient, OptimizerStatus, Policy, PullResult, PushResult, ReceiveProgress,
    StagingLookup, T, TensorMeta, WorkerStatus, normalize_config,
)  # fmt: skip
from adamax_server.coordination.snapshot import OptimizerSnapshot
from adamax_server.coordination.stats import GradientStats, ReceivedGradients
from adamax_server.errors import FailedPrecondition, InvalidArgument, NotFound, ServiceError, StateRestored, Unavailable
from adamax_server.optim.engine import RowSparseGradient
from adamax_server.sharding.job import JobCheckpoint, assemble_checkpoint, split_checkpoint
from adamax_server.sharding.leader import Leader
from adamax_server.sharding.shard import ShardHost
from adamax_server.sharding.shard_engine import ShardEngine

_log = logging.getLogger("adamax_server.coordination.host")

EngineFactory = Callable[[Mapping[str, Any]], ShardEngine]
# A one-shard job decides every staged push at once, or keeps it in the open sync round: a
# staged push never waits for a commit that may not come, so it never expires.
_NEVER = float("inf")


class _Inline:
    """The job's only shard, called directly by its leader (``Leader._fan`` runs it in place)."""

    inline = True

    def __init__(self, host: ShardHost) -> None:
        self.index = 0
        self.host = host

    def call(self, method: str, *args: Any, timeout: float) -> Any:
        return getattr(self.host, method)(*args)


class OptimizerHost:
    """One hosted optimizer: a one-shard job (see the module docstring). Thread safe."""

    _PULL_CACHE_KEYS = 8
    _FREE_REFS = 3  # a pooled array referenced only by its dict, a loop variable and getrefcount

    def __init__(
        self,
        key: str,
        engine_factory: EngineFactory,
        initial_config: dict[str, Any],
        policy: Policy,
        *,
        dedup_capacity: int,
        observer: CoordinatorObserver | None = None,
    ) -> None:
        self.key = key
        self.policy = policy
        self.initial_config = initial_config
        self._engine_factory = engine_factory
        self._dedup_capacity = dedup_capacity
        self._observer = observer  # metrics hooks (adamax_server.ops.metrics)
        self._lock = threading.RLock()  # build, restore and close
        self._seen: dict[str, float] = {}  # worker id -> last contact (monotonic)
        self._receiving: dict[tuple[str, str], int] = {}  # pushes whose payload is being read
        self._receiving_lock = threading.Lock()
        self._epoch = 0  # bumped by restore(): pushes received before it are not applied
        self._closed = False
        self._encode_lock = threading.Lock()
        self._pull_cache: OrderedDict[tuple[str, tuple[str, ...]], PullResult[Any]] = OrderedDict()
        self._copy_pool: dict[tuple[str, tuple[str, ...]], list[dict[str, np.ndarray]]] = {}
        self._shard, self._leader = self._new_job(initial_config, policy)

    def _new_job(self, config: Mapping[str, Any], policy: Policy) -> tuple[ShardHost, Leader]:
        shard = ShardHost(self.key, 0, 1, self._engine_factory, config, asdict(policy), staging_ttl=_NEVER)
        leader = Leader(self.key, policy, dict(config), [_Inline(shard)], lambda: shard.placement,
                        dedup_capacity=self._dedup_capacity)  # fmt: skip
        shard.on_apply = self._on_apply
        leader.on_round_closed = self._on_round_closed
        return shard, leader

    # -------------------------------------------------------------- metrics

    def _on_apply(self, seconds: float, stats: Mapping[str, GradientStats], iterations: int) -> None:
        self._observe("on_apply", seconds, stats, iterations, self.initial_config)

    def _on_round_closed(self, waited: float, arrived: int, num_workers: int) -> None:
        self._observe("on_round_closed", waited, arrived, num_workers)

    def _observe(self, hook: str, *args: Any) -> None:
        if self._observer is None:
            return
        try:  # metrics must never fail a push that was already applied
            getattr(self._observer, hook)(self.key, *args)
        except Exception:  # noqa: BLE001
            _log.exception("metrics hook %s failed", hook)

    # -------------------------------------------------------------- inspection

    @property
    def version(self) -> int:
        return self._shard.version

    @property
    def iterations(self) -> int:
        return self._shard.iterations

    @property
    def restore_epoch(self) -> str:
        """Changes with every restore: weights copied before it are stale whatever their version."""
        return self._shard.incarnation

    def status(self) -> OptimizerStatus:
        now = time.monotonic()

        def read(engine: ShardEngine) -> tuple[Any, ...]:
            config = engine.get_config()
            specs = list(engine.variable_specs) if engine.built else []
            return config, engine.built, specs, engine.iterations, float(engine.learning_rate), self._shard.version

        config, built, specs, iterations, learning_rate, version = self._shard.read_engine(read)
        counts = self._leader.worker_counts()
        seen = dict(self._seen)
        return OptimizerStatus(
            key=self.key,
            config=config,
            policy=self.policy,
            built=built,
            specs=specs,
            version=version,
            iterations=iterations,
            learning_rate=learning_rate,
            learning_rate_is_schedule=config["learning_rate"].__class__ is dict,
            workers=[
                WorkerStatus(w, counts.get(w, {}).get("last_step", -1), counts.get(w, {}).get("pushes", 0),
                             now - seen.get(w, now))  # fmt: skip
                for w in sorted(set(seen) | set(counts))
            ],
            round_arrivals=self._leader.status()["round_arrivals"],
        )

    def variable_specs(self) -> list[tuple[str, tuple[int, ...], np.dtype]]:
        """(name, shape, dtype) of the model variables in build order (empty before build)."""
        return self._shard.piece_specs()

    def touch(self, worker_id: str) -> None:
        """Record that ``worker_id`` was seen (status shows when each worker last called)."""
        self._seen[worker_id] = time.monotonic()

    def read_weights_into(self, outs: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """Copy the current weights into ``outs`` (name -> host array) under the lock, straight
        from the engine's buffers (the shared-memory pull segment); (version, iterations)."""
        return self._shard.read_pieces_into(outs)

    def _require_built(self) -> None:
        if self._closed:
            raise Unavailable(f"optimizer '{self.key}' was deleted or the server is shutting down")
        if not self._shard.built:
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
        with self._lock:
            if self._closed:
                raise Unavailable(f"optimizer '{self.key}' was deleted")
            if worker_id:
                self.touch(worker_id)
            built = self._shard.built
            if not built:
                for name, _, dtype in specs:
                    if dtype.name not in ("float16", "float32", "float64"):
                        raise InvalidArgument(
                            f"Variable '{name}' must be float16, float32 or float64. Received: dtype={dtype}"
                        )
            self._shard.build([(n, s, d.name) for n, s, d in specs], dict(variables))
            return not built

    # -------------------------------------------------------------- push

    def check_gradient(self, meta: TensorMeta) -> None:
        """Validate a gradient's header against the variable before its payload is read."""
        self._require_built()
        specs = self._shard.piece_shapes()
        if meta.name not in specs:
            raise NotFound(f"optimizer '{self.key}' has no variable '{meta.name}'. Known variables: {list(specs)}")
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
        """Handle one push exactly once; ``receive(lookup)`` reads its gradients (outside every lock).

        ``lookup(name, dtype)`` hands out receive buffers in a pooled gradient set of the
        engine, which becomes its staging buffers when the push is applied (no copy). A retry
        of a decided push is answered before its payload is read, and so is a step the job
        refuses. The push is then staged and committed by the job's leader: applied, counted
        in the sync round, skipped or refused, exactly as on every shard of a sharded job. A
        failed push changes nothing and may be retried with the same request id.
        """
        if not worker_id:
            raise InvalidArgument("Every push must carry a non-empty `worker_id`.")
        if not request_id:
            raise InvalidArgument("Every push must carry a non-empty `request_id` (reuse it when retrying).")
        self._require_built()
        self.touch(worker_id)
        early = self._leader.precheck(worker_id, request_id, step)
        if early is not None:
            return early
        epoch = self._epoch
        taken: list[Any] = []
        key = (worker_id, request_id)
        with self._receiving_lock:
            self._receiving[key] = self._receiving.get(key, 0) + 1
        try:
            grads = receive(self._shard.receive_lookup(taken))
            if progress is not None:  # all arrived: nothing to cancel any more
                progress.cancel = None
            _validate_payload(self.key, grads, self._shard.piece_rows())
        except BaseException:
            self._shard.forget_receive(taken)  # the set it was being received into is free again
            raise
        finally:
            with self._receiving_lock:
                left = self._receiving.pop(key) - 1
                if left:
                    self._receiving[key] = left
        items = grads if isinstance(grads, ReceivedGradients) else ReceivedGradients(grads)
        items.gradient_sets = taken
        self._shard.stage(worker_id, request_id, items)
        try:
            with self._leader.lock:
                if self._epoch != epoch:
                    raise StateRestored(
                        f"optimizer '{self.key}' was restored from a checkpoint while push {request_id!r} was in "
                        f"flight; it was not applied. Pull version {self.version} and recompute.",
                        current_version=self.version,
                    )
                return self._leader.push(worker_id, request_id, step, timeout=timeout)
        except BaseException:
            if not self._leader.holds(key):  # not in the open round: nothing keeps it staged
                self._shard.drop([key])
            raise

    def in_flight(self) -> list[tuple[str, str]]:
        """(worker id, request id) of the pushes whose payload is being received now."""
        with self._receiving_lock:
            return sorted(self._receiving)

    def device_receiver(self) -> Any:
        """Receive helper for pushes (GPU engine, async mode), or None.

        In async mode each push is one step, so its gradients can go to the GPU while they
        arrive; sync rounds combine pushes on the host first.
        """
        if self.policy.mode != "async":
            return None
        return self._shard.device_receiver()

    # -------------------------------------------------------------- pull

    def wait_for_version(self, min_version: int, timeout: float | None) -> int:
        """Block until the version reaches ``min_version``; return the current version."""
        self._require_built()
        return self._shard.wait_for_version(min_version, timeout)

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
        key = (encoding, tuple(names))
        with self._encode_lock:
            self._require_built()
            if worker_id:
                self.touch(worker_id)
            version = self._shard.version
            if known_version is not None and known_version == version:
                return PullResult(version, self._shard.iterations, True, None)
            cached = self._pull_cache.get(key)
            if cached is not None and cached.version == version:
                self._pull_cache.move_to_end(key)
                return cached
            if cached is not None:  # an older version: let it go before copying the new one
                del self._pull_cache[key]
                cached = None
            version, iterations, values = self._weights_copy(key)
            result = PullResult(version, iterations, False, encode(version, iterations, list(values.items())))
            self._pull_cache[key] = result
            self._pull_cache.move_to_end(key)
            while len(self._pull_cache) > self._PULL_CACHE_KEYS:
                self._pull_cache.popitem(last=False)
            return result

    def _weights_copy(self, key: tuple[str, tuple[str, ...]]) -> tuple[int, int, dict[str, np.ndarray]]:
        """(version, iterations, a private host copy of the weights: all, or ``key``'s names).

        Copies go into arrays of an earlier version when nothing references them any more (no
        cached reply, no pull still sending them): fresh memory would cost page faults on
        every version, under the lock.
        """
        names = key[1]
        specs: Mapping[str, tuple[tuple[int, ...], np.dtype]] = self._shard.piece_shapes()
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
        version, iterations = self._shard.read_pieces_into(chosen)
        return version, iterations, dict(chosen)

    # -------------------------------------------------------------- the rest of the Keras API

    def get_config(self) -> dict[str, Any]:
        return self._shard.engine_settings()[0]

    def set_learning_rate(self, learning_rate: float) -> None:
        self._leader.set_learning_rate(learning_rate)

    def exclude_from_weight_decay(self, var_list: Sequence[str], var_names: Sequence[str]) -> None:
        self._shard.exclude_from_weight_decay(var_list, var_names)

    def _mutate(self, op: str, args: dict[str, Any]) -> tuple[int, int]:
        """An ordered change of state outside a step (a new version), as on every shard."""
        self._require_built()
        return self._leader.mutate(op, lambda i: args)

    def finalize_variable_values(self) -> tuple[int, int]:
        return self._mutate("finalize", {})

    def assign(self, op: Literal["assign", "assign_add", "assign_sub"], name: str, value: np.ndarray) -> tuple[int, int]:
        return self._mutate("assign", {"kind": op, "name": name, "pieces": {name: value}})

    def set_weights(self, weights: Sequence[np.ndarray]) -> tuple[int, int]:
        return self._mutate("set_weights", {"weights": list(weights)})

    def load_own_variables(self, store: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """Keras's ``load_own_variables``, except that a store of the wrong size is refused
        (InvalidArgument with Keras's message; Keras only warns and loads nothing)."""
        return self._mutate("load_store", {"store": dict(store)})

    def save_own_variables(self) -> dict[str, np.ndarray]:
        self._require_built()
        return self._shard.save_own_variables()[1]

    def stateless_apply(
        self, optimizer_variables: Sequence[Any], grads: Sequence[Gradient], trainable_variables: Sequence[Any]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        self._require_built()
        return self._shard.stateless_apply(optimizer_variables, grads, trainable_variables)

    # -------------------------------------------------------------- checkpoints

    def snapshot(self) -> OptimizerSnapshot:
        """The job's one-shard cut, assembled (single-server format), taken between two events."""
        with self._leader.lock:
            if self._closed:
                raise Unavailable(f"optimizer '{self.key}' was deleted or the server is shutting down")
            version, keys = self._leader.quiesce()
            part = self._shard.snapshot(keep=keys)
            state = self._leader.leader_state()
        config = normalize_config(part.config)
        if part.placement is None:  # created, not built
            return OptimizerSnapshot(
                key=self.key, config=config, initial_config=self.initial_config, policy=asdict(self.policy),
                exclusions=part.exclusions, built=False, variables={}, store={}, version=version,
                iterations=part.iterations, dedup=state["dedup"], workers=state["workers"],
                last_closed=state["last_closed"], last_abort=state["last_abort"],
            )  # fmt: skip
        snap = assemble_checkpoint(JobCheckpoint(self.key, version, config, asdict(self.policy), part.placement, state, [part]))
        snap.initial_config = self.initial_config
        return snap

    def restore(self, snap: OptimizerSnapshot, *, fence: bool = True) -> tuple[int, int]:
        """Replace all state with ``snap``.

        Fenced (a running optimizer): pushes received before the restore are not applied
        (StateRestored), the version moves past both the current and the saved one so every
        worker sees a new version on its next call, and the checkpoint's open sync round is
        dropped with its request ids: its gradients belong to weights no worker holds now.
        Without ``fence`` (a fresh host: crash-resume) the saved version and round are kept.
        """
        policy = Policy(**snap.policy)
        prepared = state = None
        if snap.built:  # the slow part (an engine built and loaded), before any lock
            ckpt = split_checkpoint(snap, 1)
            part, state = ckpt.shards[0], dict(ckpt.leader)
            if fence:
                gone = {(c.worker_id, c.request_id) for c in snap.round}
                part.staged = {}
                state["round"] = {}
                state["dedup"] = {w: [e for e in entries if (w, e[0]) not in gone] for w, entries in snap.dedup.items()}
            try:
                prepared = self._shard.prepare_restore(part)
            except ServiceError:
                raise
            except Exception as exc:  # Keras warns (or raises) on a store that does not fit
                raise InvalidArgument(f"cannot restore optimizer '{snap.key}': {exc}") from exc
        with self._lock, self._leader.lock:
            if self._closed:
                raise Unavailable(f"optimizer '{self.key}' was deleted or the server is shutting down")
            version = max(self.version, snap.version) + 1 if fence else snap.version
            dropped = [c.worker_id for c in snap.round] if fence else []
            if prepared is None:  # created, not built: a new job with the saved settings
                shard, leader = self._new_job(snap.config, policy)
                ex = snap.exclusions
                if ex.get("var_list") or ex.get("var_names"):
                    shard.exclude_from_weight_decay(ex.get("var_list") or [], ex.get("var_names") or [])
                shard.version = leader.version = version
                old, self._shard, self._leader = self._leader, shard, leader
                old.close()
            else:
                assert state is not None
                prepared.snap.version = state["version"] = version
                self._leader.policy = policy
                self._shard.activate_restore(prepared)
                self._leader.restore_state(state)
            self.policy = policy
            self.initial_config = snap.initial_config
            self._epoch += 1
            now = time.monotonic()
            self._seen = {w: now for w in snap.workers}
            self._pull_cache.clear()
            self._copy_pool.clear()
            if dropped:
                _log.warning(
                    "optimizer '%s': restored to version %d; the checkpoint's open sync round for version %d "
                    "(pushed by %s) was dropped, since workers now pull and push for version %d",
                    self.key, version, snap.version, ", ".join(dropped), version,
                )  # fmt: skip
            return version, self._shard.iterations

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._leader.close()
            self._shard.close()


def _validate_payload(key: str, grads: Sequence[tuple[str, Gradient]], rows: Mapping[str, int]) -> None:
    """Names known and unique, row-sparse indices in range; ``rows``: first dimension per variable."""
    seen: set[str] = set()
    for name, g in grads:
        if name not in rows:
            raise NotFound(f"optimizer '{key}' has no variable '{name}'. Known variables: {list(rows)}")
        if name in seen:
            raise InvalidArgument(f"The push carries two gradients for variable '{name}'.")
        seen.add(name)
        if isinstance(g, RowSparseGradient) and g.indices.size:
            low, high = int(g.indices.min()), int(g.indices.max())
            if low < 0 or high >= rows[name]:
                raise InvalidArgument(
                    f"Row-sparse gradient for variable '{name}': row indices must be in [0, {rows[name]}). "
                    f"Received min={low}, max={high}."
                )

