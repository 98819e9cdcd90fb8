"""The staging-buffer lease of one ``OptimizerHost``: which push may receive its gradients
straight into the engine's staging buffer, and how the others wait for it to finish.

Only one push may fill the buffer, and no other apply may run while it is being filled (an
apply writes its own gradients there). The holder must keep its bytes coming while others
wait, or it is cancelled: one slow or stalled sender must not hold every other push up.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from adamax_server.coordination.policy import ReceiveProgress, StagingLookup
from adamax_server.errors import WaitTimeout

_log = logging.getLogger(__name__)


class StagingMixin:
    """The staging-lease half of ``OptimizerHost`` (``adamax_server.coordination.host``)."""

    def _wait_for_lease(self, deadline: float | None) -> None:
        """Wait (under the lock) until no push is receiving into the staging buffer.

        The holder must keep moving: from the moment a push waits for it, it may fall at most
        ``patience`` seconds behind a pace of ``min_rate`` bytes/s (its ``ReceiveProgress``),
        or it is cancelled (its push fails, nothing applied; the worker retries with the same
        request id). So a stalled or dribbling sender holds the others up for about
        ``patience`` seconds, and a sender that keeps the pace is waited for.
        """
        since, mark, watched = time.monotonic(), 0, None
        while self._staging_leased:
            holder = self._lease_progress
            now = time.monotonic()
            if holder is not None and holder is not watched:  # (a new holder: measure it afresh)
                since, mark, watched = now, holder.received, holder
            elif holder is not None and not holder.cancelled:
                behind = (now - since) - (holder.received - mark) / holder.min_rate
                if behind > holder.patience:
                    holder.cancelled = True
                    _log.warning(
                        "optimizer '%s': a push receiving into the staging buffer got %d bytes in %.3g s while "
                        "other pushes waited; cancelling it", self.key, holder.received - mark, now - since,
                    )
                    if holder.cancel is not None:
                        holder.cancel()
            remaining = None if deadline is None else deadline - now
            if remaining is not None and remaining <= 0:
                raise WaitTimeout(
                    f"push to optimizer '{self.key}' waited too long for an earlier push to arrive; "
                    "nothing was applied (retry with the same request id)",
                    current_version=self._version,
                )
            tick = holder.patience / 4 if holder is not None else 1.0
            self._cond.wait(tick if remaining is None else min(tick, remaining))

    def _take_staging_lease(self, progress: ReceiveProgress | None = None) -> bool:
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
        self._lease_progress = progress
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

