"""Gradient statistics folded into the receive copy and the sync sum give what the separate pass
gives, and the folded sum is bit for bit the NumPy sum (the update Keras checks depends on it)."""

from __future__ import annotations

import numpy as np
import pytest

from adamax_wire.proto.adamax.v1 import adamax_pb2 as pb
from adamax_server.optim.kernels import stats as stats_kernels
from adamax_server.optim.kernels.stats import copy_with_stats, gradient_stats, sum_with_stats
from adamax_server.transport.common import FoldedStats, shm_copy


def _grad(n: int, dtype: str = "float32", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 3).astype(dtype)


def _close(a, b) -> None:
    assert a.non_finite == b.non_finite
    assert a.max_abs == b.max_abs
    assert a.sumsq == pytest.approx(b.sumsq, rel=1e-12)


def _reference(values: np.ndarray):
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    finite = flat[np.isfinite(flat)]
    return float(np.dot(finite, finite)), float(np.abs(finite).max(initial=0.0)), int(flat.size - finite.size)


@pytest.mark.parametrize("n", [0, 1, 1000, 300_001])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("pool", [False, True], ids=["serial", "pool"])
def test_copy_with_stats_copies_and_counts(n: int, dtype: str, pool: bool, monkeypatch) -> None:
    if pool:  # the pool's kernels, which only gradients of 16M elements and more reach
        monkeypatch.setattr(stats_kernels, "_RECEIVE_PARALLEL_MIN", 1 << 10)
    src = _grad(n, dtype, seed=n)
    if n > 10:
        src[3], src[7], src[n - 1] = np.nan, np.inf, -np.inf
    dst = np.empty_like(src)
    st = copy_with_stats(dst, src)
    np.testing.assert_array_equal(dst, src)
    assert (st.sumsq, st.max_abs, st.non_finite) == pytest.approx(_reference(src), rel=1e-12)
    _close(st, gradient_stats(src))


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sum_with_stats_is_the_numpy_sum_bit_for_bit(parts: int, mean: bool, dtype: str) -> None:
    n = 200_003
    grads = [_grad(n, dtype, seed=k) for k in range(parts)]
    grads[0][5] = -0.0
    expected = np.zeros(n, dtype)
    for g in grads:
        np.add(expected, g, out=expected)
    if mean:
        np.divide(expected, np.asarray(parts, dtype=dtype), out=expected)
    total = np.full(n, 7, dtype)
    st = sum_with_stats(total, grads, parts if mean else None)
    assert total.tobytes() == expected.tobytes()
    assert (st.sumsq, st.max_abs, st.non_finite) == pytest.approx(_reference(expected), rel=1e-12)


def test_sum_with_stats_widens_other_dtypes_like_numpy() -> None:
    a, b = _grad(1000, "float16", 1), _grad(1000, "float32", 2)
    expected = np.zeros(1000, np.float32)
    for g in (a, b):
        np.add(expected, g.astype(np.float32), out=expected)
    total = np.empty(1000, np.float32)
    sum_with_stats(total, [a, b], None)
    assert total.tobytes() == expected.tobytes()


def test_sum_with_stats_counts_non_finite_results() -> None:
    a = np.array([np.finfo(np.float32).max, 1.0, np.nan], np.float32)
    b = np.array([np.finfo(np.float32).max, 2.0, 0.0], np.float32)
    total = np.empty(3, np.float32)
    with np.errstate(over="ignore"):
        st = sum_with_stats(total, [a, b], None)
    assert st.non_finite == 2 and st.sumsq == 9.0 and st.max_abs == 3.0


def _header(name: str, values: np.ndarray, rows: int = 0):
    code = pb.FLOAT32 if values.dtype == np.float32 else pb.FLOAT64
    nbytes = values.nbytes + rows * 8
    layout = pb.ROW_SPARSE if rows else pb.DENSE
    return pb.TensorHeader(name=name, dtype=code, shape=values.shape, nbytes=nbytes, layout=layout, num_rows=rows)


@pytest.mark.parametrize("piece", [1, 3, 4096, 1 << 20])
def test_folded_stats_account_for_pieces_as_they_land(piece: int) -> None:
    g = _grad(100_001, seed=4)
    g[17] = np.inf
    raw = g.view(np.uint8)
    folded = FoldedStats()
    calls = []
    inner = lambda header, nbytes: (np.empty(nbytes, np.uint8), lambda a, b: calls.append((a, b)))  # noqa: E731
    buffer, on_filled = folded.wrap(inner)(_header("g", g), raw.size)
    for start in range(0, raw.size, piece):  # unaligned pieces too (gRPC chunk sizes are the client's)
        end = min(raw.size, start + piece)
        buffer[start:end] = raw[start:end]
        on_filled(start, end)
        assert ("g" in folded.stats) == (end == raw.size)
    assert calls[-1][1] == raw.size  # the allocator's own hook still sees every piece
    _close(folded.stats["g"], gradient_stats(g))
    result = folded.result([("g", buffer.view(np.float32))])
    assert result.stats == folded.stats and result[0][0] == "g"


def test_folded_stats_copy_from_shared_memory_and_sparse_values() -> None:
    values = _grad(3 * 5, seed=5).reshape(3, 5)
    indices = np.array([0, 4, 2], np.int64)
    raw = np.concatenate([indices.view(np.uint8), values.reshape(-1).view(np.uint8)])
    folded = FoldedStats()
    buffer, on_filled = folded.wrap(None)(_header("emb", values, rows=3), raw.size)
    shm_copy(on_filled, buffer, raw)
    np.testing.assert_array_equal(buffer, raw)
    _close(folded.stats["emb"], gradient_stats(values))


def test_narrowed_payloads_are_left_to_push_stats() -> None:
    header = pb.TensorHeader(name="h", dtype=pb.FLOAT16, shape=[4], nbytes=8, layout=pb.DENSE)
    folded = FoldedStats()
    assert folded.wrap(None)(header, 8) is None
    assert folded.stats == {}
