"""The decisions a job makes about each push, whoever executes them.

Every job's leader (``sharding.leader.Leader``) decides here, a plain server's optimizers too
(each is a one-shard job, ``sharding.single``): what a push *means* is decided in one place,
so a one-shard job and a job of N shards cannot drift apart:

* ``check_step``: a step ahead of the job, negative, too stale (async ``max_staleness``), or
  computed on weights a restore took back;
* ``non_finite_outcome``: an async push with NaN/Inf is refused or skipped (``non_finite``);
* ``SyncRound``: one open sync round: one push per worker, K of N closes it, the round timer
  (``round_timeout`` with its ``close`` or ``abort`` policy), late pushes for a closed round,
  the abort that forgets its pushes' request ids, and the messages workers read.

Everything here runs under the owner's lock (the round timer takes it before calling back).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar

import numpy as np

from adamax_server.coordination.dedup import DedupTable
from adamax_server.coordination.policy import Policy, PushResult
from adamax_server.coordination.stats import non_finite_message
from adamax_server.errors import FailedPrecondition, InvalidArgument, StaleGradient, StateRestored

_log = logging.getLogger(__name__)


def check_step(
    key: str, policy: Policy, version: int, step: int, rewound: tuple[int, int] | None = None, *, where: str = ""
) -> None:
    """Refuse a push whose ``step`` the job at ``version`` cannot take.

    ``rewound`` is (highest version reached, version restored to) after a restore took the job
    back: a step in between was computed on weights that no longer exist, which is not the
    caller's bug (ABORTED: pull and push again), unlike a step the job never reached. ``where``
    says where the restore happened (" on every shard").
    """
    if step > version and rewound is not None and step <= rewound[0]:
        raise StateRestored(
            f"optimizer '{key}' was restored{where} to version {rewound[1]}; gradient step {step} was computed on "
            "weights the restore took back: pull and push again",
            current_version=version,
        )
    if step > version:
        raise FailedPrecondition(
            f"gradient step {step} is ahead of the current version {version} of optimizer "
            f"'{key}'; push gradients computed on pulled weights",
            current_version=version,
        )
    if step < 0:
        raise InvalidArgument(f"`step` must be >= 0. Received: step={step}")
    limit = policy.max_staleness
    if policy.mode == "async" and limit is not None and version - step > limit:
        raise StaleGradient(
            f"gradient computed on version {step} is {version - step} versions old; "
            f"max_staleness is {limit}. Pull the current weights (version {version}) and recompute.",
            current_version=version,
        )


def non_finite_outcome(policy: Policy, counts: dict[str, int], version: int, iterations: int) -> PushResult:
    """An async push with non-finite values: InvalidArgument (``reject``) or a skipped step."""
    if policy.non_finite == "reject":
        raise InvalidArgument(non_finite_message(counts))
    return PushResult("skipped_non_finite", version, iterations, detail=non_finite_message(counts, skipped=True))


class Pending(Protocol):
    """What a round keeps per worker: at least the push's request id."""

    request_id: str


E = TypeVar("E", bound=Pending)


