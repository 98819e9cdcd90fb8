"""A shard's staged pushes received in place, and prepared without a copy.

A push is received into a *gradient set* of the shard's engine: host arrays laid out like its
staging buffers (``new_gradient_set``). At ``prepare`` the push's set becomes the engine's
staging buffers (``exchange_gradient_buffers``), so the step reads the gradients where they
landed; before, every staged slice was copied into the engine.

A set is *lent* to its push from the moment the push starts receiving into it until the push is
committed, dropped, replaced or expires, or fails before it was staged. A prepared push may be
aborted and prepared again, so the engine's buffers may be the set of a push that is still
staged. Rules, all under the shard's lock:

* a push is lent the engine's own buffers when no push holds them and no step is prepared (a
  lone worker's pushes land in the same memory every time, as a single server's used to);
  otherwise a pooled set, or a new one;
* before gradients are copied into the engine's buffers (a sync round's sum, a push staged over
  gRPC), lent buffers are exchanged for a free set;
* a set replaced by a swap goes back to the pool only when no push holds it, and a released
  set only when it is not the engine's buffers.

Not for GPU engines (no host staging buffers): their pushes are received as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Layout = tuple[tuple[str, int, str], ...]
Taken = list[tuple[Layout, dict[str, np.ndarray]]]  # at most one set per push


def _id(gradient_set: dict[str, np.ndarray]) -> int:
    """A set's identity: its first array's (0 for the empty set of an engine without variables)."""
    return id(next(iter(gradient_set.values()))) if gradient_set else 0


class GradientSets:
    """The pool and the lent sets of one ``ShardHost`` (see the module docstring). Every method
    runs under the shard's lock except the lookup closure, which takes only pooled sets."""

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep  # free sets kept per layout
        self._free: dict[Layout, list[dict[str, np.ndarray]]] = {}
        self._lent: set[int] = set()

    def reset(self) -> None:
        """A new engine (build, restore): no set of the old one is handed out again."""
        self._free.clear()
        self._lent.clear()

    def lookup(self, engine: Any, taken: Taken, *, idle: bool,
               dtypes: dict[str, np.dtype] | None = None) -> Callable[[str, np.dtype], np.ndarray | None] | None:  # fmt: skip
        """``lookup(name, dtype)``: receive buffers in one set for a push (recorded in ``taken``),
        or None when the engine has no host staging buffers. ``idle``: no step is prepared, so
        the engine's own buffers may be lent, now (a later copy must see them lent)."""
        if not engine.built or not engine.host_staging:
            return None
        layout = engine.gradient_set_layout()
        if not layout:  # a shard that holds no piece of the job
            return None
        if dtypes is None:
            dtypes = {n: np.dtype(d) for n, _, d in engine.variable_specs}
        current = engine.current_gradient_set()
        if idle and _id(current) not in self._lent:
            self._lent.add(_id(current))
            taken.append((layout, current))
        free = self._free.setdefault(layout, [])

        def lookup(name: str, dtype: np.dtype) -> np.ndarray | None:
            if dtypes.get(name) != np.dtype(dtype):
                return None  # received elsewhere (a narrower wire dtype, widened on staging)
            if not taken:
                try:
                    gradient_set = free.pop()  # list.pop is atomic: no lock needed here
                except IndexError:
                    gradient_set = engine.new_gradient_set()
                self._lent.add(_id(gradient_set))
                taken.append((layout, gradient_set))
            return engine.gradient_set_view(taken[0][1], name)

        return lookup

    def _pool(self, layout: Layout, gradient_set: dict[str, np.ndarray]) -> None:
        free = self._free.setdefault(layout, [])
        if len(free) < self.keep and all(_id(s) != _id(gradient_set) for s in free):
            free.append(gradient_set)

    def release(self, engine: Any, taken: Taken) -> None:
        """A push is done with its set: free again, unless it is the engine's buffers now (then
        they simply are nobody's)."""
        host = engine.built and engine.host_staging
        current = _id(engine.current_gradient_set()) if host else None
        for layout, gradient_set in taken:
            self._lent.discard(_id(gradient_set))
            if host and _id(gradient_set) != current and layout == engine.gradient_set_layout():
                self._pool(layout, gradient_set)  # (a set of an engine since replaced is dropped)
        taken.clear()

    def swap_in(self, engine: Any, taken: Taken) -> bool:
        """Make a push's set the engine's staging buffers; False when it has none that fits
        (then its gradients are copied in, after ``unshare``)."""
        if not taken or not engine.host_staging or taken[0][0] != engine.gradient_set_layout():
            return False
        layout, gradient_set = taken[0]
        previous = engine.exchange_gradient_buffers(gradient_set)
        if _id(previous) != _id(gradient_set) and _id(previous) not in self._lent:
            self._pool(layout, previous)  # nobody's: free
        return True

    def unshare(self, engine: Any) -> None:
        """Before gradients are copied into the engine's buffers: a free set in place of buffers
        a push holds (they stay with it)."""
        if not engine.host_staging or _id(engine.current_gradient_set()) not in self._lent:
            return
        free = self._free.get(engine.gradient_set_layout())
        engine.exchange_gradient_buffers(free.pop() if free else engine.new_gradient_set())
