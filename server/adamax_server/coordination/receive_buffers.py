"""Receive buffers of ``OptimizerHost`` pushes: the engine's staging buffer (lent to one async push
at a time) and a pool of reused buffers for the others.

A push that cannot receive into the staging buffer (a sync contribution kept until its round
closes, an async push overlapping the lease holder) takes pooled buffers of its variables' size
and dtype: no fresh memory (page faults) per push, and no hidden full-size temporary.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from adamax_server.coordination.policy import StagingLookup

PoolKey = tuple[str, str, int]  # variable name, dtype, elements


class ReceiveBuffersMixin:
    """The receive-buffer half of ``OptimizerHost`` (``adamax_server.coordination.host``)."""

    def _pooled_lookup(
        self, specs: Sequence[tuple[str, tuple[int, ...], np.dtype]], taken: list[tuple[PoolKey, np.ndarray]]
    ) -> StagingLookup:
        """``lookup(name, dtype)`` over the host's pool of receive buffers (flat, the variable's
        size and dtype); what it hands out is recorded in ``taken`` and goes back to the pool
        once the push is done (a sync contribution: once its round ends)."""
        sizes = {n: (math.prod(s), np.dtype(d)) for n, s, d in specs}

        def lookup(name: str, dtype: np.dtype) -> np.ndarray | None:
            spec = sizes.get(name)
            if spec is None or spec[1] != np.dtype(dtype):
                return None
            key = (name, spec[1].str, spec[0])
            with self._cond:
                free = self._free_buffers.get(key)
                buf = free.pop() if free else None
            if buf is None:
                buf = np.empty(spec[0], dtype=spec[1])
            taken.append((key, buf))
            return buf

        return lookup

    def _give_back(self, taken: list[tuple[PoolKey, np.ndarray]]) -> None:
        """Return pooled receive buffers (under the lock); the pool keeps what one full round
        (or the pushes overlapping an apply) needs, and forgets the rest."""
        keep = max(self.policy.num_workers, 2) + 1
        for key, buf in taken:
            free = self._free_buffers.setdefault(key, [])
            if len(free) < keep:
                free.append(buf)
        taken.clear()

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

