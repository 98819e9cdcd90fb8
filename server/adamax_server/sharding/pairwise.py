"""Exact sums of squares of a variable split over shards, in NumPy's pairwise order.

Keras's ``clipnorm`` and ``global_clipnorm`` compute ``np.sum(np.square(g))`` per variable.
NumPy sums a contiguous float array of ``n`` elements with a fixed binary tree (``pairwise_sum``
in ``numpy/core/src/umath/loops_utils.h.src``):

* ``n < 8``: ``res = 0`` then ``res += x[i]`` left to right (a leaf);
* ``8 <= n <= 128``: eight running sums ``r[j] = x[j]`` then ``r[j] += x[i + j]`` for every
  full block of 8, combined as ``((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))``, then the
  ``n % 8`` tail added left to right (a leaf);
* ``n > 128``: split at ``n2 = n // 2 - (n // 2) % 8`` and return ``sum(left) + sum(right)``
  (an inner node).

The subtree of a node of length ``k`` is the tree of ``k`` elements wherever the node starts,
so a shard holding the element range ``[a, b)`` of a variable can compute, bit for bit, the sum
of every node that lies inside its range. ``units(n, a, b)`` lists what a shard sends for its
range, in element order:

* the *maximal* nodes inside ``[a, b)`` (a node inside the range whose parent is not), as the
  node's pairwise sum;
* each element of a leaf that straddles ``a`` or ``b`` (at most 127 per side), as its
  square (a one-element sum: ``0 + x*x == x*x`` exactly).

``combine(n, dtype, pieces)`` then walks the variable's tree from the root: a node inside one
piece takes that piece's unit, a straddling leaf is re-summed from the squares with NumPy's leaf
algorithm, and a straddling inner node adds its children. Every addition is the one NumPy
performs, in the same dtype and order, so the total equals ``np.sum(np.square(g))`` exactly,
whatever the row boundaries the placement chose (no split point has to fall on a tree
boundary). A whole (unsplit) variable is one piece with one unit: its own sum.

Pure NumPy; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

BLOCK = 128  # largest leaf
UNROLL = 8  # running sums inside a leaf


class Unit(NamedTuple):
    """One number a shard sends: the pairwise sum of elements ``[start, start + length)``.

    ``start`` is relative to the variable's first element. ``length == 1`` inside a straddling
    leaf is that element's square.
    """

    start: int
    length: int


def split_point(n: int) -> int:
    """Where NumPy's pairwise sum splits a range of ``n > 128`` elements."""
    n2 = n // 2
    return n2 - n2 % UNROLL


def units(n: int, a: int, b: int) -> list[Unit]:
    """The units of the element range ``[a, b)`` of an ``n``-element variable, in order."""
    if not 0 <= a <= b <= n:
        raise ValueError(f"range [{a}, {b}) is not inside [0, {n})")
    out: list[Unit] = []
    if a == b:
        return out
    # Depth-first, left to right; the stack holds (start, length) nodes still to visit.
    stack = [(0, n)]
    while stack:
        start, length = stack.pop()
        end = start + length
        if end <= a or start >= b:
            continue
        if a <= start and end <= b:
            out.append(Unit(start, length))
        elif length <= BLOCK:
            out.extend(Unit(i, 1) for i in range(max(a, start), min(b, end)))
        else:
            n2 = split_point(length)
            stack.append((start + n2, length - n2))
            stack.append((start, n2))
    return out


def unit_arrays(n: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """``units`` as (starts, lengths) int64 arrays, relative to ``a`` (the piece's first element)."""
    us = units(n, a, b)
    starts = np.asarray([u.start - a for u in us], dtype=np.int64)
    lengths = np.asarray([u.length for u in us], dtype=np.int64)
    return starts, lengths


def piece_sums(values: np.ndarray, n: int, a: int) -> np.ndarray:
    """The unit sums of one piece computed with NumPy (the reference for the kernels).

    ``values`` are the (already transformed) gradient elements ``[a, a + len(values))`` of an
    ``n``-element variable, flat.
    """
    flat = np.ascontiguousarray(values).reshape(-1)
    starts, lengths = unit_arrays(n, a, a + flat.size)
    out = np.empty(starts.size, dtype=flat.dtype)
    for k, (s, m) in enumerate(zip(starts.tolist(), lengths.tolist())):
        out[k] = np.sum(np.square(flat[s : s + m]))
    return out


def _leaf_sum(squares: np.ndarray) -> np.generic:
    """NumPy's pairwise_sum of at most 128 already-squared elements."""
    n = squares.size
    dtype = squares.dtype.type
    if n < UNROLL:
        res = dtype(0)
        for x in squares:
            res = dtype(res + x)
        return res
    r = [dtype(squares[j]) for j in range(UNROLL)]
    i = UNROLL
    stop = n - n % UNROLL
    while i < stop:
        for j in range(UNROLL):
            r[j] = dtype(r[j] + squares[i + j])
        i += UNROLL
    res = dtype(dtype(dtype(r[0] + r[1]) + dtype(r[2] + r[3])) + dtype(dtype(r[4] + r[5]) + dtype(r[6] + r[7])))
    while i < n:
        res = dtype(res + squares[i])
        i += 1
    return res


class Piece(NamedTuple):
    """One shard's contribution to a variable's sum: its element range and its unit sums."""

    start: int  # first element of the range
    stop: int  # one past the last
    sums: np.ndarray  # aligned with ``units(n, start, stop)``


def combine(n: int, dtype: np.dtype, pieces: Sequence[Piece]) -> np.generic:
    """The variable's ``np.sum(np.square(g))`` from its pieces' unit sums (which must tile [0, n))."""
    dtype = np.dtype(dtype)
    ordered = sorted(pieces, key=lambda p: p.start)
    pos = 0
    lookup: dict[tuple[int, int], np.generic] = {}
    for p in ordered:
        if p.start != pos:
            raise ValueError(f"pieces do not tile [0, {n}): gap or overlap at element {pos}")
        us = units(n, p.start, p.stop)
        if len(us) != len(p.sums):
            raise ValueError(
                f"piece [{p.start}, {p.stop}) carries {len(p.sums)} sums; its range has {len(us)} units"
            )
        for u, s in zip(us, np.asarray(p.sums, dtype=dtype)):
            lookup[(u.start, u.length)] = s
        pos = p.stop
    if pos != n:
        raise ValueError(f"pieces do not tile [0, {n}): they end at element {pos}")
    if n == 0:
        return dtype.type(0)

    def node(start: int, length: int) -> np.generic:
        hit = lookup.get((start, length))
        if hit is not None:  # a node inside one piece (every piece's units are listed)
            return hit
        if length <= BLOCK:  # a leaf straddling pieces: re-sum its squares as NumPy would
            squares = np.asarray([lookup[(i, 1)] for i in range(start, start + length)], dtype=dtype)
            return _leaf_sum(squares)
        n2 = split_point(length)
        left = node(start, n2)
        right = node(start + n2, length - n2)
        return dtype.type(left + right)

    # Leaves hold at least 64 elements unless the whole variable is one leaf, so a one-element
    # unit (a square) never shares its key with a node: the lookup is unambiguous.
    return node(0, n)
