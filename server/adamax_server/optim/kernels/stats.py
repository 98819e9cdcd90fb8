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

from adamax_server.optim.kernels.parallel_gate import parallel_call

try:
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - only where numba is missing
    HAVE_NUMBA = False

_BLOCK = 1 << 16
# Below this many elements one thread does the work: starting the pool costs more.
_PARALLEL_MIN = 1 << 17
# A push's statistics (and its shared-memory copy) run on the thread receiving it, alongside
# other connections' receives: one core each, at the memory's speed, with no pool to wake and no
# gate to queue at. On a busy machine a parallel region waits for its slowest thread (measured
# 1.7 ms per 1M-param push inside a 2-worker sync job against 0.17 ms alone); only a gradient
# this large gains more from the pool than a region's skew costs.
_RECEIVE_PARALLEL_MIN = 1 << 24
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

    # Finite elements have a magnitude below the all-ones exponent; in the integer view with the
    # sign bit cleared, magnitudes order as the floats do. The common case (every element finite)
    # is one branch-free pass: the float64 sum of squares and the integer maximum, which
    # vectorise and run at the memory's speed (about twice the speed of testing each element).
    # Only when that maximum says a block holds a NaN or an infinity is the block read again,
    # counting the non-finite elements and leaving them out. The float64 sum is reassociated
    # (``reassoc``): it is a metric; the clipping norms are the engine's, in Keras's order. No
    # other fast-math flag: NaN and infinities must stay visible to the integer test.
    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _block_all_finite(vals, bits, mask):
        s = 0.0
        mx = bits.dtype.type(0)
        for i in range(vals.shape[0]):
            x = np.float64(vals[i])
            s += x * x
            mx = max(mx, bits[i] & mask)
        return s, mx

    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _block_with_non_finite(vals, bits, mask, limit):
        s = 0.0
        mx = bits.dtype.type(0)
        nb = 0
        for i in range(vals.shape[0]):
            b = bits[i] & mask
            finite = b < limit
            x = np.float64(vals[i])
            s += x * x if finite else 0.0
            m = b if finite else bits.dtype.type(0)
            mx = m if m > mx else mx
            nb += 0 if finite else 1
        return s, mx, nb

    @njit(nogil=True, cache=True)
    def _block_stats(vals, bits, mask, limit):
        s, mx = _block_all_finite(vals, bits, mask)
        if mx < limit:
            return s, mx, 0
        return _block_with_non_finite(vals, bits, mask, limit)

    @njit(nogil=True, cache=True, fastmath={"reassoc"})
    def _copy_block(dst, src, src_bits, mask, limit):
        # The copy and the common case's statistics in one read of ``src``.
        s = 0.0
        mx = src_bits.dtype.type(0)
        for i in range(src.shape[0]):
            v = src[i]
            dst[i] = v
            x = np.float64(v)
            s += x * x
            mx = max(mx, src_bits[i] & mask)
        if mx < limit:
            return s, mx, 0
        return _block_with_non_finite(src, src_bits, mask, limit)

    @njit(parallel=True, nogil=True, cache=True)
    def _stats_blocks(vals, bits, mask, limit):
        n = vals.shape[0]
        nblocks = (n + _BLOCK - 1) // _BLOCK
        sums = np.zeros(nblocks, dtype=np.float64)
        maxes = np.zeros(nblocks, dtype=bits.dtype)
        bad = np.zeros(nblocks, dtype=np.int64)
        for k in prange(nblocks):
            a = k * _BLOCK
            b = min(n, a + _BLOCK)
            sums[k], maxes[k], bad[k] = _block_stats(vals[a:b], bits[a:b], mask, limit)
        return sums.sum(), maxes.max(), bad.sum()

    @njit(parallel=True, nogil=True, cache=True)
    def _copy_blocks(dst, src, bits, mask, limit):
        # ``bits``: the integer view of ``src``; each block is counted as it is copied.
        n = src.shape[0]
        nblocks = (n + _BLOCK - 1) // _BLOCK
        sums = np.zeros(nblocks, dtype=np.float64)
        maxes = np.zeros(nblocks, dtype=bits.dtype)
        bad = np.zeros(nblocks, dtype=np.int64)
        for k in prange(nblocks):
            a = k * _BLOCK
            b = min(n, a + _BLOCK)
            sums[k], maxes[k], bad[k] = _copy_block(dst[a:b], src[a:b], bits[a:b], mask, limit)
        return sums.sum(), maxes.max(), bad.sum()

    @njit(parallel=True, nogil=True, cache=True)
    def _sum_blocks(total, parts, divide, divisor, bits, mask, limit):
        # ``total[i] = ((0 + p0[i]) + p1[i]) + ...`` then ``/ divisor``: the same float operations
        # in the same order as ``total[...] = 0; np.add(total, p, out=total) ...; np.divide``
        # (no fast-math in this function). ``bits``: the integer view of ``total``.
        n = total.shape[0]
        nblocks = (n + _BLOCK - 1) // _BLOCK
        sums = np.zeros(nblocks, dtype=np.float64)
        maxes = np.zeros(nblocks, dtype=bits.dtype)
        bad = np.zeros(nblocks, dtype=np.int64)
        zero = total.dtype.type(0)
        for k in prange(nblocks):
            a = k * _BLOCK
            b = min(n, a + _BLOCK)
            for i in range(a, b):
                acc = zero
                for j in range(len(parts)):
                    acc = acc + parts[j][i]
                if divide:
                    acc = acc / divisor
                total[i] = acc
            sums[k], maxes[k], bad[k] = _block_stats(total[a:b], bits[a:b], mask, limit)
        return sums.sum(), maxes.max(), bad.sum()


_INT_VIEW = {
    np.dtype(np.float32): (np.uint32, np.uint32(0x7FFFFFFF), np.uint32(0x7F800000)),
    np.dtype(np.float64): (np.uint64, np.uint64(0x7FFFFFFFFFFFFFFF), np.uint64(0x7FF0000000000000)),
}


def _result(dtype: np.dtype, s: float, mx_bits: int, bad: int) -> GradientStats:
    max_abs = np.array([mx_bits], dtype=_INT_VIEW[dtype][0]).view(dtype)[0]
    return GradientStats(float(s), float(max_abs), int(bad))


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
        itype, mask, limit = _INT_VIEW[flat.dtype]
        bits = flat.view(itype)
        if flat.size < _RECEIVE_PARALLEL_MIN:
            return _result(flat.dtype, *_block_stats(flat, bits, mask, limit))
        return _result(flat.dtype, *parallel_call(_stats_blocks, flat, bits, mask, limit))
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
    itype, mask, limit = _INT_VIEW[d.dtype]
    if s.size < _RECEIVE_PARALLEL_MIN:
        return _result(d.dtype, *_copy_block(d, s, s.view(itype), mask, limit))
    return _result(d.dtype, *parallel_call(_copy_blocks, d, s, s.view(itype), mask, limit))


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
        itype, mask, limit = _INT_VIEW[dtype]
        return _result(dtype, *parallel_call(_sum_blocks, flat, views, divide, dtype.type(divisor if divide else 1),
                                           flat.view(itype), mask, limit))
    flat[...] = 0
    for v in views:
        np.add(flat, v.astype(dtype, copy=False), out=flat)
    if divisor is not None:
        np.divide(flat, np.asarray(divisor, dtype=dtype), out=flat)
    return gradient_stats(flat)
