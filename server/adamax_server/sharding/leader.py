"""The job's sequencer: shard 0 decides, in one place, what every shard applies and in which order.

A push to a sharded job is two-phase and exactly-once:

1. the worker *stages* its slice on every shard (in parallel; ``ShardHost.stage``);
2. the worker asks the leader to *commit* it (``Leader.push``). Under the job's lock the leader
   answers a retry from its exactly-once table, checks the step (ahead, stale, late), and
   either adds the push to the open sync round or, in async mode, makes it the next event
   ``v``: ``prepare(v)`` on every shard (in parallel) returns non-finite counts, which
   variables have a gradient and the unit sums of a clipped step; the leader computes the
   clip denominators or the global scale exactly (``shard_engine.decide_clipping``) and sends
   ``commit(v)`` to every shard.

All or none: if a shard cannot prepare (unreachable, restarted, push not staged), the leader
aborts event ``v`` everywhere and nothing was applied: the worker gets a clear error and may
retry with the same request id. Once every shard prepared, the event is *decided*: its
outcome is recorded in the exactly-once table and the commit is delivered to every shard; a
shard that misses it is *lagging* and the leader redelivers the same commit (the shard still
holds the prepared step) before it decides anything else. Until then every call fails with
``Unavailable`` (no shard moves past another by more than the decided event). A lagging shard
that restarted has lost its prepared step: the job then needs a restore of one consistent
checkpoint on every shard (``restore_job``); pushes acknowledged after that cut are lost, as
on a single server that restarts from its last checkpoint.

Sync rounds have one decision for the job: the leader keeps the round (K of N, round timeout,
late pushes) and closes it as one event whose contributions every shard sums in worker-id
order, as a single server does. A round that aborts drops the staged pushes everywhere. The
step checks and the round are decided by ``coordination.sequencing``, the code a single
server decides with; only carrying a decided step out differs.

Staged pushes that are never committed (the worker died between the phases) expire on the
shards after ``staging_ttl``; they were never applied anywhere.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from adamax_server.coordination.dedup import DedupTable as _DedupTable
from adamax_server.coordination.policy import Policy, PushResult
from adamax_server.coordination.sequencing import SyncRound, check_step, non_finite_outcome
from adamax_server.coordination.stats import MissingGradientLog
from adamax_server.coordination.stats import non_finite_message as _non_finite_message
from adamax_server.coordination.stats import sum_counts as _sum_counts
from adamax_server.errors import (
    FailedPrecondition, InvalidArgument, ServiceError, Unavailable, WaitTimeout,
)
from adamax_server.sharding import pairwise
from adamax_server.sharding.links import DecidedUnconfirmed, ShardLink, ShardUnavailable, StagedDrops
from adamax_server.sharding.links import PartialFailure as _PartialFailure
from adamax_server.sharding.placement import Placement
from adamax_server.sharding.shard_engine import CLIP_GLOBAL, CLIP_NORM, ClipDecision, decide_clipping

_log = logging.getLogger(__name__)


@dataclass
class _Pending:
    request_id: str
    step: int


@dataclass
class _Lag:
    version: int
    action: str  # "apply" | "bump" | a mutate op
    payload: Any
    incarnation: str


class Leader:
    """One optimizer's sequencer (runs on shard 0); see the module docstring."""

    def __init__(
        self,
        key: str,
        policy: Policy,
        config: dict[str, Any],
        links: Sequence[ShardLink],
        placement: Callable[[], Placement | None],
        *,
        dedup_capacity: int = 1024,
        call_timeout: float = 10.0,
    ) -> None:
        self.key = key
        self.policy = policy
        self.config = config
        self._links = list(links)
        self._placement = placement
        self._timeout = call_timeout
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self._links)), thread_name_prefix=f"leader-{key}")
        self._drop_quietly = StagedDrops(self._links, call_timeout, key)  # staged copies of refused pushes
        self.version = 0
        self.iterations = 0
        # The learning rate last set on the job (None: the config's). Setting it is not an event
        # (a single server's version does not move either); every step event carries it instead.
        self.learning_rate: float | None = None
        self._dedup = _DedupTable(dedup_capacity)
        self._dedup_capacity = dedup_capacity
        # The open sync round, decided as a single server decides it (coordination.sequencing).
        self._sync: SyncRound[_Pending] = SyncRound(key, lambda: self.policy, self._cond, self._on_round_timeout,
                                                    lambda: self._closed)  # fmt: skip
        self._workers: dict[str, dict[str, int]] = {}
        self._lagging: dict[int, _Lag] = {}
        self._incarnations: dict[int, str] = {}
        self._broken = ""  # why the job needs a restore, if it does
        self._rewound: tuple[int, int] | None = None  # (highest version before, version after) a restore
        self._verify = False  # a restarted leader compares every shard's version before it decides
        self._closed = False
        self._log_missing = MissingGradientLog(key)  # steps without a gradient for some variables
        # Metrics of each closed sync round: (seconds since its first push, pushes, num_workers).
        self.on_round_closed: Callable[[float, int, int], None] | None = None

    # -------------------------------------------------------------- fan-out

    def _fan(self, method: str, args_for: Callable[[int], tuple[Any, ...]], shards: Sequence[int] | None = None) -> dict[int, Any]:
        """Call every shard (or ``shards``) in parallel; raise the first failure after all returned.

        The leader's own shard (a link marked ``inline``) is called in this thread while the
        others run on the pool: no thread handoff for the call that needs no network."""
        if len(self._links) == 1 and shards is None:  # a one-shard job (every plain server): no fan-out
            try:
                return {0: self._links[0].call(method, *args_for(0), timeout=self._timeout)}
            except BaseException as exc:  # noqa: BLE001 - reported as the fan-out reports it
                raise _PartialFailure({}, {0: exc}) from exc
        targets = list(range(len(self._links))) if shards is None else list(shards)
        inline = [i for i in targets if getattr(self._links[i], "inline", False)]
        futures = {i: self._pool.submit(self._call, i, method, *args_for(i)) for i in targets if i not in inline}
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        for i in inline:
            try:
                results[i] = self._call(i, method, *args_for(i))
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
                errors[i] = exc
        for i, fut in futures.items():
            try:
                results[i] = fut.result()
            except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
                errors[i] = exc
        results = {i: results[i] for i in targets if i in results}  # shard order, as before
        if errors:
            first = min(errors)
            raise _PartialFailure(results, errors) from errors[first]
        return results

    def _call(self, i: int, method: str, *args: Any) -> Any:
        return self._links[i].call(method, *args, timeout=self._timeout)

    # -------------------------------------------------------------- health

    def _require_healthy(self) -> None:
        """Redeliver decided events to lagging shards; refuse work while one still lags."""
        if self._closed:
            raise Unavailable(f"optimizer '{self.key}' was deleted or the server is shutting down")
        if self._broken:
            raise FailedPrecondition(self._broken, current_version=self.version)
        for i, lag in sorted(self._lagging.items()):
            try:
                if lag.action in ("apply", "bump"):
                    version, iterations = self._call(i, "commit", lag.version, lag.action, lag.payload)
                else:
                    version, iterations = self._call(i, "mutate", lag.version, lag.action, lag.payload)
            except ShardUnavailable as exc:
                raise ShardUnavailable(
                    f"shard {i} of optimizer '{self.key}' has not confirmed version {lag.version} and is still "
                    f"unreachable ({exc.message}); retry later with the same request id",
                    current_version=self.version,
                ) from exc
            except ServiceError as exc:
                self._broken = (
                    f"shard {i} of optimizer '{self.key}' lost decided version {lag.version} ({exc.message}); "
                    "the job must be restored from a checkpoint on every shard (adamax-ps checkpoint restore)"
                )
                _log.error("%s", self._broken)
                raise FailedPrecondition(self._broken, current_version=self.version) from exc
            del self._lagging[i]
            _log.info("shard %d of '%s' caught up to version %d", i, self.key, version)
        if self._verify:
            self._verify_shards()

    def verify_shards_first(self) -> None:
        """This leader restarted from a checkpoint: check the other shards before deciding anything."""
        with self._cond:
            self._verify = True

    def _verify_shards(self) -> None:
        """Every shard at the leader's version, or the job is broken (it needs one cut everywhere).

        A leader restarted with ``--restore latest`` is at its newest cut; shards that kept
        running may be ahead of it (pushes acknowledged after that cut), or one event apart
        (killed between two commits). Deciding the next event on top of that would diverge the
        shards, so the job is marked broken and healed to the newest common cut instead.
        """
        try:
            got = self._fan("state_version", lambda i: ())
        except _PartialFailure as exc:
            raise exc.as_service_error(
                self.key, "the restarted leader has not yet seen every shard; nothing was applied, retry later", self.version
            ) from exc
        self._verify = False
        others = {i: int(r[0]) for i, r in sorted(got.items()) if int(r[0]) != self.version}
        if others:
            self._broken = (
                f"the leader (shard 0) of optimizer '{self.key}' restarted at version {self.version} (its newest "
                f"checkpoint) while shard(s) {sorted(others)} are at version(s) {sorted(set(others.values()))}; "
                "restore one checkpoint on every shard (adamax-ps checkpoint restore) to make the job consistent again"
            )
            _log.error("%s", self._broken)
            raise FailedPrecondition(self._broken, current_version=self.version)

    def mark_broken(self, why: str) -> None:
        """Refuse every push, change and checkpoint until a restore completes on every shard."""
        with self._cond:
            self._broken = why
            self._cond.notify_all()

    def _note_restarted(self, errors: dict[int, BaseException]) -> None:
        """A shard at another version than the leader restarted (from a checkpoint, or empty)."""
        for i, err in sorted(errors.items()):
            shard_version = getattr(err, "current_version", None)
            if isinstance(err, FailedPrecondition) and shard_version is not None and shard_version != self.version:
                self._broken = (
                    f"shard {i} of optimizer '{self.key}' is at version {shard_version} while the job is at "
                    f"{self.version} (it restarted); restore one checkpoint on every shard "
                    "(adamax-ps checkpoint restore) to make the job consistent again"
                )
                _log.error("%s", self._broken)
                return

    # -------------------------------------------------------------- push

    def push(self, worker_id: str, request_id: str, step: int, *, timeout: float | None = None) -> PushResult:
        """Commit a push the worker staged on every shard (see the module docstring)."""
        if not worker_id:
            raise InvalidArgument("Every push must carry a non-empty `worker_id`.")
        if not request_id:
            raise InvalidArgument("Every push must carry a non-empty `request_id` (reuse it when retrying).")
        with self._cond:
            entry = self._dedup.get(worker_id, request_id)
            if entry is not None and entry.result is not None:
                if self._lagging:
                    self._require_healthy()  # its outcome is confirmed once every shard has it
                pending = self._sync.entries.get(worker_id)
                if pending is None or pending.request_id != request_id:  # a retry re-staged a decided push
                    self._drop_quietly((worker_id, request_id))
                return replace(entry.result, duplicate=True)
            self._require_healthy()
            try:
                self._check_step(step)
            except ServiceError:
                self._drop_quietly((worker_id, request_id))  # refused for good: its slices are not kept
                raise
            self._dedup.begin(worker_id, request_id)
            try:
                result = self._handle(worker_id, request_id, step)
            except DecidedUnconfirmed as exc:
                if exc.result is not None:  # final: a retry is answered with it once confirmed
                    self._dedup.finish(worker_id, request_id, exc.result)
                    self._count_push(worker_id, step)
                self._cond.notify_all()
                raise
            except BaseException:
                if self._dedup.get(worker_id, request_id) is not None and self._dedup.get(worker_id, request_id).result is None:
                    self._dedup.discard(worker_id, request_id)
                raise
            self._count_push(worker_id, step)
            self._cond.notify_all()
            return result

    def precheck(self, worker_id: str, request_id: str, step: int) -> PushResult | None:
        """Before a push's gradients are read: the outcome of a push already decided (a retry,
        answered without its payload), or None after the step checks passed (else they raise)."""
        with self._cond:
            entry = self._dedup.get(worker_id, request_id)
            if entry is not None and entry.result is not None and not self._lagging:
                return replace(entry.result, duplicate=True)
            if entry is None:
                self._check_step(step)
            return None

    def _count_push(self, worker_id: str, step: int) -> None:
        """Per-worker push counts, as a single server keeps them (status, checkpoints)."""
        record = self._workers.setdefault(worker_id, {"last_step": -1, "pushes": 0})
        record["pushes"] += 1
        record["last_step"] = int(step)

    def _check_step(self, step: int) -> None:
        check_step(self.key, self.policy, self.version, step, self._rewound, where=" on every shard")

    def _handle(self, worker_id: str, request_id: str, step: int) -> PushResult:
        key = (worker_id, request_id)
        if self.policy.mode == "async":
            result = self._event([key], combine=False)
            self._dedup.finish(worker_id, request_id, result)
            return result
        late = self._sync.late(step, self.version, self.iterations)
        if late is not None:
            self._fan_checked("drop", lambda i: ([key],))
            self._dedup.finish(worker_id, request_id, late)
            return late
        try:
            self._sync.require_new(worker_id, step, self.version)
        except FailedPrecondition:
            self._drop_quietly(key)  # a second push of this worker in the round: the first one stays
            raise
        counts = _sum_counts(self._fan_checked("check", lambda i: ([key],)))
        if counts and self.policy.non_finite == "reject":
            self._fan_checked("drop", lambda i: ([key],))
            raise InvalidArgument(_non_finite_message(counts))
        if self._sync.join(worker_id, _Pending(request_id, step), step, self.version):
            version = self.version
            try:
                result = self._close_round(self._sync.quorum_reason())
            except BaseException:
                if self.version == version:  # not decided: this push leaves the round, the others stay
                    self._sync.leave(worker_id)
                raise
            self._dedup.finish(worker_id, request_id, result)
            return result
        result = self._sync.accepted(step, self.version, self.iterations)
        self._dedup.finish(worker_id, request_id, result)
        return result

    def _fan_checked(self, method: str, args_for: Callable[[int], tuple[Any, ...]]) -> dict[int, Any]:
        try:
            return self._fan(method, args_for)
        except _PartialFailure as exc:
            raise exc.as_service_error(self.key, "nothing was applied; retry with the same request id", self.version) from exc

    def _event(self, keys: list[tuple[str, str]], *, combine: bool, why: str = "") -> PushResult:
        """Prepare and commit one step event for ``keys`` on every shard (under the lock)."""
        version = self.version + 1
        aggregation = self.policy.aggregation
        try:
            prepared = self._fan("prepare", lambda i: (version, keys, combine, aggregation, self.learning_rate))
        except _PartialFailure as exc:
            self._abort_everywhere(version, exc.results)
            self._note_restarted(exc.errors)
            if self._broken:
                raise FailedPrecondition(self._broken + "; nothing was applied", current_version=self.version) from exc
            raise exc.as_service_error(self.key, "nothing was applied; retry with the same request id", self.version) from exc
        placement = self._placement()
        assert placement is not None
        order = {v.name: k for k, v in enumerate(placement.variables)}
        present = sorted({n for r in prepared.values() for n in r.present}, key=order.__getitem__)
        non_finite = _sum_counts({i: r.non_finite for i, r in prepared.items()})
        detail = why
        if non_finite:
            if not combine:
                self._abort_everywhere(version, prepared)
                skipped = non_finite_outcome(self.policy, non_finite, self.version, self.iterations)  # or refused
                self._fan_checked("drop", lambda i: (keys,))
                return skipped
            action, payload = "bump", None
            detail += "; " + _non_finite_message(non_finite, skipped=True)
        elif not present:
            if not combine:
                self._abort_everywhere(version, prepared)
                self._drop_quietly(keys[0])
                raise ValueError("No gradients provided for any variable.")
            action, payload = "bump", None
            detail += "; no worker sent any gradient, step skipped"
        else:
            modes = {r.clip_mode for r in prepared.values()}
            if len(modes) != 1:
                self._abort_everywhere(version, prepared)
                self._broken = f"shards of optimizer '{self.key}' disagree on the step kind ({sorted(modes)}): not in lockstep"
                raise FailedPrecondition(self._broken)
            clip_mode = modes.pop()
            payload = self._decide(clip_mode, placement, present, prepared)
            action = "apply"
            if len(present) < len(placement.variables):
                have = set(present)
                self._log_missing([v.name for v in placement.variables if v.name not in have], self.iterations)
        outcome = "round_closed" if combine else "applied"
        try:
            self._deliver(version, action, payload, "commit")
        except DecidedUnconfirmed as exc:
            exc.result = PushResult(outcome, self.version, self.iterations, detail=detail if combine else "")
            raise
        return PushResult(outcome, self.version, self.iterations, detail=detail if combine else "")

    def _decide(self, clip_mode: int, placement: Placement, present: list[str], prepared: dict[int, Any]) -> ClipDecision:
        if clip_mode not in (CLIP_NORM, CLIP_GLOBAL):
            return ClipDecision(clip_mode)
        by_name = placement.by_name()
        pieces: dict[str, list[pairwise.Piece]] = {}
        for name in present:
            v = by_name[name]
            for p in v.pieces:
                a, b = v.element_range(p)
                pieces.setdefault(name, []).append(pairwise.Piece(a, b, prepared[p.shard].unit_sums[name]))
        variables = [(n, by_name[n].size, by_name[n].dtype) for n in present]
        return decide_clipping(self.config, clip_mode, variables, pieces)

    def _deliver(self, version: int, action: str, payload: Any, method: str) -> None:
        """Commit a decided event on every shard; shards that miss it lag (see module doc)."""
        self.version = version
        try:
            replies = self._fan(method, lambda i: (version, action, payload))
        except _PartialFailure as exc:
            replies = exc.results
            for i in exc.errors:
                self._lagging[i] = _Lag(version, action, payload, self._incarnations.get(i, ""))
            if replies:
                self.iterations = next(iter(replies.values()))[1]
            self._cond.notify_all()
            failed = sorted(exc.errors)
            raise DecidedUnconfirmed(
                f"version {version} of optimizer '{self.key}' is decided but shard(s) {failed} did not confirm it "
                f"({exc.errors[failed[0]]}); it is delivered to them before anything else happens. Retry with "
                "the same request id to learn the outcome.",
                current_version=version,
            ) from exc.errors[failed[0]]
        self.iterations = replies[0][1] if 0 in replies else next(iter(replies.values()))[1]

    def _abort_everywhere(self, version: int, reached: dict[int, Any]) -> None:
        for i in reached:
            try:
                self._call(i, "abort", version)
            except Exception:  # noqa: BLE001 - it is re-prepared or restarted before the next event
                _log.warning("abort of event %d on shard %d of '%s' failed", version, i, self.key)

    # -------------------------------------------------------------- sync rounds

    def _on_round_timeout(self, why: str, close: bool) -> None:
        """The round timer fired (under the lock): apply what arrived, or abort the round."""
        if close:
            try:
                self._require_healthy()
                self._close_round(why)
            except Exception:  # the timer thread has nobody to report to
                _log.exception("closing round %d of '%s' failed", self.version, self.key)
        else:
            self._abort_round(f"round for version {self.version} of optimizer '{self.key}' was aborted: {why}")

    def _abort_round(self, message: str) -> None:
        keys = self._sync.keys()
        self._sync.abort(message, self._dedup)
        for i in range(len(self._links)):
            try:
                self._call(i, "drop", keys, message)
            except Exception:  # noqa: BLE001 - staged pushes expire on their own
                _log.warning("shard %d did not hear that round %d of '%s' was aborted", i, self.version, self.key)
        self._cond.notify_all()

    def _close_round(self, why: str) -> PushResult:
        keys = self._sync.keys()
        version = self.version
        waited = self._sync.waited()
        try:
            result = self._event(keys, combine=True, why=f"round for version {version} {why}")
        except DecidedUnconfirmed as exc:
            self._sync.closed(exc.result.detail if exc.result else why)
            raise
        self._sync.closed(result.detail)
        if self.on_round_closed is not None:
            try:  # metrics never fail a closed round
                self.on_round_closed(waited, len(keys), self.policy.num_workers)
            except Exception:  # noqa: BLE001
                _log.exception("round metrics of '%s' failed", self.key)
        return result

    # -------------------------------------------------------------- mutations

    def mutate(self, op: str, args_for: Callable[[int], dict[str, Any]]) -> tuple[int, int]:
        """An ordered change outside a step on every shard (``args_for(shard)``: its part)."""
        if op == "learning_rate":
            return self.set_learning_rate(float(args_for(0)["value"]))
        with self._cond:
            self._require_healthy()
            self._sync.require_empty(self.version)
            version = self.version + 1
            # Validate on every shard first would need a prepare phase; mutations are checked by
            # the client against the job's placement before they are sent.
            self._deliver_mutation(version, op, args_for)
            if op in ("load_store", "set_weights"):
                # The loaded optimizer variables hold the learning rate now: the steps must not
                # carry the one set before (every shard loaded it, or gets it redelivered first).
                self.learning_rate = None
            self._cond.notify_all()
            return self.version, self.iterations

    def set_learning_rate(self, value: float) -> tuple[int, int]:
        """Set the job's learning rate, as a single server does: at once, without a new version.

        Every shard sets it now (so stores and status show it), and every later step event
        carries it to each shard before the step is prepared, so a shard that missed this call
        still steps with it. A refusal everywhere (a schedule's rate is not settable) changes
        nothing.
        """
        with self._cond:
            self._require_healthy()
            try:
                self._fan("set_learning_rate", lambda i: (value,))
            except _PartialFailure as exc:
                if not exc.results and all(not isinstance(e, ShardUnavailable) for e in exc.errors.values()):
                    raise next(iter(exc.errors.values())) from None
                _log.warning("shard(s) %s of '%s' missed a learning-rate change; the next step carries it",
                             sorted(exc.errors), self.key)  # fmt: skip
            self.learning_rate = value
            return self.version, self.iterations

    def _deliver_mutation(self, version: int, op: str, args_for: Callable[[int], dict[str, Any]]) -> None:
        self.version = version
        try:
            replies = self._fan("mutate", lambda i: (version, op, args_for(i)))
        except _PartialFailure as exc:
            if not exc.results and all(not isinstance(e, ShardUnavailable) for e in exc.errors.values()):
                self.version = version - 1  # refused everywhere (a bad value): nothing changed
                raise next(iter(exc.errors.values())) from None
            for i in exc.errors:
                self._lagging[i] = _Lag(version, op, args_for(i), "")
            raise exc.as_service_error(self.key, f"version {version} is decided; it is delivered before anything else", version) from exc
        self.iterations = next(iter(replies.values()))[1]

    # -------------------------------------------------------------- checkpoints and status

    def quiesce(self) -> tuple[int, list[tuple[str, str]]]:
        """(version, the open round's push keys): the cut a checkpoint takes, under ``locked``."""
        self._require_healthy()
        return self.version, self._sync.keys()

    @property
    def lock(self) -> threading.Condition:
        return self._cond

    @property
    def links(self) -> list[ShardLink]:
        return self._links

    @property
    def built(self) -> bool:
        return self._placement() is not None

    def leader_state(self) -> dict[str, Any]:
        with self._cond:
            return {
                "version": self.version,
                "iterations": self.iterations,
                "dedup": self._dedup.finished(),
                "round": {w: [p.request_id, p.step] for w, p in self._sync.in_order()},
                "last_closed": self._sync.last_closed,
                "last_abort": self._sync.last_abort,
                "workers": {w: dict(v) for w, v in self._workers.items()},
                "learning_rate": self.learning_rate,
            }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Adopt a checkpoint's leader state (every shard restored the same cut)."""
        with self._cond:
            high = max(self.version, self._rewound[0] if self._rewound else -1)
            self.version = int(state["version"])
            self._rewound = (high, self.version) if high > self.version else None
            self.iterations = int(state["iterations"])
            self._dedup = _DedupTable.from_finished(self._dedup_capacity, state.get("dedup", {}))
            self._sync.adopt(
                {w: _Pending(r, int(st)) for w, (r, st) in state.get("round", {}).items()},
                state.get("last_closed", ""), state.get("last_abort", ""),
            )  # fmt: skip
            self._workers = {w: {"last_step": int(v["last_step"]), "pushes": int(v["pushes"])}
                             for w, v in state.get("workers", {}).items()}  # fmt: skip
            lr = state.get("learning_rate")
            self.learning_rate = None if lr is None else float(lr)
            self._lagging.clear()
            self._broken = ""
            self._verify = False
            self._cond.notify_all()

    def worker_counts(self) -> dict[str, dict[str, int]]:
        """Per worker: its pushes and the step of its last one (status)."""
        with self._cond:
            return {w: dict(v) for w, v in self._workers.items()}

    def holds(self, key: tuple[str, str]) -> bool:
        """Whether push ``key`` is in the open sync round (its staged slices must stay)."""
        with self._cond:
            pending = self._sync.entries.get(key[0])
            return pending is not None and pending.request_id == key[1]

    @property
    def lagging_count(self) -> int:
        """Shards that have not confirmed the last decided version (read without the lock)."""
        return len(self._lagging)

    def status(self) -> dict[str, Any]:
        with self._cond:
            return {
                "version": self.version,
                "iterations": self.iterations,
                "lagging": sorted(self._lagging),
                "broken": self._broken,
                "round_arrivals": self._sync.arrivals(),
            }

    def wait_for_version(self, min_version: int, timeout: float | None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.version < min_version:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise WaitTimeout(f"optimizer '{self.key}' did not reach version {min_version} in time", current_version=self.version)
                self._cond.wait(remaining)
            return self.version

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._sync.reset()
            self._cond.notify_all()
        self._pool.shutdown(wait=False)
        self._drop_quietly.close()
