"""One-pass gradient statistics for metrics: sum of squares, largest magnitude, non-finite count.

The metrics record each applied gradient's L2 norm and whether clipping would act. Doing that
with NumPy costs several full passes and temporaries (a float64 copy, ``abs``) per push under
the optimizer's lock; this reads each gradient once, in parallel, without the GIL.
Non-finite elements are counted and left out of the sum and the maximum.
"""

from __future__ import annotations

import numpy as np

try:
    from numba import njit, prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - only where numba is missing
    HAVE_NUMBA = False

_BLOCK = 1 << 16

if HAVE_NUMBA:

    @njit(parallel=True, nogil=True, cache=True)
    def _stats(flat):
        nblocks = (flat.shape[0] + _BLOCK - 1) // _BLOCK
        sums = np.zeros(nblocks, dtype=np.float64)
        maxes = np.zeros(nblocks, dtype=np.float64)
        bad = np.zeros(nblocks, dtype=np.int64)
        for b in prange(nblocks):
            s = 0.0
            mx = 0.0
            nb = 0
            for i in range(b * _BLOCK, min(flat.shape[0], (b + 1) * _BLOCK)):
                x = np.float64(flat[i])
                if np.isfinite(x):
                    s += x * x
                    a = abs(x)
                    if a > mx:
                        mx = a
                else:
                    nb += 1
            sums[b] = s
            maxes[b] = mx
            bad[b] = nb
        return sums.sum(), maxes.max() if nblocks else 0.0, bad.sum()


def gradient_stats(values: np.ndarray) -> tuple[float, float, int]:
    """(sum of squares in float64, max |x|, number of non-finite elements) of the finite part."""
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.size == 0:
        return 0.0, 0.0, 0
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float32)
    if HAVE_NUMBA:
        s, mx, bad = _stats(flat)
        return float(s), float(mx), int(bad)
    finite = flat[np.isfinite(flat)].astype(np.float64)
    return float(np.dot(finite, finite)), float(np.max(np.abs(finite), initial=0.0)), int(flat.size - finite.size)
