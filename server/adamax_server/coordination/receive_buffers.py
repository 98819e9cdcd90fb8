"""Receive buffers of ``OptimizerHost`` pushes: the engine's staging buffers (lent to one async push
at a time) and a pool of gradient sets for the others.

A push that cannot receive into the staging buffers (an async push overlapping the lease
holder, a sync contribution kept until its round closes) takes a pooled gradient set: host
arrays laid out like the engine's staging buffers (``Adamax.new_gradient_set``). No fresh memory
(page faults) per push, no hidden full-size temporary, and an async push's set is swapped in as
the staging buffers when it is applied (``exchange_gradient_buffers``), so its gradients are
applied where they landed, without a copy; the set it replaces goes back to the pool.
"""

from __future__ import annotations

import numpy as np

from adamax_server.coordination.policy import StagingLookup

# (layout, gradient set): the layout names the engine's groups (name, size, dtype), so a set
# made for an engine that was since rebuilt differently is never handed out again.
Layout = tuple[tuple[str, int, str], ...]
Taken = list[tuple[Layout, dict[str, np.ndarray]]]


class ReceiveBuffersMixin:
    """The receive-buffer half of ``OptimizerHost`` (``adamax_server.coordination.host``)."""

    def _gradient_layout(self) -> Layout:
        return self._engine.gradient_set_layout()

    def _pooled_lookup(self, taken: Taken) -> StagingLookup:
        """``lookup(name, dtype)`` into one pooled gradient set of this push (taken on first use and
        recorded in ``taken``; back to the pool once the push is done, a sync contribution's
        once its round ends)."""
        engine = self._engine
        with self._cond:
            layout = self._gradient_layout()
            dtypes = {n: np.dtype(d) for n, _, d in engine.variable_specs}

        def lookup(name: str, dtype: np.dtype) -> np.ndarray | None:
            if dtypes.get(name) != np.dtype(dtype):
                return None
            if not taken:
                with self._cond:
                    free = self._free_sets.get(layout)
                    gradient_set = free.pop() if free else None
                if gradient_set is None:
                    gradient_set = engine.new_gradient_set()
                taken.append((layout, gradient_set))
            return engine.gradient_set_view(taken[0][1], name)

        return lookup

    def _swap_in(self, taken: Taken) -> None:
        """Before an async apply (under the lock): the push's gradient set becomes the engine's
        staging buffers; the replaced buffers take its place in ``taken`` (back to the pool)."""
        if taken and self._engine.host_staging and taken[0][0] == self._gradient_layout():
            layout, gradient_set = taken[0]
            taken[0] = (layout, self._engine.exchange_gradient_buffers(gradient_set))

    def _give_back(self, taken: Taken) -> None:
        """Return pooled gradient sets (under the lock); the pool keeps what one full round (or the
        pushes overlapping an apply) needs, and forgets the rest."""
        keep = max(self.policy.num_workers, 2) + 1
        for layout, gradient_set in taken:
            free = self._free_sets.setdefault(layout, [])
            if len(free) < keep:
                free.append(gradient_set)
        taken.clear()
