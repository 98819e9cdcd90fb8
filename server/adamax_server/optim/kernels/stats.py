"""One-pass gradient statistics: sum of squares, largest magnitude, non-finite count.

The non-finite check and the metrics (each applied gradient's L2 norm, whether clipping would
act) need these three figures per gradient. They are folded into a pass that reads the bytes
anyway, so a gradient is touched once instead of once more under the optimizer's lock:

* ``gradient_stats(values)``: a range already in memory (received in pieces: the piece that
  just landed from the socket is still in the cache);
* ``copy_with_stats(dst, src)``: the private copy of a shared-memory gradient;
* ``sum_with_stats(total, parts, divisor)``: a sync round's sum (and mean) of the workers'
  gradients, element by element in worker order, exactly as ``np.add`` / ``np.divide`` do it.

Non-finite elements are counted and left out of the sum and the maximum. The sums are for
metrics only (float64, blocked order); clipping norms are the engine's, in Keras's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

try:
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - only where numba is missing
    HAVE_NUMBA = False

_BLOCK = 1 << 16
# Below this many elements one thread does the work: starting the pool costs more.
_PARALLEL_MIN = 1 << 17
_FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class GradientStats(NamedTuple):
    """One gradient's sum of squares and largest magnitude (finite part) and non-finite count."""

    sumsq: float
    max_abs: float
    non_finite: int

    def merge(self, other: GradientStats) -> GradientStats:
        return GradientStats(self.sumsq + other.sumsq, max(self.max_abs, other.max_abs), self.non_finite + other.non_finite)


EMPTY = GradientStats(0.0, 0.0, 0)

if HAVE_NUMBA:

    @njit(inline="always")
    def _account(x, s, mx, nb):
        if np.isfinite(x):
            s += x * x
            a = abs(x)
            if a > mx:
                mx = a
        else:
            nb += 1
        return s, mx, nb

    @njit(nogil=True, cache=True)
    def _stats_serial(flat):
        s = 0.0
        mx = 0.0
        nb = 0
        for i in range(flat.shape[0]):
            s, mx, nb = _account(np.float64(flat[i]), s, mx, nb)
        return s, mx, nb

    @njit(parallel=True, nogil=True, cache=True)
    def _stats_parallel(flat):
        nblocks = (flat.shape[0] + _BLOCK - 1) // _BLOCK
        sums = np.zeros(nblocks, dtype=np.float64)
        maxes = np.zeros(nblocks, dtype=np.float64)
        bad = np.zeros(nblocks, dtype=np.int64)
        for b in prange(nblocks):
            s = 0.0
            mx = 0.0
            nb = 0
            for i in range(b * _BLOCK, min(flat.shape[0], (b + 1) * _BLOCK)):
                s, mx, nb = _account(np.float64(flat[i]), s, mx, nb)
            sums[b] = s
            maxes[b] = mx
            bad[b] = nb
        return sums.sum(), maxes.max() if nblocks else 0.0, bad.sum()

    @njit(nogil=True, cache=True)
    def _copy_serial(dst, src):
        s = 0.0
        mx = 0.0
        nb = 0
        for i in range(src.shape[0]):
            x = src[i]
            dst[i] = x
            s, mx, nb = _account(np.float64(x), s, mx, nb)
        return s, mx, nb

    @njit(parallel=True, nogil=True, cache=True)
    def _copy_parallel(dst, src):
        nblocks = (src.shape[0] + _BLOCK - 1) // _BLOCK
        sums = np.zeros(nblocks, dtype=np.float64)
        maxes = np.zeros(nblocks, dtype=np.float64)
        bad = np.zeros(nblocks, dtype=np.int64)
        for b in prange(nblocks):
            s = 0.0
            mx = 0.0
            nb = 0
            for i in range(b * _BLOCK, min(src.shape[0], (b + 1) * _BLOCK)):
                x = src[i]
                dst[i] = x
                s, mx, nb = _account(np.float64(x), s, mx, nb)
            sums[b] = s
            maxes[b] = mx
            bad[b] = nb
        return sums.sum(), maxes.max() if nblocks else 0.0, bad.sum()

    @njit(parallel=True, nogil=True, cache=True)
    def _sum_parallel(total, parts, divide, divisor):
        # ``total[i] = ((0 + p0[i]) + p1[i]) + ...`` then ``/ divisor``: the same float operations
        # in the same order as ``total[...] = 0; np.add(total, p, out=total) ...; np.divide``.
        n = total.shape[0]
        nblocks = (n + _BLOCK - 1) // _BLOCK
        sums = np.zeros(nblocks, dtype=np.float64)
        maxes = np.zeros(nblocks, dtype=np.float64)
        bad = np.zeros(nblocks, dtype=np.int64)
        zero = total.dtype.type(0)
        for b in prange(nblocks):
            s = 0.0
            mx = 0.0
            nb = 0
            for i in range(b * _BLOCK, min(n, (b + 1) * _BLOCK)):
                acc = zero
                for k in range(len(parts)):
                    acc = acc + parts[k][i]
                if divide:
                    acc = acc / divisor
                total[i] = acc
                s, mx, nb = _account(np.float64(acc), s, mx, nb)
            sums[b] = s
            maxes[b] = mx
            bad[b] = nb
        return sums.sum(), maxes.max() if nblocks else 0.0, bad.sum()


