"""Sync rounds of one ``OptimizerHost``: its contributions, closing (the combination, mean or sum, of
the contributions and the apply) and aborting. Who may join a round, K of N, the round timer and
late pushes are decided by ``sequencing.SyncRound``, as for a sharded job's leader."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from adamax_server.coordination.stats import GradientStats, non_finite_counts, non_finite_message, push_stats
from adamax_server.coordination.policy import Gradient
from adamax_server.coordination.sequencing import SyncRound
from adamax_server.optim.engine import RowSparseGradient
from adamax_server.optim.kernels.stats import sum_with_stats

_log = logging.getLogger(__name__)


@dataclass
class Contribution:
    request_id: str
    grads: dict[str, Gradient]
    # Pooled receive buffers the gradients live in: back to the host's pool when the round ends.
    buffers: list[Any] = field(default_factory=list)


class RoundsMixin:
    """The sync-round half of ``OptimizerHost`` (``adamax_server.coordination.host``)."""

    # -------------------------------------------------------------- sync rounds

    def _new_sync_round(self) -> SyncRound[Contribution]:
        return SyncRound(self.key, lambda: self.policy, self._cond, self._on_round_timeout, lambda: self._closed)

    def _on_round_timeout(self, why: str, close: bool) -> None:
        """The round timer fired (under the lock): apply what arrived, or abort the round."""
        if close:
            try:
                self._close_round(why)
            except Exception:  # the timer thread has nobody to report to
                _log.exception("closing round %d of '%s' failed", self._version, self.key)
        else:
            self._abort_round(f"round for version {self._version} of optimizer '{self.key}' was aborted: {why}")

    def _reset_round(self) -> None:
        for contribution in self._sync.reset().values():
            self._give_back(contribution.buffers)

    def _abort_round(self, message: str) -> None:
        for contribution in self._sync.abort(message, self._dedup).values():
            self._give_back(contribution.buffers)
        self._cond.notify_all()

    def _close_round(self, why: str) -> str:
        contributions = [c for _, c in self._sync.in_order()]
        combined, known = self._combine(contributions)
        version = self._version
        detail = f"round for version {version} {why}"
        present = {n: g for n, g in combined.items() if g is not None}
        try:
            stats = push_stats(present, known)  # dense sums: from the summing pass
            bad = non_finite_counts(stats)
            if bad:  # only reachable with non_finite="skip" (or overflow in the sum)
                detail += "; " + non_finite_message(bad, skipped=True)
            elif not present:
                detail += "; no worker sent any gradient, step skipped"
            else:
                self._apply(present, stats)
        except BaseException:
            self._abort_round(f"round for version {version} was aborted: applying the combined gradient failed")
            raise
        waited = self._sync.waited()
        for contribution in self._sync.closed(detail).values():
            self._give_back(contribution.buffers)
        self._set_version(version + 1)
        self._observe("on_round_closed", waited, len(contributions), self.policy.num_workers)
        return detail

    def _apply(self, grads: dict[str, Gradient], stats: Mapping[str, GradientStats]) -> None:
        """One engine apply (under the lock), timed for the metrics; ``stats`` from the check."""
        start = time.perf_counter()
        self._engine.apply(grads, on_missing=self._log_missing_gradients)
        self._observe("on_apply", time.perf_counter() - start, stats, self._engine.iterations, self.initial_config)

    def _log_missing_gradients(self, names: list[str]) -> None:
        """A step without a gradient for some variables: say so once per set, in server terms."""
        key = tuple(sorted(names))
        level = logging.DEBUG if key in self._missing_reported else logging.WARNING
        self._missing_reported.add(key)
        _log.log(
            level,
            "optimizer '%s': step %d had no gradient for variable(s) %s; they keep their values and Adamax "
            "moments this step (like Keras). Workers push a gradient for every variable they want trained.%s",
            self.key, self._engine.iterations, list(names),
            "" if level == logging.DEBUG else " (logged once for this set of variables; DEBUG shows each step)",
            extra={"optimizer": self.key},
        )

    def _observe(self, hook: str, *args: Any) -> None:
        if self._observer is None:
            return
        try:  # metrics must never fail a push that was already applied
            getattr(self._observer, hook)(self.key, *args)
        except Exception:
            _log.exception("metrics hook %s failed", hook)

    def _combine(self, contributions: list[Contribution]) -> tuple[dict[str, Gradient], dict[str, GradientStats]]:
        """Sum or mean per variable, in worker-id order (so results do not depend on arrival).

        Dense gradients are summed in one pass that also yields their statistics (returned
        with the combination), straight into the engine's staging buffer when it is host
        memory (sync rounds never lend it to a receive): no new allocation, and apply copies
        nothing.
        """
        count = len(contributions)
        out: dict[str, Gradient] = {}
        stats: dict[str, GradientStats] = {}
        divisor = count if self.policy.aggregation == "mean" else None
        for name, shape, dtype in self._engine.variable_specs:
            parts = [c.grads[name] for c in contributions if c.grads.get(name) is not None]
            if not parts:
                out[name] = None
                continue
            if all(isinstance(p, RowSparseGradient) for p in parts):
                indices = np.concatenate([np.asarray(p.indices, dtype=np.int64) for p in parts])
                values = np.concatenate([np.asarray(p.values).astype(dtype) for p in parts])
                if divisor is not None:
                    values = np.divide(values, np.asarray(count, dtype=dtype))
                out[name] = RowSparseGradient(indices, values)
                continue
            total = self._engine.gradient_buffer(name) if self._engine.host_staging else None
            if total is None or total.dtype != np.dtype(dtype):
                total = np.zeros(shape, dtype=dtype)
            if any(isinstance(p, RowSparseGradient) for p in parts):
                total[...] = 0
                for p in parts:
                    if isinstance(p, RowSparseGradient):
                        np.add.at(total, np.asarray(p.indices), np.asarray(p.values).astype(dtype))
                    else:
                        np.add(total, np.asarray(p).astype(dtype, copy=False), out=total)
                if divisor is not None:
                    np.divide(total, np.asarray(count, dtype=dtype), out=total)
            else:
                stats[name] = sum_with_stats(total, [np.asarray(p) for p in parts], divisor)
            out[name] = total
        return out, stats
