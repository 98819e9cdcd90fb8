"""Snapshot and restore of one ``OptimizerHost`` (the fenced restore used by checkpoints)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import numpy as np
from adamax_server.coordination.dedup import DedupTable
from adamax_server.coordination.policy import Policy, WorkerRecord, normalize_config
from adamax_server.coordination.rounds import Contribution
from adamax_server.coordination.snapshot import OptimizerSnapshot, RoundContribution
from adamax_server.errors import (
    Unavailable,
)
from adamax_server.optim.engine import Adamax, RowSparseGradient

_log = logging.getLogger(__name__)


class SnapshotMixin:
    """The checkpoint half of ``OptimizerHost`` (``adamax_server.coordination.host``)."""

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
                config=normalize_config(engine.get_config()),
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
                    for worker, c in self._sync.in_order()
                ],
                last_closed=self._sync.last_closed,
                last_abort=self._sync.last_abort,
            )

    def restore(self, snap: OptimizerSnapshot, engine: Adamax, *, fence: bool = True) -> tuple[int, int]:
        """Replace all state with ``snap`` (``engine`` already holds its variables).

        Fenced: pushes whose payload is still streaming are rejected (StateRestored) and
        nothing is half-applied, since every apply happens under this lock. With ``fence``
        the version moves past both the current and the saved one, so every worker sees a
        new version on its next call, and the checkpoint's open sync round (if any) is dropped:
        its gradients belong to a version that no longer exists. Without ``fence`` (a fresh host:
        crash-resume) the saved version and its open round are kept.
        """
        with self._cond:
            if self._closed:
                raise Unavailable(f"optimizer '{self.key}' was deleted or the server is shutting down")
            self._reset_round()
            self._engine = engine
            self.policy = Policy(**snap.policy)
            self.initial_config = snap.initial_config
            self._dedup = DedupTable.from_finished(self._dedup_capacity, snap.dedup)
            now = time.monotonic()
            self._workers = {w: WorkerRecord(int(v["last_step"]), int(v["pushes"]), now) for w, v in snap.workers.items()}
            dropped = [c.worker_id for c in snap.round] if fence else []
            for c in snap.round if fence else ():
                # A live restore moves the version past the saved one: the saved round's gradients
                # were computed on weights no worker holds now, and keeping the round would refuse
                # each of its workers' next push ("already pushed a gradient for version ...").
                # It is dropped, and so are its request ids (a retry must not be answered "accepted").
                self._dedup.discard(c.worker_id, c.request_id)
            kept = {
                c.worker_id: Contribution(c.request_id, {
                    n: RowSparseGradient(np.asarray(g[0]), np.asarray(g[1])) if isinstance(g, tuple) else g
                    for n, g in c.grads.items()
                })
                for c in (() if fence else snap.round)
            }  # fmt: skip
            self._sync.adopt(kept, snap.last_closed, snap.last_abort)
            self._restore_epoch += 1
            self._pull_cache.clear()
            self._copy_pool.clear()
            self._set_version(max(self._version, snap.version) + 1 if fence else snap.version)
            if dropped:
                _log.warning(
                    "optimizer '%s': restored to version %d; the checkpoint's open sync round for version %d "
                    "(pushed by %s) was dropped, since workers now pull and push for version %d",
                    self.key, self._version, snap.version, ", ".join(dropped), self._version,
                )
            return self._version, engine.iterations