def _flat(values: np.ndarray) -> np.ndarray:
    return np.asarray(values).reshape(-1)


def gradient_stats(values: np.ndarray) -> GradientStats:
    """Stats of ``values`` (any float dtype; upcast to float64 for the sums)."""
    flat = _flat(np.ascontiguousarray(values))
    if flat.size == 0:
        return EMPTY
    if flat.dtype not in _FUSED_DTYPES:
        flat = flat.astype(np.float32)
    if HAVE_NUMBA:
        kernel = _stats_parallel if flat.size >= _PARALLEL_MIN else _stats_serial
        s, mx, bad = kernel(flat)
        return GradientStats(float(s), float(mx), int(bad))
    finite = flat[np.isfinite(flat)].astype(np.float64)
    return GradientStats(float(np.dot(finite, finite)), float(np.max(np.abs(finite), initial=0.0)),
                         int(flat.size - finite.size))


def copy_with_stats(dst: np.ndarray, src: np.ndarray) -> GradientStats:
    """``dst[...] = src`` (same dtype and size, contiguous) and the stats of ``src``, in one read."""
    d, s = _flat(dst), _flat(src)
    if d.size != s.size:
        raise ValueError(f"copy_with_stats: {d.size} != {s.size} elements")
    if not (HAVE_NUMBA and s.dtype == d.dtype and s.dtype in _FUSED_DTYPES):
        np.copyto(d, s, casting="unsafe")
        return gradient_stats(d)
    if s.size == 0:
        return EMPTY
    kernel = _copy_parallel if s.size >= _PARALLEL_MIN else _copy_serial
    total, mx, bad = kernel(d, s)
    return GradientStats(float(total), float(mx), int(bad))


def sum_with_stats(total: np.ndarray, parts: Sequence[np.ndarray], divisor: int | None) -> GradientStats:
    """``total = (0 + parts[0] + parts[1] + ...) / divisor`` elementwise, in ``total``'s dtype and in
    this order (bit for bit what ``np.add``/``np.divide`` give), and the stats of the result.

    ``divisor`` None: no division (``aggregation="sum"``). Parts of another dtype are widened
    first, as ``np.asarray(p).astype(total.dtype)`` would.
    """
    flat = _flat(total)
    dtype = flat.dtype
    views = tuple(_flat(np.ascontiguousarray(p)) for p in parts)
    # One compiled kernel per (dtype, number of parts); read-only parts would make a mixed tuple.
    fused = HAVE_NUMBA and dtype in _FUSED_DTYPES and all(v.dtype == dtype and v.flags.writeable for v in views)
    if fused and views and flat.size:
        divide = divisor is not None
        s, mx, bad = _sum_parallel(flat, views, divide, dtype.type(divisor if divide else 1))
        return GradientStats(float(s), float(mx), int(bad))
    flat[...] = 0
    for v in views:
        np.add(flat, v.astype(dtype, copy=False), out=flat)
    if divisor is not None:
        np.divide(flat, np.asarray(divisor, dtype=dtype), out=flat)
    return gradient_stats(flat)