class SyncRound(Generic[E]):
    """The open sync round of one job (``mode="sync"``): worker id -> its push (``E``).

    The owner closes the round (``closed``) or aborts it (``abort``); when the round timer
    fires it calls ``on_timeout(why, close)`` under ``lock``: ``close`` says whether the
    policy is to apply what arrived (``round_timeout_policy="close"``) or to abort.
    """

    def __init__(
        self,
        key: str,
        policy: Callable[[], Policy],
        lock: threading.Condition,
        on_timeout: Callable[[str, bool], None],
        is_closed: Callable[[], bool],
    ) -> None:
        self.key = key
        self._policy = policy
        self._lock = lock
        self._on_timeout = on_timeout
        self._is_closed = is_closed
        self.entries: dict[str, E] = {}
        self.epoch = 0  # bumped on every reset: a timer of an earlier round does nothing
        self.started = 0.0  # monotonic time of the round's first push
        self.aborts = 0  # waits for a version give up when this moves
        self.last_closed = ""
        self.last_abort = ""
        self._timer: threading.Timer | None = None

    # -------------------------------------------------------------- reading

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, worker_id: object) -> bool:
        return worker_id in self.entries

    def arrivals(self) -> list[str]:
        """Workers that pushed for the open round, sorted."""
        return sorted(self.entries)

    def in_order(self) -> list[tuple[str, E]]:
        """(worker id, push) in worker-id order: the order contributions are summed in."""
        return [(w, self.entries[w]) for w in sorted(self.entries)]

    def keys(self) -> list[tuple[str, str]]:
        """(worker id, request id) of every push in the round, in worker-id order."""
        return [(w, e.request_id) for w, e in self.in_order()]

    def waited(self) -> float:
        """Seconds since the round's first push."""
        return time.monotonic() - self.started

    # -------------------------------------------------------------- deciding

    def late(self, step: int, version: int, iterations: int) -> PushResult | None:
        """``dropped_late`` for a push whose round already closed, else None."""
        if step >= version:
            return None
        return PushResult(
            "dropped_late",
            version,
            iterations,
            detail=(
                f"the round for version {step} already closed ({self.last_closed or 'earlier'}); "
                f"this gradient was not applied. Current version is {version}."
            ),
        )

    def require_new(self, worker_id: str, step: int, version: int) -> None:
        """One push per worker per round."""
        if worker_id in self.entries:
            raise FailedPrecondition(
                f"worker '{worker_id}' already pushed a gradient for version {step} "
                f"(request {self.entries[worker_id].request_id!r}); one push per worker per round",
                current_version=version,
            )

    def join(self, worker_id: str, entry: E, step: int, version: int) -> bool:
        """Add a worker's push; True when the round now has its quorum (the owner closes it).

        A second push of the same worker for this round is refused. The first push of a round
        starts its timer, unless it already completes the quorum.
        """
        self.require_new(worker_id, step, version)
        self.entries[worker_id] = entry
        if len(self.entries) == 1:
            self.started = time.monotonic()
        policy = self._policy()
        if len(self.entries) >= policy.quorum:
            return True
        if len(self.entries) == 1 and policy.round_timeout is not None:
            self.start_timer()
        return False

    def leave(self, worker_id: str) -> None:
        """Take back a push that the round never used (its close failed before deciding)."""
        self.entries.pop(worker_id, None)
        if not self.entries:
            self.reset()

    def quorum_reason(self) -> str:
        return f"closed by {len(self.entries)} of {self._policy().num_workers} workers"

    def accepted(self, step: int, version: int, iterations: int) -> PushResult:
        return PushResult(
            "accepted", version, iterations,
            detail=f"{len(self.entries)} of {self._policy().quorum} workers have pushed for version {step}",
        )  # fmt: skip

    def require_empty(self, version: int) -> None:
        """Variables change between rounds only (a round's pushes were computed on them)."""
        if self.entries:
            raise FailedPrecondition(
                f"a sync round for version {version} is open ({self.arrivals()} pushed); change variables between rounds"
            )

    # -------------------------------------------------------------- ending

    def reset(self) -> dict[str, E]:
        """Forget the round (and stop its timer); returns its pushes."""
        entries, self.entries = self.entries, {}
        self.epoch += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return entries

    def closed(self, detail: str) -> dict[str, E]:
        """The round was applied (or skipped) as ``detail`` says; returns its pushes."""
        entries = self.reset()
        self.last_closed = detail
        return entries

    def abort(self, message: str, dedup: DedupTable) -> dict[str, E]:
        """Drop the round: its request ids are forgotten, so a retry enters the next round
        instead of being answered "accepted"; waits for the next version give up."""
        for worker_id, entry in self.entries.items():
            dedup.discard(worker_id, entry.request_id)
        entries = self.reset()
        self.aborts += 1
        self.last_abort = message
        _log.warning("%s", message)
        return entries

    def adopt(self, entries: dict[str, E], last_closed: str, last_abort: str) -> None:
        """A restored round (crash-resume, or a sharded job's restore): its timer starts again."""
        self.reset()
        self.entries = dict(entries)
        self.last_closed, self.last_abort = last_closed, last_abort
        if self.entries:
            self.started = time.monotonic()
            if self._policy().round_timeout is not None:
                self.start_timer()

    # -------------------------------------------------------------- timer

    def start_timer(self) -> None:
        timeout = self._policy().round_timeout
        assert timeout is not None
        timer = threading.Timer(timeout, self._fire, args=(self.epoch,))
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _fire(self, epoch: int) -> None:
        with self._lock:
            if epoch != self.epoch or not self.entries or self._is_closed():
                return
            policy = self._policy()
            arrived = self.arrivals()
            why = (
                f"timed out after {policy.round_timeout}s with {len(arrived)} of {policy.quorum} workers "
                f"({', '.join(arrived)})"
            )
            self._on_timeout(why, policy.round_timeout_policy == "close")


# ---------------------------------------------------------------- messages


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
