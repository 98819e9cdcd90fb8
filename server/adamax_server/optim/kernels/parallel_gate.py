"""Calls of numba ``parallel=True`` kernels, safe from many threads whatever threading layer loads.

numba runs ``prange`` loops on one of three threading layers: TBB, OpenMP or its own
``workqueue``. The first two accept launches from several threads at once; ``workqueue`` does not:
two concurrent launches print "Numba workqueue threading layer is terminating: Concurrent access
has been detected" and abort the process. numba falls back to it where neither TBB nor an OpenMP
runtime (libgomp) is installed, e.g. a ``python:3.11-slim`` image, and the server launches
kernels from many threads (gRPC handlers computing gradient statistics outside the optimizer
lock, several optimizers stepping at once, a shard's prepare and stage).

``parallel_call(kernel, *args)`` runs the kernel, serialized by one process-wide lock until the
layer is known. numba loads the layer at the first launch, so the first call runs under the lock
and then reads ``numba.threading_layer()``: with ``tbb`` or ``omp`` later calls run without it,
with ``workqueue`` they keep taking it (each launch still uses every core; only launches from
different threads queue). ``NUMBA_THREADING_LAYER`` is honoured as numba honours it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_THREAD_SAFE_LAYERS = frozenset({"tbb", "omp"})


class _Gate:
    serialize: bool | None = None  # None: not known yet (no launch happened in this process)
    layer: str | None = None


_gate = _Gate()


def parallel_call(kernel: Callable[..., T], *args: Any) -> T:
    """``kernel(*args)``, serialized across threads unless numba's threading layer is thread-safe."""
    if _gate.serialize is False:
        return kernel(*args)
    with _lock:
        out = kernel(*args)
        if _gate.serialize is None:
            _decide()
        return out


def _decide() -> None:
    try:
        import numba

        layer = str(numba.threading_layer())
    except Exception:  # noqa: BLE001 - no layer loaded (the kernel ran serially): stay careful
        return
    _gate.layer = layer
    _gate.serialize = layer not in _THREAD_SAFE_LAYERS
    if _gate.serialize:
        _log.info(
            "numba's threading layer is %r, which is not thread-safe: parallel kernels launched from "
            "different threads run one after another (install tbb, or libgomp1, to run them concurrently)",
            layer,
        )


def threading_layer() -> str | None:
    """The layer numba loaded in this process (None before the first parallel kernel ran)."""
    return _gate.layer
