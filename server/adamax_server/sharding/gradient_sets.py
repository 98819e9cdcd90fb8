"""A shard's staged pushes received in place, and prepared without a copy.

A push staged over the bulk channel is received into a pooled *gradient set* of the shard's
engine: host arrays laid out like its staging buffers (``new_gradient_set``). At ``prepare``
the push's set becomes the engine's staging buffers (``exchange_gradient_buffers``), so the
step reads the gradients where they landed, as a single server applies a push
(``coordination.receive_buffers``); before, every staged slice was copied into the engine.

A set belongs to its staged push until the push is committed, dropped, replaced or expires. A
prepared push may be aborted and prepared again, so the engine's buffers may be the set of a
push that is still staged (its *owner*). The engine's buffers are written only when no live push
owns them: before a step is copied in (a sync round's sum, a push staged over gRPC), an owned
set is exchanged for a free one. A set that replaced the engine's buffers goes back to the pool
only when no push owns it.

Not for GPU engines (no host staging buffers): their pushes are received as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

Layout = tuple[tuple[str, int, str], ...]
Taken = list[tuple[Layout, dict[str, np.ndarray]]]  # at most one set per push
PushKey = tuple[str, str]


class GradientSets:
    """The pool and the engine-buffer owner of one ``ShardHost`` (see the module docstring).

    ``lookup`` runs in a receiving thread; everything else under the shard's lock.
    """

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep  # free sets kept per layout
        self._lock = threading.Lock()
        self._free: dict[Layout, list[dict[str, np.ndarray]]] = {}
        self.owner: PushKey | None = None  # the staged push whose set the engine's buffers are

    def reset(self) -> None:
        """A new engine (build, restore): no set of the old one is handed out again."""
        with self._lock:
            self._free.clear()
        self.owner = None

    def lookup(self, engine: Any, taken: Taken) -> Callable[[str, np.dtype], np.ndarray | None] | None:
        """``lookup(name, dtype)`` into one set for a push being received (recorded in ``taken``),
        or None when the engine has no host staging buffers."""
        if not engine.built or not engine.host_staging:
            return None
        layout = engine.gradient_set_layout()
        dtypes = {n: np.dtype(d) for n, _, d in engine.variable_specs}

        def lookup(name: str, dtype: np.dtype) -> np.ndarray | None:
            if dtypes.get(name) != np.dtype(dtype):
                return None  # received elsewhere (a narrower wire dtype, widened on staging)
            if not taken:
                with self._lock:
                    free = self._free.get(layout)
                    gradient_set = free.pop() if free else None
                taken.append((layout, gradient_set if gradient_set is not None else engine.new_gradient_set()))
            return engine.gradient_set_view(taken[0][1], name)

        return lookup

    def _pool(self, layout: Layout, gradient_set: dict[str, np.ndarray]) -> None:
        with self._lock:
            free = self._free.setdefault(layout, [])
            if len(free) < self.keep and not any(s is gradient_set for s in free):
                free.append(gradient_set)

    def release(self, key: PushKey, taken: Taken) -> None:
        """Push ``key`` is done (committed, dropped, replaced, expired): its set is free again,
        unless it is the engine's buffers now (then those are simply no longer owned)."""
        if self.owner == key:
            self.owner = None
            return
        for layout, gradient_set in taken:
            self._pool(layout, gradient_set)

    def swap_in(self, engine: Any, key: PushKey, taken: Taken) -> bool:
        """Make push ``key``'s set the engine's staging buffers; False when it has none that fits
        (then its gradients are copied in, after ``unshare``)."""
        if not taken or not engine.host_staging or taken[0][0] != engine.gradient_set_layout():
            return False
        layout, gradient_set = taken[0]
        previous = engine.exchange_gradient_buffers(gradient_set)
        first = next(iter(previous.values()), None)
        if self.owner is None and first is not None and first is not next(iter(gradient_set.values()), None):
            self._pool(layout, previous)  # nobody's: free
        self.owner = key
        return True

    def unshare(self, engine: Any) -> None:
        """Before gradients are copied into the engine's buffers: give it a free set if its
        buffers are a staged push's."""
        if self.owner is None or not engine.host_staging:
            return
        layout = engine.gradient_set_layout()
        with self._lock:
            free = self._free.get(layout)
            fresh = free.pop() if free else None
        engine.exchange_gradient_buffers(fresh if fresh is not None else engine.new_gradient_set())
        self.owner = None  # the replaced buffers stay with their push
