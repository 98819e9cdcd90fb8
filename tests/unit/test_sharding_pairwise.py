"""Exact norms across shards: unit sums combined in NumPy's pairwise tree equal np.sum(np.square(g))."""

from __future__ import annotations

import numpy as np
import pytest

from adamax_server.sharding import pairwise
from adamax_server.sharding.pairwise import Piece, combine, piece_sums, units


def _split_sum(g: np.ndarray, cuts: list[int]) -> np.generic:
    flat = g.reshape(-1)
    n = flat.size
    bounds = [0, *cuts, n]
    pieces = [Piece(a, b, piece_sums(flat[a:b], n, a)) for a, b in zip(bounds, bounds[1:])]
    return combine(n, flat.dtype, pieces)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 5, 7, 8, 9, 64, 127, 128, 129, 200, 1000, 4099, 65_537])
def test_any_split_is_exact(dtype, n):
    rng = np.random.default_rng(n)
    g = (rng.standard_normal(n) * rng.uniform(0.1, 1e3, n)).astype(dtype)
    expected = np.sum(np.square(g))
    # One piece (a whole variable), and random cuts anywhere (not only on tree boundaries).
    assert _split_sum(g, []).tobytes() == expected.tobytes()
    for trial in range(10):
        k = int(rng.integers(1, 6))
        cuts = sorted(set(int(c) for c in rng.integers(1, n, k))) if n > 1 else []
        got = _split_sum(g, cuts)
        assert got.dtype == expected.dtype
        assert got.tobytes() == expected.tobytes(), (n, cuts)


def test_row_cuts_of_a_matrix_are_exact():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((997, 301)).astype(np.float32)
    expected = np.sum(np.square(g))
    for rows in ([1], [498], [332, 664], [1, 2, 3, 996], list(range(50, 997, 50))):
        assert _split_sum(g, [r * 301 for r in rows]).tobytes() == expected.tobytes()


def test_naive_partial_sums_would_differ():
    """Why the tree matters: adding per-shard np.sum results is not bit-exact in general."""
    rng = np.random.default_rng(3)
    differs = 0
    for _ in range(50):
        g = (rng.standard_normal(10_001) * 100).astype(np.float32)
        cut = int(rng.integers(1, 10_000))
        naive = np.float32(np.sum(np.square(g[:cut])) + np.sum(np.square(g[cut:])))
        exact = _split_sum(g, [cut])
        assert exact == np.sum(np.square(g))
        differs += naive != exact
    assert differs > 0


def test_units_tile_the_range_and_stay_small():
    n = 50_257 * 768
    for a, b in [(0, n), (0, 1_000 * 768), (12_345 * 768, 40_000 * 768), (n - 768, n)]:
        us = units(n, a, b)
        assert us[0].start == a and us[-1].start + us[-1].length == b
        assert all(x.start + x.length == y.start for x, y in zip(us, us[1:]))
        assert len(us) <= 2 * 127 + 2 * 40  # squares of two partial leaves + O(log n) nodes


def test_non_finite_propagates_like_numpy():
    g = np.ones(1000, dtype=np.float32)
    g[700] = np.inf
    assert np.isinf(_split_sum(g, [650]))
    g[10] = np.nan
    assert np.isnan(_split_sum(g, [650]))


def test_bad_tilings_are_refused():
    g = np.ones(300, dtype=np.float32)
    a = Piece(0, 100, piece_sums(g[:100], 300, 0))
    c = Piece(150, 300, piece_sums(g[150:], 300, 150))
    with pytest.raises(ValueError, match="tile"):
        combine(300, np.float32, [a, c])
    with pytest.raises(ValueError, match="units"):
        combine(300, np.float32, [Piece(0, 300, np.zeros(2, np.float32))])
    assert pairwise.split_point(1000) == 496
